"""``lora_request``: a vLLM ``LoRARequest`` for a published adapter version."""

from __future__ import annotations

import hashlib

from ..core.channels.endpoint import daemon_endpoint
from ..core.errors import AdapterNotFound, StaleEpoch, VersionNotFound
from ..lora.adapters import with_shared_client
from ..lora.uri import AdapterURI


def lora_int_id_for(name: str, version: int, epoch: str | None = None) -> int:
    """A deterministic id in [1, 2**31): the same (name, version, epoch) gets the same id in every
    process; the same (name, version) of another store epoch (a restarted daemon) gets another id."""
    key = f"{name}@{version}" if epoch is None else f"{name}@{version}#{epoch}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % ((1 << 31) - 1) + 1


def resolve(name: str, endpoint: str, version: int | None, epoch: str | None = None) -> tuple[int, str]:
    """(version, epoch) the exporter serves now: the newest when ``version`` is None. A pinned
    ``version`` must be kept, and of ``epoch`` when that is given (else ``StaleEpoch``)."""
    catalog = with_shared_client(endpoint, lambda client: client.catalog(name))  # never cut, unlike a full list
    versions: list[int] = next((a.versions for a in catalog.sets if a.name == name), [])
    if epoch is not None and version is not None and catalog.epoch != epoch:
        raise StaleEpoch(
            f"{name!r} v{version} of epoch {epoch} is gone: {endpoint} now serves epoch "
            f"{catalog.epoch or '?'} (it restarted; its version numbers started again)"
        )
    if not versions:
        raise AdapterNotFound(f"no adapter named {name!r} at {endpoint}")
    if version is None:
        return versions[-1], catalog.epoch
    if version not in versions:
        raise VersionNotFound(f"{name!r} version {version} is not kept at {endpoint} (kept: {versions})")
    return version, catalog.epoch


def resolve_version(name: str, endpoint: str, version: int | None, epoch: str | None = None) -> int:
    return resolve(name, endpoint, version, epoch)[0]


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
    The worker's own error class comes back (its code crosses vLLM's RPC, see ``errors.carried``);
    what vLLM itself refuses is an ``AdapterRejected``.
    """
    from ..core.errors import AdapterRejected, carried

    request = lora_request(name, endpoint, version, lora_int_id, **kwargs)
    try:
        llm.llm_engine.add_lora(request)
    except Exception as exc:  # vLLM wraps the worker's error in a plain Exception
        raise (carried(exc) or AdapterRejected(f"vLLM refused {request.lora_path}: {exc}")) from None
    return request
