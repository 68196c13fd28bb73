"""Wire protocol: typed message classes, msgpack framing and validation of everything that arrives.

A frame is a msgpack array ``[PROTOCOL_VERSION, type_name, request_id, body]``. ``body`` is a map
whose keys and value types each message class checks in ``from_body``. Nothing here pickles, and
nothing here trusts the peer: every decode path either returns a fully validated message object or
raises :class:`ProtocolError`.

Requests (client -> server) and their replies:

=====================  ===================  ==========================================
request                reply                purpose
=====================  ===================  ==========================================
``ListRequest``        ``ListReply``        adapters and their kept versions
``FetchRequest``       ``FetchReply``       lease a version, get handle + layout
``ReleaseRequest``     ``ReleaseReply``     drop a lease (the client sends it, and does not wait)
``PublishRequest``     ``PublishReply``     a remote trainer asks a daemon to copy a slab in
``StatusRequest``      ``StatusReply``      operator view: adapters, leases, metrics
any                    ``ErrorReply``       typed error, named by class
=====================  ===================  ==========================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from .errors import WIRE_ERRORS, LoraIpcError, ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 << 20
MAX_NAME_CHARS = 512
MAX_LIST_ITEMS = 1 << 16
MAX_CONFIG_DEPTH = 8

# --------------------------------------------------------------------------------------------
# field checkers: each returns the value or raises ProtocolError naming the field
# --------------------------------------------------------------------------------------------


def _fail(where: str, what: str) -> ProtocolError:
    return ProtocolError(f"field {where!r}: {what}")


def _take(body: dict, key: str) -> Any:
    if key not in body:
        raise _fail(key, "missing")
    return body[key]


def check_int(body: dict, key: str, *, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    value = _take(body, key)
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(key, f"expected an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def check_opt_int(body: dict, key: str, *, lo: int = 0) -> int | None:
    if body.get(key) is None:
        return None
    return check_int(body, key, lo=lo)


def check_str(body: dict, key: str, *, max_chars: int = MAX_NAME_CHARS, allow_empty=False) -> str:
    value = _take(body, key)
    if type(value) is not str or len(value) > max_chars or (not value and not allow_empty):
        raise _fail(key, f"expected a non-empty string of at most {max_chars} chars")
    return value


def check_bytes(body: dict, key: str, *, max_len: int = 1024) -> bytes:
    value = _take(body, key)
    if type(value) is not bytes or len(value) > max_len:
        raise _fail(key, f"expected bytes of at most {max_len}")
    return value


def check_bool(body: dict, key: str) -> bool:
    value = _take(body, key)
    if type(value) is not bool:
        raise _fail(key, "expected a boolean")
    return value


def check_list(body: dict, key: str, *, max_items: int = MAX_LIST_ITEMS) -> list:
    value = _take(body, key)
    if type(value) is not list or len(value) > max_items:
        raise _fail(key, f"expected a list of at most {max_items} items")
    return value


def check_str_list(body: dict, key: str, *, max_items: int = 64) -> list[str]:
    items = check_list(body, key, max_items=max_items)
    if not all(type(s) is str and 0 < len(s) <= MAX_NAME_CHARS for s in items):
        raise _fail(key, "expected a list of short strings")
    return items


def check_config(value: Any, where: str = "peft_config", depth: int = 0) -> Any:
    """A JSON-like tree (what adapter_config.json may hold), bounded in depth, NaN-free keys."""
    if depth > MAX_CONFIG_DEPTH:
        raise _fail(where, "nested too deeply")
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        if math.isnan(value):
            raise _fail(where, "NaN in config")
        return value
    if type(value) is list:
        return [check_config(v, where, depth + 1) for v in value]
    if type(value) is dict:
        if not all(type(k) is str for k in value):
            raise _fail(where, "config keys must be strings")
        return {k: check_config(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    raise _fail(where, f"unsupported config value of type {type(value).__name__}")


def check_body(body: dict, key: str) -> dict:
    value = _take(body, key)
    if type(value) is not dict:
        raise _fail(key, "expected a map")
    return value


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------

MESSAGE_TYPES: dict[str, type[Message]] = {}


class Message:
    """Base of all wire messages. Subclasses are dataclasses with ``to_body``/``from_body``."""

    TYPE: ClassVar[str]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "TYPE" in cls.__dict__:
            MESSAGE_TYPES[cls.TYPE] = cls

    def to_body(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_body(cls, body: dict) -> Message:  # pragma: no cover - every subclass overrides
        raise NotImplementedError


@dataclass(frozen=True)
class CpuSlabHandle:
    """A POSIX shared-memory slab: a file under /dev/shm the importer maps read-only."""

    slab_id: str
    nbytes: int
    path: str
    BACKEND: ClassVar[str] = "cpu"

    def to_body(self) -> dict:
        return {"backend": self.BACKEND, "slab_id": self.slab_id, "nbytes": self.nbytes, "path": self.path}

    @classmethod
    def from_body(cls, body: dict) -> CpuSlabHandle:
        path = check_str(body, "path", max_chars=255)
        if not path.startswith("/dev/shm/lora-ipc.") or "/" in path[len("/dev/shm/"):] or ".." in path:
            raise _fail("path", "not a lora-ipc shared-memory file")
        return cls(check_str(body, "slab_id"), check_int(body, "nbytes", lo=1), path)


@dataclass(frozen=True)
class CudaSlabHandle:
    """A CUDA IPC slab: the fields of ``reduce_tensor`` (torch's own sharing) plus the GPU UUID.

    ``ipc_args`` are the storage fields of ``torch.multiprocessing.reductions.rebuild_cuda_tensor``:
    (storage_handle, storage_size_bytes, storage_offset_bytes, ref_counter_handle,
    ref_counter_offset, event_handle, event_sync_required). ``ready_event`` is the handle of the
    interprocess event recorded after every pack into this slab.
    """

    slab_id: str
    nbytes: int
    device_uuid: str
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    ready_event: bytes
    BACKEND: ClassVar[str] = "cuda"

    def to_body(self) -> dict:
        body = dataclasses.asdict(self)
        body["backend"] = self.BACKEND
        return body

    @classmethod
    def from_body(cls, body: dict) -> CudaSlabHandle:
        return cls(
            slab_id=check_str(body, "slab_id"),
            nbytes=check_int(body, "nbytes", lo=1),
            device_uuid=check_str(body, "device_uuid", max_chars=64),
            storage_handle=check_bytes(body, "storage_handle"),
            storage_size_bytes=check_int(body, "storage_size_bytes", lo=1),
            storage_offset_bytes=check_int(body, "storage_offset_bytes"),
            ref_counter_handle=check_bytes(body, "ref_counter_handle"),
            ref_counter_offset=check_int(body, "ref_counter_offset"),
            event_handle=check_bytes(body, "event_handle", max_len=256),
            event_sync_required=check_bool(body, "event_sync_required"),
            ready_event=check_bytes(body, "ready_event", max_len=256),
        )


SlabHandle = CpuSlabHandle | CudaSlabHandle
_SLAB_HANDLES = {c.BACKEND: c for c in (CpuSlabHandle, CudaSlabHandle)}


def slab_handle_from_body(body: Any, where: str = "slab") -> SlabHandle:
    if type(body) is not dict:
        raise _fail(where, "expected a map")
    cls = _SLAB_HANDLES.get(body.get("backend"))  # type: ignore[arg-type]
    if cls is None:
        raise _fail(where, f"unknown backend {body.get('backend')!r:.40}")
    return cls.from_body(body)


class _NoFields(Message):
    """A request that carries nothing but its type."""

    @classmethod
    def from_body(cls, body: dict) -> Message:
        return cls()


@dataclass(frozen=True)
class ListRequest(_NoFields):
    TYPE: ClassVar[str] = "list"


@dataclass(frozen=True)
class AdapterSummary:
    name: str
    versions: list[int]
    nbytes: int


@dataclass(frozen=True)
class ListReply(Message):
    adapters: list[AdapterSummary]
    TYPE: ClassVar[str] = "list_reply"

    def to_body(self) -> dict:
        return {"adapters": [[a.name, a.versions, a.nbytes] for a in self.adapters]}

    @classmethod
    def from_body(cls, body: dict) -> ListReply:
        out = []
        for item in check_list(body, "adapters"):
            if not (type(item) is list and len(item) == 3 and type(item[0]) is str and type(item[1]) is list
                    and all(type(v) is int for v in item[1]) and type(item[2]) is int):
                raise _fail("adapters", "expected [name, [versions], nbytes] items")
            out.append(AdapterSummary(item[0], item[1], item[2]))
        return cls(out)


@dataclass(frozen=True)
class FetchRequest(Message):
    """Lease ``version`` (newest when None) of ``name``.

    ``known_slabs`` / ``known_layouts`` list what the client has cached, so the reply can leave out
    the slab handle and the per-tensor layout (names, dtypes, shapes) when the client already has them.
    """

    name: str
    version: int | None
    client_id: str
    known_slabs: list[str] = field(default_factory=list)
    known_layouts: list[bytes] = field(default_factory=list)
    TYPE: ClassVar[str] = "fetch"

    @classmethod
    def from_body(cls, body: dict) -> FetchRequest:
        layouts = check_list(body, "known_layouts", max_items=64)
        if not all(type(d) is bytes and len(d) == 16 for d in layouts):
            raise _fail("known_layouts", "expected 16-byte digests")
        return cls(
            name=check_str(body, "name"),
            version=check_opt_int(body, "version", lo=1),
            client_id=check_str(body, "client_id", max_chars=128),
            known_slabs=check_str_list(body, "known_slabs"),
            known_layouts=layouts,
        )


@dataclass(frozen=True)
class FetchReply(Message):
    """A leased version. ``slab`` / ``entries`` are None when the request said the client knows them."""

    name: str
    version: int
    lease_id: int
    peft_config: dict
    slab_id: str
    slab: SlabHandle | None
    layout_digest: bytes
    entries: list | None
    used_bytes: int
    live_slabs: list[str]
    TYPE: ClassVar[str] = "fetch_reply"

    def to_body(self) -> dict:
        body = super().to_body()
        body["slab"] = None if self.slab is None else self.slab.to_body()
        return body

    @classmethod
    def from_body(cls, body: dict) -> FetchReply:
        slab = None if body.get("slab") is None else slab_handle_from_body(body["slab"])
        entries = None if body.get("entries") is None else check_list(body, "entries")
        digest = check_bytes(body, "layout_digest", max_len=16)
        if len(digest) != 16:
            raise _fail("layout_digest", "expected 16 bytes")
        return cls(
            name=check_str(body, "name"),
            version=check_int(body, "version", lo=1),
            lease_id=check_int(body, "lease_id", lo=1),
            peft_config=check_config(check_body(body, "peft_config")),
            slab_id=check_str(body, "slab_id"),
            slab=slab,
            layout_digest=digest,
            entries=entries,
            used_bytes=check_int(body, "used_bytes"),
            live_slabs=check_str_list(body, "live_slabs", max_items=4096),
        )


@dataclass(frozen=True)
class ReleaseRequest(Message):
    """Drop a lease. ``fetch_ms`` is the client's own measure of the fetch (request sent -> bytes owned),
    which the server aggregates into its swap-latency histogram; 0 when unknown."""

    lease_id: int
    fetch_ms: float = 0.0
    TYPE: ClassVar[str] = "release"

    @classmethod
    def from_body(cls, body: dict) -> ReleaseRequest:
        fetch_ms = body.get("fetch_ms", 0.0)
        if type(fetch_ms) not in (int, float) or not 0 <= fetch_ms < 1e9:
            raise _fail("fetch_ms", "expected a non-negative number")
        return cls(check_int(body, "lease_id", lo=1), float(fetch_ms))


@dataclass(frozen=True)
class ReleaseReply(Message):
    lease_id: int
    TYPE: ClassVar[str] = "release_reply"

    @classmethod
    def from_body(cls, body: dict) -> ReleaseReply:
        return cls(check_int(body, "lease_id", lo=1))


@dataclass(frozen=True)
class PublishRequest(Message):
    """Ask a daemon to take its own copy of a slab the sender exported, as a new version of ``name``."""

    name: str
    peft_config: dict
    slab: SlabHandle
    entries: list
    used_bytes: int
    TYPE: ClassVar[str] = "publish"

    def to_body(self) -> dict:
        body = super().to_body()
        body["slab"] = self.slab.to_body()
        return body

    @classmethod
    def from_body(cls, body: dict) -> PublishRequest:
        return cls(
            name=check_str(body, "name"),
            peft_config=check_config(check_body(body, "peft_config")),
            slab=slab_handle_from_body(body.get("slab")),
            entries=check_list(body, "entries"),
            used_bytes=check_int(body, "used_bytes"),
        )


@dataclass(frozen=True)
class PublishReply(Message):
    name: str
    version: int
    TYPE: ClassVar[str] = "publish_reply"

    @classmethod
    def from_body(cls, body: dict) -> PublishReply:
        return cls(check_str(body, "name"), check_int(body, "version", lo=1))


@dataclass(frozen=True)
class StatusRequest(_NoFields):
    TYPE: ClassVar[str] = "status"


@dataclass(frozen=True)
class StatusReply(Message):
    """Operator view. ``report`` is a JSON-like tree (see ``store.AdapterStore.status``)."""

    report: dict
    TYPE: ClassVar[str] = "status_reply"

    @classmethod
    def from_body(cls, body: dict) -> StatusReply:
        return cls(check_config(check_body(body, "report"), "report"))


@dataclass(frozen=True)
class ErrorReply(Message):
    error: str
    message: str
    TYPE: ClassVar[str] = "error"

    @classmethod
    def from_error(cls, exc: LoraIpcError) -> ErrorReply:
        name = type(exc).__name__ if type(exc).__name__ in WIRE_ERRORS else "LoraIpcError"
        return cls(name, str(exc)[:4000])

    def to_exception(self) -> LoraIpcError:
        return WIRE_ERRORS.get(self.error, LoraIpcError)(self.message)

    @classmethod
    def from_body(cls, body: dict) -> ErrorReply:
        return cls(check_str(body, "error", max_chars=64), check_str(body, "message", max_chars=4000, allow_empty=True))


REQUEST_TYPES = frozenset(c.TYPE for c in (ListRequest, FetchRequest, ReleaseRequest, PublishRequest, StatusRequest))
REPLY_TYPES = frozenset(c.TYPE for c in (ListReply, FetchReply, ReleaseReply, PublishReply, StatusReply, ErrorReply))

# --------------------------------------------------------------------------------------------
# framing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    request_id: int
    message: Message


def encode(message: Message, request_id: int = 0) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, message.TYPE, request_id, message.to_body()], use_bin_type=True)


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def decode(data: bytes, accept: frozenset[str] | None = None) -> Frame:
    """Decode and validate one frame whose type is in ``accept``. Raises ProtocolError for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame too large or not bytes ({len(data) if hasattr(data, '__len__') else '?'} bytes)")
    try:
        raw = msgpack.unpackb(
            data, raw=False, strict_map_key=True, ext_hook=_no_ext, use_list=True)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable msgpack frame: {type(exc).__name__}: {exc}") from None
    if type(raw) is not list or len(raw) != 4:
        raise ProtocolError("frame must be [protocol_version, type, request_id, body]")
    version, type_name, request_id, body = raw
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolError(f"protocol version {version!r:.20} not supported (this side speaks {PROTOCOL_VERSION})")
    if type(request_id) is not int or not 0 <= request_id < (1 << 63):
        raise ProtocolError("request_id must be a non-negative integer")
    cls = MESSAGE_TYPES.get(type_name) if type(type_name) is str else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_name!r:.40}")
    if accept is not None and type_name not in accept:
        err = ProtocolError(f"{type_name} is not accepted here")
        err.request_id = request_id
        raise err
    if type(body) is not dict:
        raise ProtocolError("message body must be a map")
    try:
        return Frame(request_id, cls.from_body(body))
    except ProtocolError as exc:
        exc.request_id = request_id  # lets the server address its error reply to the right request
        raise
    except Exception as exc:  # a from_body bug must still come out typed
        err = ProtocolError(f"invalid {type_name} message: {type(exc).__name__}: {exc}")
        err.request_id = request_id
        raise err from None
