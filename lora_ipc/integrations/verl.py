"""verl 0.9: lora_ipc's worker extension composed with verl's ``vLLMColocateWorkerExtension``.

    worker_extension_cls="lora_ipc.integrations.verl.ColocateExtension"     # instead of verl's own
    install()   # or: verl's vLLMHttpServer starts its engines with it (patched at runtime, nothing on disk)

verl's extension runs ``VLLMHijack.hijack()`` in its ``__new__``, replacing
``LRUCacheWorkerLoRAManager._load_adapter``; lora_ipc's plugin gives every worker LoRA manager its own
``_load_adapter`` (:func:`lora_ipc.vllm.plugin.guard`), so ``lora-ipc://`` paths still reach lora_ipc's
loader and verl's ``TensorLoRARequest`` path keeps working beside it.
"""

from __future__ import annotations

from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

from ..vllm.worker import WorkerExtension

EXTENSION = f"{__name__}.ColocateExtension"


class ColocateExtension(WorkerExtension, vLLMColocateWorkerExtension):
    """verl's colocated-worker RPCs (``update_weights_from_ipc``, ...) plus ``lora_ipc_load`` & co."""


def install() -> None:
    """Make verl's ``vLLMHttpServer`` start its vLLM engines with :class:`ColocateExtension` (idempotent)."""
    from verl.workers.rollout.vllm_rollout import vllm_async_server

    server = vllm_async_server.vLLMHttpServer
    cls = getattr(server, "__ray_actor_class__", server)
    if not hasattr(cls, "_get_worker_extension_cls"):
        raise RuntimeError("this verl's vLLMHttpServer has no _get_worker_extension_cls (verl 0.9 has)")
    cls._get_worker_extension_cls = lambda self: EXTENSION
