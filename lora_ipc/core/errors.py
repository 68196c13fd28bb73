"""Typed errors. Every error that crosses the socket is one of these, named by its class: its code
(:data:`WIRE_ERRORS`). How a code crosses each boundary (an ``ErrorReply``, a tag in an error's text) is
declared with the wire, in :mod:`lora_ipc.core.protocol.tags`."""

from __future__ import annotations

from typing import TypeVar


class LoraIpcError(Exception):
    """Base class of every error lora_ipc raises."""


class ProtocolError(LoraIpcError):
    """A message could not be decoded or failed validation (bad msgpack, wrong version, bad field).

    ``request_id`` is the id of the offending request where it could be read (0 otherwise), so the
    server's error reply reaches the request that caused it.
    """

    def __init__(self, message: str = "", request_id: int = 0):
        super().__init__(message)
        self.request_id = request_id


class LayoutError(ProtocolError):
    """A slab layout is inconsistent: offsets outside the slab, overlaps, unknown dtype, shape/bytes mismatch."""


class TensorSetNotFound(LoraIpcError):
    """Nothing of that name has been published (no tensor set: an adapter, a refit stream). The LoRA layer
    raises its subclass ``AdapterNotFound`` (:mod:`lora_ipc.lora.adapters`) where it looks an adapter up."""


class BadName(LoraIpcError, ValueError):
    """A name refused at publish: see :func:`lora_ipc.core.protocol.check_name`."""


class VersionNotFound(LoraIpcError):
    """The name exists but that version is not (or no longer) kept."""


class StaleEpoch(VersionNotFound):
    """The version was named with another epoch of the store (a daemon or exporter restarted since, and
    its version numbers started again): the same (name, version) now names other bytes, so it is refused."""


class LeaseError(LoraIpcError):
    """A lease id is unknown or already expired."""


class ExporterUnavailable(LoraIpcError):
    """The exporter did not answer within the timeout: it is gone, closed, or overloaded."""


class ClientClosed(ExporterUnavailable):
    """The client was closed (or evicted from the shared-client cache) before or while it was used.
    Asking :func:`lora_ipc.lora.adapters.shared_client` again gives a fresh one."""


class BackendError(LoraIpcError):
    """The memory backend cannot export or import a slab (e.g. CUDA IPC not permitted here)."""


class LimitExceeded(LoraIpcError):
    """A documented cap was reached (leases per holder, names, slab bytes, ...); nothing was changed."""


class SlabRecycled(LoraIpcError):
    """The slab of the fetched version was reused while it was being copied (its lease expired or was
    revoked), so the copy may mix two versions; it was discarded. Fetching again is safe."""


class EndpointNotTrusted(LoraIpcError):
    """The endpoint's directory or the process serving it is not owned by a trusted uid."""


class EndpointInUse(LoraIpcError):
    """Another live server already listens on this endpoint."""


class ConfigError(LoraIpcError, ValueError):
    """A ``LORA_IPC_*`` setting (:mod:`lora_ipc.core.settings`) or a configuration argument that does not parse."""


class BadAdapterURI(LoraIpcError, ValueError):
    """A ``lora-ipc://`` URI that cannot be parsed."""


class AdapterRejected(LoraIpcError):
    """A version was refused at publish time (NaN/Inf) or an adapter by the engine (unknown module names,
    rank too large)."""


class StoreClosed(LoraIpcError):
    """The store (its exporter or daemon) was closed: nothing more is published into it."""


class LoaderBypassed(LoraIpcError):
    """A framework's replacement of vLLM's ``_load_adapter`` would receive ``lora-ipc://`` paths (it is named)."""


#: The one mapping from error codes (class names) to classes: an ErrorReply names one of these, and an
#: error that crosses a vLLM RPC or a Ray call carries one (``protocol.tags``). Anything else arrives as
#: plain LoraIpcError. Classes outside this module join with :func:`wire_error`.
WIRE_ERRORS: dict[str, type[LoraIpcError]] = {
    cls.__name__: cls
    for cls in (
        LoraIpcError,
        ConfigError,
        ProtocolError,
        LayoutError,
        TensorSetNotFound,
        BadName,
        VersionNotFound,
        StaleEpoch,
        LeaseError,
        BackendError,
        AdapterRejected,
        LimitExceeded,
        SlabRecycled,
        ExporterUnavailable,
        ClientClosed,
        EndpointNotTrusted,
        EndpointInUse,
        BadAdapterURI,
        LoaderBypassed,
        StoreClosed,
    )
}

_E = TypeVar("_E", bound=type[LoraIpcError])


def wire_error(cls: _E) -> _E:
    """Class decorator: ``cls`` (built from one message string) gets the code ``cls.__name__``."""
    if WIRE_ERRORS.setdefault(cls.__name__, cls) is not cls:
        raise TypeError(f"error code {cls.__name__!r} is taken by {WIRE_ERRORS[cls.__name__]!r}")
    return cls


def error_code(cls: type[BaseException]) -> str:
    """The code of ``cls``: its own, or its nearest registered base's (``LoraIpcError`` at worst)."""
    for base in cls.__mro__:
        if WIRE_ERRORS.get(base.__name__) is base:
            return base.__name__
    return "LoraIpcError"
