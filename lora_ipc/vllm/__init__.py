"""vLLM integration. Importing this package does not import vLLM; its members do, when used.

- ``lora_request(name, endpoint=None, version=None, lora_int_id=None)`` -> ``LoRARequest``
- ``add_lora(llm, name, ...)`` -> ``LoRARequest``, loaded now, errors raised here
- ``WorkerExtension``: ``worker_extension_cls="lora_ipc.vllm.WorkerExtension"``, or combined with another
  extension class: ``class Ext(WorkerExtension, TheirWrap): pass`` (clashing names raise ``TypeError``)
- ``plugin.register``: the ``vllm.general_plugins`` entry point (installed with the package)
- ``LoraIpcTrainerInitInfo``, ``OfflineLLMClient``: full-weight refit through vLLM's weight-transfer
  framework (backend ``"lora_ipc"``, see :mod:`.weight_transfer`)
"""

from ..lora.uri import AdapterURI


def __getattr__(name):
    if name in ("lora_request", "lora_int_id_for", "add_lora"):
        from . import request

        return getattr(request, name)
    if name == "WorkerExtension":
        from .worker import WorkerExtension

        return WorkerExtension
    if name in ("LoraIpcTrainerInitInfo", "OfflineLLMClient"):
        from . import weight_transfer

        return getattr(weight_transfer, name)
    raise AttributeError(name)


__all__ = [
    "AdapterURI",
    "LoraIpcTrainerInitInfo",
    "OfflineLLMClient",
    "WorkerExtension",
    "add_lora",
    "lora_int_id_for",
    "lora_request",
]
