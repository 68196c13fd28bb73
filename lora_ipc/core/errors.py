"""Typed errors. Every error that crosses the socket is one of these, named by its class."""

from __future__ import annotations

import re
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


class AdapterNotFound(LoraIpcError):
    """Nothing of that name (an adapter, a refit stream) has been published. Error codes are wire names:
    this one keeps the name protocol version 2 gave it."""


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
#: error that crosses a vLLM RPC or a Ray call carries one (:func:`tag`, :func:`carried`). Anything else
#: arrives as plain LoraIpcError. Classes outside this module join with :func:`wire_error`.
WIRE_ERRORS: dict[str, type[LoraIpcError]] = {
    cls.__name__: cls
    for cls in (
        LoraIpcError,
        ConfigError,
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


# vLLM's RPCs (collective_rpc, the engine's utility calls) hand a worker's exception to the caller as
# text only (``Exception(f"Call to ... failed: {exc}")``), and Ray wraps that text again. So an error
# meant to cross them starts its message with a typed code and the message's length; the caller reads
# the first such tag back (the outermost error: wrapping only ever prepends) and raises that class.
_TAG = re.compile(r"\[lora_ipc:([A-Za-z][A-Za-z0-9_]{0,63}):([0-9]{1,7})\] ")


def tag(cls: type[LoraIpcError], message: str) -> str:
    """``message`` prefixed with the code of ``cls``: what :func:`carried` reads back on the other side.
    A message tagged already is left as it is (an error re-raised on its way out keeps its one tag)."""
    if _TAG.match(message):
        return message
    return f"[lora_ipc:{error_code(cls)}:{len(message)}] {message}"


def tagged(cls: type[LoraIpcError], message: str) -> LoraIpcError:
    """A ``cls`` to raise where the error will cross a vLLM RPC or Ray call (see :func:`carried`)."""
    return _build(cls, tag(cls, message))


def carried(exc: BaseException) -> LoraIpcError | None:
    """The lora_ipc error ``exc`` is or carries, as its own class with its own message; None if none.

    In order: ``exc`` or an exception it was raised from (``__cause__``/``__context__``, e.g. an in-process
    engine) that is a :class:`LoraIpcError`; else the first tag (:func:`tag`) in ``str(exc)`` (a worker's
    error that came back as text). A tag naming an unknown code gives :class:`LoraIpcError`.
    """
    seen: BaseException | None = exc
    for _ in range(16):
        if seen is None:
            break
        if isinstance(seen, LoraIpcError):  # in-process: the error itself (its tag, if any, taken off)
            m = _TAG.match(str(seen))
            return seen if m is None else _build(type(seen), _message(str(seen), m))
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    m = _TAG.search(text)
    if m is None:
        return None
    return _build(WIRE_ERRORS.get(m.group(1), LoraIpcError), _message(text, m))


def _message(text: str, m: re.Match) -> str:
    return text[m.end() : m.end() + int(m.group(2))]


def _build(cls: type[LoraIpcError], message: str) -> LoraIpcError:
    try:
        return cls(message)
    except TypeError:  # a class that takes more than a message (e.g. EngineLoadError): its nearest base then
        base = WIRE_ERRORS[error_code(cls)]
        return base(message) if base is not cls else LoraIpcError(message)
