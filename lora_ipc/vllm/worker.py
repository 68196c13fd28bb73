"""``worker_extension_cls="lora_ipc.vllm.WorkerExtension"``: explicit RPCs for ``LLM.collective_rpc``.

    llm.collective_rpc("lora_ipc_load", args=("policy", endpoint))      # newest version
    llm.collective_rpc("lora_ipc_loaded")
    llm.collective_rpc("lora_ipc_unload", args=(lora_int_id,))
    llm.collective_rpc("lora_ipc_refit_stats")                           # last full-weight update's timings

The methods are mixed into vLLM's Worker, so their names are prefixed to never clash with it.

Composable: vLLM takes one ``worker_extension_cls``, and RL frameworks already pass their own (OpenRLHF's
``WorkerWrap``). Combine both in one class of your own module::

    class Extension(lora_ipc.vllm.WorkerExtension, WorkerWrap):
        pass

    LLM(..., worker_extension_cls="my_pkg.my_module.Extension")

``WorkerExtension`` has no ``__init__`` and no state of its own outside ``lora_ipc``-prefixed names,
so it assumes nothing about the other class; a subclass whose bases define the same method name is
refused when it is defined (the silent override Python's method resolution would pick is the bug).
"""

from __future__ import annotations

import time
from typing import Any

from ..core.errors import LoraIpcError
from ..core.protocol import tagged
from .request import lora_request


def _public_methods(cls) -> set[str]:
    return {
        n
        for klass in cls.__mro__
        if klass is not object
        for n, v in vars(klass).items()
        if not n.startswith("__") and callable(v)
    }


class WorkerExtension:
    model_runner: Any  # of vLLM's Worker, which this class is mixed into

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        seen: dict[str, type] = {}
        for base in cls.__bases__:
            for name in _public_methods(base):
                if name in seen and seen[name] is not base and getattr(seen[name], name) is not getattr(base, name):
                    raise TypeError(f"{cls.__name__}: {seen[name].__name__} and {base.__name__} both define {name!r}")
                seen.setdefault(name, base)

    def _lora_ipc_manager(self):
        from .compat import runtime

        manager = runtime.runner_lora_manager(self.model_runner)
        if manager is None:
            raise RuntimeError("this engine was started without enable_lora=True")
        return manager

    def lora_ipc_load(
        self, name: str, endpoint: str | None = None, version: int | None = None, lora_int_id: int | None = None
    ) -> dict:
        """Load (or hot-swap) an adapter version into this worker; returns what was loaded and how long it took."""
        from ..lora.uri import AdapterURI

        started = time.perf_counter()
        try:
            request = lora_request(name, endpoint, version, lora_int_id)
            self._lora_ipc_manager().add_adapter(request)
        except LoraIpcError as exc:  # vLLM passes only str(exc) back: the typed code goes in front (protocol.carried)
            raise tagged(type(exc), str(exc)) from exc
        uri = AdapterURI.parse(request.lora_path)
        return {
            "name": request.lora_name,
            "version": uri.version,
            "endpoint": uri.endpoint,
            "lora_int_id": request.lora_int_id,
            "lora_path": request.lora_path,
            "load_ms": round((time.perf_counter() - started) * 1e3, 3),
        }

    def lora_ipc_unload(self, lora_int_id: int) -> bool:
        return self._lora_ipc_manager().remove_adapter(lora_int_id)

    def lora_ipc_load_count(self) -> int:
        """How many times this worker has loaded an adapter through lora_ipc (each fetch + from_lora_tensors)."""
        from .plugin import state_of

        return state_of(self._lora_ipc_manager()).loads

    def lora_ipc_loaded(self) -> list[dict]:
        from .plugin import loaded_paths

        manager = self._lora_ipc_manager()
        paths = loaded_paths(manager)
        return [{"lora_int_id": i, "lora_path": paths.get(i)} for i in sorted(manager.list_adapters())]

    def lora_ipc_refit_stats(self) -> dict:
        """The last complete ``lora_ipc`` weight update on this worker: buckets, bytes, fetch/load/finalize ms."""
        return dict(getattr(getattr(self, "weight_transfer_engine", None), "last_update", {}) or {})
