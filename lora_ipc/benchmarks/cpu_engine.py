"""What the vLLM benchmarks share: a CPU engine's environment, scratch directories, a trainer's update,
greedy tokens."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

PROMPTS = [[1, 17, 42, 99, 7, 8], [1, 200, 3, 150, 23]]
ENGINE_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
}


def cpu_engine_env() -> None:
    """Set (where unset) what a vLLM CPU engine over a local tiny model needs; before vLLM loads."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def scratch_dirs(prefix: str):
    """``(a temporary directory, one in /dev/shm)``, both removed on the way out."""
    work = tempfile.mkdtemp(prefix=prefix)
    shm = tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")
    try:
        yield work, shm
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def perturb(model, seed: int, scale: float, only: str | None = None) -> None:
    """Add seeded noise to every parameter (whose name contains ``only``), as a trainer's step would."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def greedy(llm, max_tokens: int = 8) -> list[list[int]]:
    """The engine's greedy tokens for :data:`PROMPTS`."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs]
