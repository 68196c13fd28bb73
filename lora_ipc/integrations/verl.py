"""verl 0.9: lora_ipc's worker extension composed with verl's ``vLLMColocateWorkerExtension``.

    worker_extension_cls="lora_ipc.integrations.verl.ColocateExtension"     # instead of verl's own
    install()   # or: verl's vLLMHttpServer starts its engines with it (patched at runtime, nothing on disk)
    load(servers, "policy", version)   # driver: each vLLMHttpServer actor serves that version from now on

verl's async server generates with a fixed ``LoRARequest("123", 123, "simon_lora_path")`` once id 123 is
loaded (its checkpoint-engine path never gets it there: verl #7495). :func:`load` puts a lora_ipc version
into that slot through :func:`lora_ipc.ray.load` (verl's ``collective_rpc`` answers None; accepted) and
resets the servers' prefix caches, which key LoRA blocks by that unchanging name and path.

verl's extension runs ``VLLMHijack.hijack()`` in its ``__new__``, replacing
``LRUCacheWorkerLoRAManager._load_adapter``; lora_ipc's plugin gives every worker LoRA manager its own
``_load_adapter`` (:func:`lora_ipc.vllm.plugin.guard`), so ``lora-ipc://`` paths still reach lora_ipc's
loader and verl's ``TensorLoRARequest`` path keeps working beside it.
"""

from __future__ import annotations

from verl.workers.rollout.vllm_rollout.utils import VLLM_LORA_INT_ID, vLLMColocateWorkerExtension

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


def load(servers, name: str, version: int | None = None, *, timeout_s: float | None = None) -> list[dict]:
    """Load ``name`` (``version``, default the newest every relay serves) into verl's LoRA slot on every
    ``vLLMHttpServer`` actor (started after :func:`install`, with ``LORA_IPC_ENDPOINT`` set to the node's
    relay), then reset their prefix caches. Returns :func:`lora_ipc.ray.load`'s entries (``workers=None``)."""
    import ray

    import lora_ipc.ray

    loaded = lora_ipc.ray.load(servers, name, version, VLLM_LORA_INT_ID, timeout_s=timeout_s)
    ray.get([s.clear_kv_cache.remote() for s in servers], timeout=timeout_s)
    return loaded
