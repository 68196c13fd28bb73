"""A tiny local Llama on disk for the real vLLM CPU engine (no hub access), and engine helpers."""

from __future__ import annotations

import os

from lora_ipc.tiny import VOCAB, write_model_dir, write_tokenizer  # noqa: F401

PROMPTS = [[1, 17, 42, 99, 7, 8], [1, 200, 3, 150, 23], [1, 5, 6, 7, 8, 9, 10, 11]]


def engine_env() -> None:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")


def make_llm(model_dir: str, max_lora_rank: int = 16, max_loras: int = 2, max_cpu_loras: int = 3, **kw):
    engine_env()
    from vllm import LLM

    return LLM(model=model_dir, tokenizer=model_dir, dtype="bfloat16", enable_lora=True, max_lora_rank=max_lora_rank,
               max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_model_len=128, max_num_seqs=8,
               enforce_eager=True, seed=0, enable_prefix_caching=True, **kw)


def generate(llm, lora_request=None, prompts=PROMPTS, max_tokens=12) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora_request,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
