"""Typed errors. Every error that crosses the socket is one of these, named by its class."""

from __future__ import annotations


class LoraIpcError(Exception):
    """Base class of every error lora_ipc raises."""


class ProtocolError(LoraIpcError):
    """A message could not be decoded or failed validation (bad msgpack, wrong version, bad field)."""


class LayoutError(ProtocolError):
    """A slab layout is inconsistent: offsets outside the slab, overlaps, unknown dtype, shape/bytes mismatch."""


class AdapterNotFound(LoraIpcError):
    """No adapter of that name has been published."""


class VersionNotFound(LoraIpcError):
    """The adapter exists but that version is not (or no longer) kept."""


class LeaseError(LoraIpcError):
    """A lease id is unknown or already expired."""


class ExporterUnavailable(LoraIpcError):
    """The exporter did not answer within the timeout: it is gone, closed, or overloaded."""


class BackendError(LoraIpcError):
    """The memory backend cannot export or import a slab (e.g. CUDA IPC not permitted here)."""


class AdapterRejected(LoraIpcError):
    """The adapter was refused at publish time or by the engine (NaN/Inf, unknown module names, rank too large)."""


#: Errors that may be named in an ErrorReply. Anything else arrives as plain LoraIpcError.
WIRE_ERRORS: dict[str, type[LoraIpcError]] = {
    cls.__name__: cls
    for cls in (
        LoraIpcError,
        ProtocolError,
        LayoutError,
        AdapterNotFound,
        VersionNotFound,
        LeaseError,
        BackendError,
        AdapterRejected,
    )
}
