"""Wire protocol: typed message classes, msgpack framing and validation of everything that arrives.

A frame is a msgpack array ``[PROTOCOL_VERSION, type_name, request_id, body]``. ``body`` is a map
whose keys are the message's fields; each field's check is declared next to it (``wire(spec)``, see
:mod:`.schema`) and one streaming decoder applies them, so a frame costs no more to refuse than the
largest legal message of its type costs to accept. Unknown keys are refused, and every message type
has its own frame-size limit (``MAX_FRAME``). Nothing here pickles and nothing here imports torch.

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

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from .errors import WIRE_ERRORS, LoraIpcError, ProtocolError
from .schema import (
    SMALL_FRAME,
    Bool,
    Bytes,
    Choice,
    Float,
    Int,
    ListOf,
    Optional,
    Reader,
    Str,
    Struct,
    Tagged,
    Tree,
    Tuple,
    unpack_small,
    wire,
)

PROTOCOL_VERSION = 2


def digest_of(obj: Any) -> bytes:
    """16-byte digest of a msgpack-able value (layouts and configs are cached by it)."""
    return hashlib.blake2b(msgpack.packb(obj, use_bin_type=True), digest_size=16).digest()
MAX_FRAME_BYTES = 32 << 20  # the largest frame any message type may have (a 32k-tensor layout)
MAX_NAME_CHARS = 512
MAX_ENTRIES = 1 << 15  # tensors in one slab layout
MAX_ADAPTERS_LISTED = 4096
NAME = Str(MAX_NAME_CHARS)
SLAB_ID = Str(128)
DIGEST = Bytes(exact=16)
#: A store's epoch (``store.new_epoch``); "" from a server that names none (a client pinned to an epoch refuses it).
EPOCH = Str(16, allow_empty=True)
CONFIG = Tree(max_depth=8, max_nodes=4096)
#: One layout entry: [name, dtype, shape, offset, nbytes]; semantic checks are in ``layout.SlabLayout.from_wire``.
ENTRY = Tuple(NAME, Str(32), ListOf(Int(0, 1 << 62), 8), Int(0, 1 << 62), Int(0, 1 << 62))
ENTRIES = ListOf(ENTRY, MAX_ENTRIES)

# --------------------------------------------------------------------------------------------
# slab handles (what an importer needs to open a slab; see backends/)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSlot:
    """Where the exporter counts reuses of a slab: 8 bytes at ``slot * 8`` of a sealed memfd the
    exporter process ``pid`` holds as ``fd`` (opened by importers as ``/proc/<pid>/fd/<fd>``)."""

    pid: int = wire(Int(1, 1 << 31))
    fd: int = wire(Int(0, 1 << 20))
    slot: int = wire(Int(0, 1 << 20))
    table: str = wire(Str(64))  # the memfd's name: an fd number is reused when a store closes and another opens


@dataclass(frozen=True)
class CpuSlabHandle:
    """A CPU slab: a sealed (cannot shrink or grow) memfd that process ``pid`` holds as ``fd``.

    Importers open ``/proc/<pid>/fd/<fd>`` read-only and check owner, seals, size and name on the
    opened descriptor. No file name exists to race for, and the memory goes when the exporter goes.
    """

    slab_id: str = wire(SLAB_ID)
    nbytes: int = wire(Int(1))
    pid: int = wire(Int(1, 1 << 31))
    fd: int = wire(Int(0, 1 << 20))
    generation: GenerationSlot | None = wire(Optional(Struct(GenerationSlot)), default=None)
    #: one-time token for the descriptor channel (fdchannel.py): the memfd (and the generation table)
    #: by SCM_RIGHTS, across pid namespaces; without one, importers open ``path``
    token: bytes | None = wire(Optional(Bytes(exact=16)), default=None)
    TAG: ClassVar[str] = "cpu"

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"


@dataclass(frozen=True)
class CudaSlabHandle:
    """A CUDA IPC slab: the fields of ``reduce_tensor`` (torch's own sharing) plus the GPU UUID.

    The storage fields are those of ``torch.multiprocessing.reductions.rebuild_cuda_tensor``.
    ``ready_event`` is the handle of the interprocess event recorded after every pack into this slab.
    """

    slab_id: str = wire(SLAB_ID)
    nbytes: int = wire(Int(1))
    device_uuid: str = wire(Str(64))
    storage_handle: bytes = wire(Bytes(1024))
    storage_size_bytes: int = wire(Int(1))
    storage_offset_bytes: int = wire(Int(0))
    ref_counter_handle: bytes = wire(Bytes(1024))
    ref_counter_offset: int = wire(Int(0))
    event_handle: bytes = wire(Bytes(256))
    event_sync_required: bool = wire(Bool())
    ready_event: bytes = wire(Bytes(256))
    generation: GenerationSlot | None = wire(Optional(Struct(GenerationSlot)), default=None)
    TAG: ClassVar[str] = "cuda"


@dataclass(frozen=True)
class VmmSlabHandle:
    """A CUDA VMM slab (backends/vmm.py): one ``cuMemCreate`` allocation exported as a POSIX descriptor,
    which travels by the descriptor channel only (``token``, fdchannel.py). ``ready_event`` as for CUDA IPC."""

    slab_id: str = wire(SLAB_ID)
    nbytes: int = wire(Int(1))
    device_uuid: str = wire(Str(64))
    ready_event: bytes = wire(Bytes(256))
    generation: GenerationSlot | None = wire(Optional(Struct(GenerationSlot)), default=None)
    token: bytes | None = wire(Optional(Bytes(exact=16)), default=None)
    TAG: ClassVar[str] = "vmm"


SlabHandle = CpuSlabHandle | CudaSlabHandle | VmmSlabHandle
SLAB_HANDLE = Tagged("backend", {c.TAG: c for c in (CpuSlabHandle, CudaSlabHandle, VmmSlabHandle)})

# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------

MESSAGE_TYPES: dict[str, type[Message]] = {}


class Message:
    """Base of all wire messages: dataclasses whose fields declare their wire spec with ``wire()``."""

    TYPE: ClassVar[str]
    MAX_FRAME: ClassVar[int] = 4 << 10

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "TYPE" in cls.__dict__:
            MESSAGE_TYPES[cls.TYPE] = cls


@dataclass(frozen=True)
class ListRequest(Message):
    TYPE: ClassVar[str] = "list"
    MAX_FRAME: ClassVar[int] = 256


@dataclass(frozen=True)
class AdapterSummary:
    name: str = wire(NAME)
    versions: list[int] = wire(ListOf(Int(1), 1024))
    nbytes: int = wire(Int(0))


@dataclass(frozen=True)
class ListReply(Message):
    adapters: list[AdapterSummary] = wire(ListOf(Struct(AdapterSummary), MAX_ADAPTERS_LISTED))
    epoch: str = wire(EPOCH, default="")  # the store's epoch: its version numbers mean these bytes only in it
    left_out: int = wire(Int(0), default=0)  # adapters not listed (the server bounds a reply in bytes)
    TYPE: ClassVar[str] = "list_reply"
    MAX_FRAME: ClassVar[int] = 8 << 20


@dataclass(frozen=True)
class FetchRequest(Message):
    """Lease ``version`` (newest when None) of ``name`` (of store epoch ``epoch`` when not None).

    ``known_slabs`` / ``known_layouts`` / ``known_configs`` list what the client has cached, so the
    reply can leave out the slab handle, the per-tensor layout (names, dtypes, shapes) and the LoRA
    config when the client already has them: a steady-state reply is a few scalars.
    ``transport="host"`` asks for the version staged in host shared memory (the fallback where CUDA
    IPC cannot be imported); the exporter stages each version at most once.
    """

    name: str = wire(NAME)
    version: int | None = wire(Optional(Int(1)))
    client_id: str = wire(Str(128))
    known_slabs: list[str] = wire(ListOf(SLAB_ID, 64), default_factory=list)
    known_layouts: list[bytes] = wire(ListOf(DIGEST, 64), default_factory=list)
    known_configs: list[bytes] = wire(ListOf(DIGEST, 16), default_factory=list)
    transport: str = wire(Choice("device", "host"), default="device")  # host: a host-staged copy of a GPU slab
    epoch: str | None = wire(Optional(EPOCH), default=None)  # refuse (StaleEpoch) unless the store's epoch is this
    TYPE: ClassVar[str] = "fetch"
    MAX_FRAME: ClassVar[int] = 24 << 10


@dataclass(frozen=True)
class FetchReply(Message):
    """A leased version. ``slab`` / ``entries`` / ``peft_config`` are None when the request said the
    client knows them (by slab id, layout digest, config digest).

    ``generation`` is the slab's reuse count when this version was packed into it; the client checks
    it again after its copy (see ``GenerationSlot``): a changed count means the copy may be torn.
    """

    name: str = wire(NAME)
    version: int = wire(Int(1))
    lease_id: int = wire(Int(1))
    config_digest: bytes = wire(DIGEST)
    peft_config: dict | None = wire(Optional(CONFIG))
    slab_id: str = wire(SLAB_ID)
    slab: SlabHandle | None = wire(Optional(SLAB_HANDLE))
    generation: int = wire(Int(0))
    layout_digest: bytes = wire(DIGEST)
    entries: list | None = wire(Optional(ENTRIES))
    used_bytes: int = wire(Int(0))
    live_slabs: list[str] = wire(ListOf(SLAB_ID, 4096))
    epoch: str = wire(EPOCH, default="")
    TYPE: ClassVar[str] = "fetch_reply"
    MAX_FRAME: ClassVar[int] = MAX_FRAME_BYTES


@dataclass(frozen=True)
class ReleaseRequest(Message):
    """Drop a lease. ``fetch_ms`` is the client's own measure of the fetch (request sent -> bytes owned),
    which the server aggregates into its swap-latency histogram; 0 when unknown."""

    lease_id: int = wire(Int(1))
    fetch_ms: float = wire(Float(0.0, 1e9), default=0.0)
    TYPE: ClassVar[str] = "release"
    MAX_FRAME: ClassVar[int] = 128


@dataclass(frozen=True)
class ReleaseReply(Message):
    lease_id: int = wire(Int(1))
    TYPE: ClassVar[str] = "release_reply"
    MAX_FRAME: ClassVar[int] = 128


@dataclass(frozen=True)
class PublishRequest(Message):
    """Ask a daemon to take its own copy of a slab the sender exported, as a new version of ``name``."""

    name: str = wire(NAME)
    peft_config: dict = wire(CONFIG)
    slab: SlabHandle = wire(SLAB_HANDLE)
    entries: list = wire(ENTRIES)
    used_bytes: int = wire(Int(0))
    TYPE: ClassVar[str] = "publish"
    MAX_FRAME: ClassVar[int] = MAX_FRAME_BYTES


@dataclass(frozen=True)
class PublishReply(Message):
    name: str = wire(NAME)
    version: int = wire(Int(1))
    TYPE: ClassVar[str] = "publish_reply"
    MAX_FRAME: ClassVar[int] = 1 << 10


@dataclass(frozen=True)
class StatusRequest(Message):
    TYPE: ClassVar[str] = "status"
    MAX_FRAME: ClassVar[int] = 256


@dataclass(frozen=True)
class StatusReply(Message):
    """Operator view. ``report`` is a JSON-like tree (see ``store.AdapterStore.status``)."""

    report: dict = wire(Tree(max_depth=8, max_nodes=1 << 17))
    TYPE: ClassVar[str] = "status_reply"
    MAX_FRAME: ClassVar[int] = 8 << 20


@dataclass(frozen=True)
class ErrorReply(Message):
    error: str = wire(Str(64))
    message: str = wire(Str(4000, allow_empty=True))
    TYPE: ClassVar[str] = "error"
    MAX_FRAME: ClassVar[int] = 8 << 10

    @classmethod
    def from_error(cls, exc: LoraIpcError) -> ErrorReply:
        name = type(exc).__name__ if type(exc).__name__ in WIRE_ERRORS else "LoraIpcError"
        return cls(name, str(exc)[:4000])

    def to_exception(self) -> LoraIpcError:
        return WIRE_ERRORS.get(self.error, LoraIpcError)(self.message)


REQUEST_TYPES = frozenset(c.TYPE for c in (ListRequest, FetchRequest, ReleaseRequest, PublishRequest, StatusRequest))
REPLY_TYPES = frozenset(c.TYPE for c in (ListReply, FetchReply, ReleaseReply, PublishReply, StatusReply, ErrorReply))

# --------------------------------------------------------------------------------------------
# framing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    request_id: int
    message: Message = field()


def encode(message: Message, request_id: int = 0) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, message.TYPE, request_id, Struct(type(message)).encode(message)],
                         use_bin_type=True)


def decode(data: bytes, accept: frozenset[str] | None = None) -> Frame:
    """Decode and validate one frame whose type is in ``accept``. Raises ProtocolError for anything else.

    Frames up to ``SMALL_FRAME`` bytes are built by C msgpack and then checked (``Spec.check``);
    larger ones are walked as a stream (``Spec.read``). Both apply the same specs.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame too large or not bytes ({len(data) if hasattr(data, '__len__') else '?'} bytes)")
    if len(data) <= SMALL_FRAME:
        raw = unpack_small(data)
        if type(raw) is not list or len(raw) != 4:
            raise ProtocolError("frame must be an array [protocol_version, type, request_id, body]")
        cls, request_id = _header(raw[0], raw[1], raw[2], accept, len(data))
        return _body(cls, request_id, lambda: Struct(cls).check(raw[3], "body"))
    r = Reader(data)
    if r.array("frame", 4) != 4:
        raise ProtocolError("frame must be an array [protocol_version, type, request_id, body]")
    cls, request_id = _header(r.scalar("protocol_version"), r.scalar("type"), r.scalar("request_id"), accept,
                              len(data))

    def read_all():
        message = Struct(cls).read(r, "body")
        if not r.at_end():
            raise ProtocolError("trailing bytes after the frame")
        return message

    return _body(cls, request_id, read_all)


def _header(version: Any, type_name: Any, request_id: Any, accept: frozenset[str] | None,
            nbytes: int) -> tuple[type[Message], int]:
    """Check a frame's header; errors carry the request id as soon as it could be read."""
    if type(request_id) is not int or not 0 <= request_id < (1 << 63):
        raise ProtocolError("request_id must be a non-negative integer")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r:.20} not supported (this side speaks {PROTOCOL_VERSION})",
                            request_id)
    cls = MESSAGE_TYPES.get(type_name) if type(type_name) is str else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_name!r:.40}", request_id)
    if accept is not None and type_name not in accept:
        raise ProtocolError(f"{type_name} is not accepted here", request_id)
    if nbytes > cls.MAX_FRAME:
        raise ProtocolError(f"{type_name} frame of {nbytes} bytes exceeds its limit of {cls.MAX_FRAME}", request_id)
    return cls, request_id


def _body(cls: type[Message], request_id: int, decode_body) -> Frame:
    try:
        return Frame(request_id, decode_body())
    except ProtocolError as exc:
        raise ProtocolError(f"invalid {cls.TYPE} message: {exc}", request_id) from None
    except Exception as exc:  # a bug in a check must still come out typed
        raise ProtocolError(f"invalid {cls.TYPE} message: {type(exc).__name__}: {exc}", request_id) from None
