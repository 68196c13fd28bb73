"""Ray actors for the Ray tests: a trainer (real PEFT adapter), an AsyncLLM engine actor shaped like
OpenRLHF's (it forwards ``collective_rpc``), and a composed worker extension.

Importable without Ray or vLLM (the extension classes are what vLLM's workers import by name).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import torch

from lora_ipc.vllm.worker import WorkerExtension


class OtherExtension:
    """Stands for a framework's own extension (OpenRLHF's ``WorkerWrap``): its RPCs must keep working."""

    def other_extension_ping(self) -> dict:
        return {"pid": os.getpid(), "has_model_runner": hasattr(self, "model_runner")}


class CombinedExtension(WorkerExtension, OtherExtension):
    pass


class Trainer:
    """A trainer actor: one real PEFT adapter, a training step, publish through ``lora_ipc.ray``."""

    def __init__(self, seed: int = 0):
        from . import models

        self.models = models
        self.model = models.peft_model(seed, torch.bfloat16)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def publish(self, name: str, step: int | None = None, save_dir: str | None = None, wait: bool = True) -> int:
        import lora_ipc.ray

        if step is not None:
            self.models.train_step(self.model, step)
        version = lora_ipc.ray.publish(name, self.model, wait=wait)
        if save_dir:
            self.model.save_pretrained(save_dir)
        return version

    def adapter(self) -> dict:
        """The tensors the trainer publishes (names and dtypes as packed)."""
        from lora_ipc.lora.peft import adapter_from

        tensors, _ = adapter_from(self.model, None)
        return {k: v.detach().clone() for k, v in tensors.items()}


def fetch(endpoint: str, name: str, version: int | None = None) -> tuple[int, dict]:
    """What a relay serves, copied out by an ordinary client on the caller's node."""
    from lora_ipc import AdapterClient

    with AdapterClient(endpoint, timeout_s=10) as client:
        adapter = client.fetch(name, version)
        return adapter.version, {k: v.clone() for k, v in adapter.tensors.items()}


class AsyncEngine:
    """An ``AsyncLLM`` engine actor on its node's relay, driven through ``collective_rpc`` like OpenRLHF's."""

    def __init__(self, model_dir: str, extension: str = "tests.ray_actors.CombinedExtension", timeout_s: float = 3.0):
        import lora_ipc.ray

        from . import engine

        self.endpoint = lora_ipc.ray.local_endpoint()
        os.environ["LORA_IPC_ENDPOINT"] = self.endpoint  # inherited by vLLM's engine-core process
        os.environ["LORA_IPC_TIMEOUT_S"] = str(timeout_s)
        engine.engine_env()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from lora_ipc.tiny import tiny_engine_kwargs

        args = AsyncEngineArgs(
            **tiny_engine_kwargs(model_dir, enable_prefix_caching=True, worker_extension_cls=extension)
        )
        self.llm = AsyncLLM.from_engine_args(args)
        self.prompts = engine.PROMPTS
        self._ids = itertools.count()
        self._requests: dict[tuple, object] = {}
        self._stream: asyncio.Task | None = None
        self._current = None
        self._records: list[dict] = []

    def info(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "endpoint": self.endpoint}

    async def collective_rpc(
        self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None
    ):
        return await self.llm.collective_rpc(method, timeout, args, kwargs)

    def _lora(self, spec):
        from vllm.lora.request import LoRARequest

        from lora_ipc.vllm import lora_request

        if spec is None:
            return None
        kind, *rest = spec
        if kind == "ipc":  # ("ipc", name, version): pinned in lora_path; made once, as a serving actor would
            if spec not in self._requests:
                name, version = rest
                self._requests[spec] = lora_request(name, self.endpoint, version)
            return self._requests[spec]
        path, lora_id = rest  # ("disk", path, id): vLLM's own loader
        return LoRARequest(f"disk-{lora_id}", lora_id, path)

    async def _one(self, prompt: list[int], lora) -> list[int]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        final = None
        async for out in self.llm.generate(
            TokensPrompt(prompt_token_ids=prompt), params, request_id=f"r{next(self._ids)}", lora_request=lora
        ):
            final = out
        return list(final.outputs[0].token_ids)

    async def generate(self, spec=None) -> list[list[int]]:
        lora = self._lora(spec)
        return list(await asyncio.gather(*(self._one(p, lora) for p in self.prompts)))

    # ---- a continuous stream of requests, each pinned to the version current when it starts ------

    def set_version(self, name: str, version: int) -> None:
        self._current = (name, version, self._lora(("ipc", name, version)))

    async def start_stream(self, in_flight: int = 4) -> None:
        async def one(i: int) -> None:
            _, version, lora = self._current
            self._started[version] = self._started.get(version, 0) + 1
            record = {"version": version, "prompt": i % len(self.prompts), "started": time.monotonic()}
            try:
                record["tokens"] = await self._one(self.prompts[record["prompt"]], lora)
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            self._records.append(record)

        async def loop() -> None:
            for i in itertools.count():
                while len(self._running) >= in_flight:
                    _, self._running = await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                self._running.add(asyncio.create_task(one(i)))

        self._records = []
        self._started: dict[int, int] = {}
        self._running: set[asyncio.Task] = set()
        self._stream = asyncio.create_task(loop())

    def stream_state(self) -> dict:
        """Requests started per version, and how many are running now."""
        return {"started": dict(self._started), "in_flight": sum(not t.done() for t in self._running)}

    async def stop_stream(self) -> list[dict]:
        self._stream.cancel()
        try:
            await self._stream
        except asyncio.CancelledError:
            pass
        await asyncio.gather(*self._running)  # the requests already started finish
        return list(self._records)


class BrokenEngine:
    """An engine actor whose every worker RPC fails the way a worker's lora_ipc error comes back from vLLM."""

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        from lora_ipc.core.errors import ExporterUnavailable
        from lora_ipc.core.protocol import tag

        raise Exception(
            "Call to collective_rpc method failed: Worker failed with error "
            f"'{tag(ExporterUnavailable, 'no reply from ipc:///nowhere within 3s')}'"
        )


class QuietEngine:
    """An engine actor shaped like verl's ``vLLMHttpServer``: its ``collective_rpc`` runs and answers None."""

    def __init__(self):
        self.calls = []

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        self.calls.append((method, tuple(args)))

    def rpc_all(self, method: str, args: tuple = ()):  # the same RPC under another name
        self.calls.append((method, tuple(args)))
        return [{"name": args[0], "version": args[2], "lora_int_id": 7, "lora_path": "lora-ipc://x"}]

    def seen(self) -> list:
        return self.calls


class OddEngine:
    """An engine actor whose RPC answers something lora_ipc cannot read."""

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        return "ok"
