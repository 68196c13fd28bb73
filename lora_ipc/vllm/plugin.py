"""The vLLM general plugin (entry point ``vllm.general_plugins``: ``lora_ipc``).

vLLM calls ``register()`` in every process it starts, workers included. It wraps
``WorkerLoRAManager._load_adapter`` so ``lora-ipc://`` paths are served by :mod:`.loader`; every
other path goes to vLLM's own loader untouched. With ``$LORA_IPC_ENDPOINT`` set it also registers
the LoRA resolver, so the OpenAI server resolves bare adapter names.
"""

from __future__ import annotations

import functools
import logging
import os

from ..endpoint import ENV_ENDPOINT
from .uri import AdapterURI

log = logging.getLogger("lora_ipc.vllm")
_MARK = "__lora_ipc_wrapped__"


def loaded_paths(worker_manager) -> dict[int, str]:
    """``lora_int_id -> lora-ipc:// path`` of what this worker loaded through lora_ipc."""
    paths = worker_manager.__dict__.get("_lora_ipc_paths")
    if paths is None:
        paths = worker_manager._lora_ipc_paths = {}
    return paths


def _wrap_load_adapter(cls) -> None:
    original = cls._load_adapter
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _load_adapter(self, lora_request):
        if not AdapterURI.matches(getattr(lora_request, "lora_path", None)):
            return original(self, lora_request)
        from .loader import load_adapter

        lora = load_adapter(self, lora_request)
        loaded_paths(self)[lora_request.lora_int_id] = lora_request.lora_path
        self._lora_ipc_loads = getattr(self, "_lora_ipc_loads", 0) + 1
        return lora

    setattr(_load_adapter, _MARK, True)
    cls._load_adapter = _load_adapter


def _wrap_add_adapter(cls) -> None:
    """``load_inplace`` requests are re-sent by vLLM on every step; reload only when the path changed."""
    original = cls.add_adapter
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def add_adapter(self, lora_request):
        if (getattr(lora_request, "load_inplace", False) and AdapterURI.matches(lora_request.lora_path)
                and lora_request.lora_int_id in self.list_adapters()
                and loaded_paths(self).get(lora_request.lora_int_id) == lora_request.lora_path):
            import msgspec

            lora_request = msgspec.structs.replace(lora_request, load_inplace=False)
        return original(self, lora_request)

    setattr(add_adapter, _MARK, True)
    cls.add_adapter = add_adapter


def register() -> None:
    try:
        from vllm.lora import worker_manager
    except ImportError:  # vLLM without LoRA support: nothing to do
        return
    _wrap_load_adapter(worker_manager.WorkerLoRAManager)
    for cls in (worker_manager.WorkerLoRAManager, getattr(worker_manager, "LRUCacheWorkerLoRAManager", None)):
        if cls is not None and "add_adapter" in cls.__dict__:
            _wrap_add_adapter(cls)
    if os.environ.get(ENV_ENDPOINT):
        from .resolver import register_resolver

        register_resolver(os.environ[ENV_ENDPOINT])
