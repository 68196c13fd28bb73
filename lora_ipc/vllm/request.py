"""``lora_request``: a vLLM ``LoRARequest`` for a published adapter version."""

from __future__ import annotations

import hashlib

from ..core.channels.endpoint import daemon_endpoint
from ..lora.adapters import resolve
from ..lora.uri import AdapterURI


def lora_int_id_for(name: str, version: int, epoch: str | None = None) -> int:
    """A deterministic id in [1, 2**31): the same (name, version, epoch) gets the same id in every
    process; the same (name, version) of another store epoch (a restarted daemon) gets another id."""
    key = f"{name}@{version}" if epoch is None else f"{name}@{version}#{epoch}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % ((1 << 31) - 1) + 1


def lora_request(
    name: str, endpoint: str | None = None, version: int | None = None, lora_int_id: int | None = None, **kwargs
):
    """A ``LoRARequest`` whose ``lora_path`` is ``lora-ipc://name/v<version>?endpoint=…``.

    The version (newest when omitted) is resolved now and pinned in the path with the exporter's
    epoch, so vLLM's prefix cache never mixes versions and a restarted exporter's version of the same
    number is refused. By default ``lora_int_id`` is derived from (name, version, epoch): every version is
    its own adapter in vLLM, requests of two versions can share a batch, and old versions age out of
    vLLM's LRU cache. Pass a fixed ``lora_int_id`` to swap one slot in place instead (``load_inplace``):
    the plugin reloads only when the version changes.
    """
    from vllm.lora.request import LoRARequest

    endpoint = endpoint or daemon_endpoint()
    version, epoch = resolve(name, endpoint, version)
    uri = str(AdapterURI(name, version, endpoint, epoch or None))
    if lora_int_id is None:
        return LoRARequest(
            lora_name=f"{name}@v{version}",
            lora_int_id=lora_int_id_for(name, version, epoch or None),
            lora_path=uri,
            **kwargs,
        )
    return LoRARequest(lora_name=name, lora_int_id=lora_int_id, lora_path=uri, load_inplace=True, **kwargs)


def add_lora(
    llm, name: str, endpoint: str | None = None, version: int | None = None, lora_int_id: int | None = None, **kwargs
):
    """Load an adapter version into an offline ``vllm.LLM`` now and return its ``LoRARequest``.

    Errors (unknown module names, rank above ``max_lora_rank``, a missing version, a gone exporter)
    are raised here as :class:`~lora_ipc.core.errors.LoraIpcError` subclasses, and the engine keeps
    serving; a bad request handed straight to ``generate`` would fail inside vLLM's step loop instead.
    The worker's own error class comes back (its code crosses vLLM's RPC, see ``protocol.carried``);
    what vLLM itself refuses is an ``AdapterRejected``.
    """
    from ..core.errors import AdapterRejected
    from ..core.protocol import carried

    request = lora_request(name, endpoint, version, lora_int_id, **kwargs)
    try:
        llm.llm_engine.add_lora(request)
    except Exception as exc:  # vLLM wraps the worker's error in a plain Exception
        raise (carried(exc) or AdapterRejected(f"vLLM refused {request.lora_path}: {exc}")) from None
    return request
