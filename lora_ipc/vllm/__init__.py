"""vLLM integration. Importing this package does not import vLLM; its members do, when used.

- ``lora_request(name, endpoint=None, version=None, lora_int_id=None)`` -> ``LoRARequest``
- ``add_lora(llm, name, ...)`` -> ``LoRARequest``, loaded now, errors raised here
- ``WorkerExtension``: ``worker_extension_cls="lora_ipc.vllm.WorkerExtension"``, or combined with another
  extension class: ``class Ext(WorkerExtension, TheirWrap): pass`` (clashing names raise ``TypeError``)
- ``plugin.register``: the ``vllm.general_plugins`` entry point (installed with the package)
"""

from .uri import AdapterURI


def __getattr__(name):
    if name in ("lora_request", "lora_int_id_for", "add_lora"):
        from . import request

        return getattr(request, name)
    if name == "WorkerExtension":
        from .worker import WorkerExtension

        return WorkerExtension
    raise AttributeError(name)


__all__ = ["AdapterURI", "WorkerExtension", "add_lora", "lora_int_id_for", "lora_request"]
