"""Typed errors. Every error that crosses the socket is one of these, named by its class."""

from __future__ import annotations


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


class AdapterNotFound(LoraIpcError):
    """No adapter of that name has been published."""


class VersionNotFound(LoraIpcError):
    """The adapter exists but that version is not (or no longer) kept."""


class StaleEpoch(VersionNotFound):
    """The version was named with another epoch of the store (a daemon or exporter restarted since, and
    its version numbers started again): the same (name, version) now names other bytes, so it is refused."""


class LeaseError(LoraIpcError):
    """A lease id is unknown or already expired."""


class ExporterUnavailable(LoraIpcError):
    """The exporter did not answer within the timeout: it is gone, closed, or overloaded."""


class ClientClosed(ExporterUnavailable):
    """The client was closed (or evicted from the shared-client cache) before or while it was used.
    Asking :func:`lora_ipc.client.shared_client` again gives a fresh one."""


class BackendError(LoraIpcError):
    """The memory backend cannot export or import a slab (e.g. CUDA IPC not permitted here)."""


class LimitExceeded(LoraIpcError):
    """A documented cap was reached (leases per holder, adapter names, slab bytes, ...); nothing was changed."""


class SlabRecycled(LoraIpcError):
    """The slab of the fetched version was reused while it was being copied (its lease expired or was
    revoked), so the copy may mix two versions; it was discarded. Fetching again is safe."""


class EndpointNotTrusted(LoraIpcError):
    """The endpoint's directory or the process serving it is not owned by a trusted uid."""


class EndpointInUse(LoraIpcError):
    """Another live server already listens on this endpoint."""


class BadAdapterURI(LoraIpcError, ValueError):
    """A ``lora-ipc://`` URI that cannot be parsed."""


class AdapterRejected(LoraIpcError):
    """The adapter was refused at publish time or by the engine (NaN/Inf, unknown module names, rank too large)."""


class StoreClosed(LoraIpcError):
    """The store (its exporter or daemon) was closed: nothing more is published into it."""


class LoaderBypassed(LoraIpcError):
    """A framework's replacement of vLLM's ``_load_adapter`` would receive ``lora-ipc://`` paths (it is named)."""


#: Errors that may be named in an ErrorReply. Anything else arrives as plain LoraIpcError.
WIRE_ERRORS: dict[str, type[LoraIpcError]] = {
    cls.__name__: cls
    for cls in (
        LoraIpcError,
        ProtocolError,
        LayoutError,
        AdapterNotFound,
        VersionNotFound,
        StaleEpoch,
        LeaseError,
        BackendError,
        AdapterRejected,
        LimitExceeded,
        SlabRecycled,
        StoreClosed,
    )
}
