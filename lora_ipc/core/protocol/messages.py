"""The ZeroMQ messages, declared once as msgspec Structs (docs/reference/wire.md).

A frame (framing.py) is a msgpack array ``[PROTOCOL_VERSION, type_name, request_id, body]``. ``body`` is a
map whose keys are the message's field names (a :class:`msgspec.Struct` per message type). Every field's
type carries its bounds (fields.py), unknown keys are refused (``forbid_unknown_fields``), and each
message type has its own frame-size limit (``MAX_FRAME``).

What moves is a *tensor set*: a named, versioned set of tensors with a config (a LoRA config for an
adapter, empty for a refit bucket).

=====================  ===================  ==========================================
request                reply                purpose
=====================  ===================  ==========================================
``ListRequest``        ``ListReply``        tensor sets and their kept versions
``FetchRequest``       ``FetchReply``       lease a version, get handle + layout
``ReleaseRequest``     ``ReleaseReply``     drop a lease (the client sends it, and does not wait)
``FetchNote``          ``FetchNoteReply``   a fetch made from the newest-version board (sent, not waited for)
``PublishRequest``     ``PublishReply``     a remote trainer asks a daemon to copy a slab in
``StatusRequest``      ``StatusReply``      operator view: versions, leases, metrics
any                    ``ErrorReply``       typed error, named by its code (tags.py)
=====================  ===================  ==========================================

Bodies and handles are maps, a handle's ``backend`` tag comes first, layout entries are 5-item arrays.
"""

import hashlib
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta, Struct

from ..errors import LoraIpcError
from .fields import (
    ByteOffset,
    Config,
    Count,
    Digest,
    Epoch,
    Name,
    Number,
    Pid,
    Positive,
    SlabId,
    Token,
    check_tree,
)
from .limits import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_NODES,
    MAX_DIMS,
    MAX_ENTRIES,
    MAX_ERROR_CHARS,
    MAX_ERROR_CODE_CHARS,
    MAX_FRAME_BYTES,
    MAX_KNOWN,
    MAX_KNOWN_CONFIGS,
    MAX_LIVE_SLABS,
    MAX_NOTED_FETCHES,
    MAX_SETS_LISTED,
    MAX_STATUS_LEASES,
    MAX_VERSIONS_LISTED,
)
from .tables import MAX_GENERATION_SLOT, MAX_TABLE_NAME_CHARS
from .tags import code_of, from_code

PROTOCOL_VERSION = 3


def digest_of(obj: object) -> bytes:
    """16-byte digest of a msgpack-able value (layouts and configs are cached by it)."""
    return hashlib.blake2b(msgspec.msgpack.encode(obj), digest_size=16).digest()


class WireStruct(Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every Struct that crosses a process boundary: immutable, unknown keys refused."""


# --------------------------------------------------------------------------------------------
# layout entries and slab handles (what an importer needs to open a slab; see backends/)
# --------------------------------------------------------------------------------------------


class LayoutEntry(WireStruct, frozen=True, array_like=True):
    """One tensor of a slab layout, on the wire ``[name, dtype, shape, offset, nbytes]``. Types and bounds
    only: the geometry (dtype allow-list, alignment, overlap, byte counts) is ``layout.SlabLayout.from_wire``."""

    name: Name
    dtype: Annotated[str, Meta(min_length=1, max_length=32)]
    shape: Annotated[tuple[ByteOffset, ...], Meta(max_length=MAX_DIMS)]
    offset: ByteOffset
    nbytes: ByteOffset


Entries = Annotated[list[LayoutEntry], Meta(max_length=MAX_ENTRIES)]


class GenerationSlot(WireStruct, frozen=True):
    """Where the exporter counts reuses of a slab: counter ``slot`` of the generation table (tables.py), a
    sealed memfd named ``table``. Its descriptor comes by the descriptor channel with the slab's token (from
    the process serving the endpoint, checked by the channel's peer credentials, fdchannel.py); the importer
    checks that what came is the memfd ``table`` (shm.check_sealed)."""

    slot: Annotated[int, Meta(ge=0, le=MAX_GENERATION_SLOT)]
    # the memfd's name: checked on the descriptor that came (a closed store's table is never another's)
    table: Annotated[str, Meta(min_length=1, max_length=MAX_TABLE_NAME_CHARS)]


class _Handle(WireStruct, frozen=True, tag_field="backend"):
    """A slab handle: a map whose first key, ``backend``, names the class (``TAG``).

    What a kind of handle can do is declared here, not probed: ``PASSES_DESCRIPTOR`` says whether its
    slab's memory travels by the descriptor channel (fdchannel.py). ``channel_token`` is the one-time token
    that redeems, at the server's descriptor channel, the slab's descriptor (where it passes one) and its
    generation table's (where it has a slot): every descriptor an importer uses comes that way."""

    PASSES_DESCRIPTOR: ClassVar[bool] = False

    @property
    def channel_token(self) -> bytes | None:
        """The one-time token that redeems this slab's descriptors at its server's descriptor channel."""
        return None


#: the token of a CPU handle no server has attached one to yet (a slab's own handle): never valid on the wire
NO_TOKEN = b""


class CpuSlabHandle(_Handle, frozen=True, tag="cpu"):
    """A CPU slab: a sealed (cannot shrink or grow) memfd named ``lora-ipc.<slab_id>``.

    Its descriptor travels only by the descriptor channel: ``token`` (required) redeems it there, with the
    generation table's, from the process the kernel reports for the endpoint (fdchannel.py). The importer
    checks name, owner, seals, size and reservation on the descriptor it received before it reads
    anything. No file name exists to race for, and the memory goes when the exporter goes.
    """

    slab_id: SlabId
    nbytes: Positive
    #: one-time token for the descriptor channel: the memfd (and the generation table) by SCM_RIGHTS
    token: Token
    generation: GenerationSlot | None = None
    TAG: ClassVar[str] = "cpu"
    PASSES_DESCRIPTOR: ClassVar[bool] = True

    @property
    def channel_token(self) -> bytes | None:
        return self.token or None


class CudaSlabHandle(_Handle, frozen=True, tag="cuda"):
    """A CUDA IPC slab: the fields of ``reduce_tensor`` (torch's own sharing) plus the GPU UUID.

    The storage fields are those of ``torch.multiprocessing.reductions.rebuild_cuda_tensor``.
    ``ready_event`` is the handle of the interprocess event recorded after every pack into this slab.
    """

    slab_id: SlabId
    nbytes: Positive
    device_uuid: Annotated[str, Meta(min_length=1, max_length=64)]
    storage_handle: Annotated[bytes, Meta(max_length=1024)]
    storage_size_bytes: Positive
    storage_offset_bytes: Count
    ref_counter_handle: Annotated[bytes, Meta(max_length=1024)]
    ref_counter_offset: Count
    event_handle: Annotated[bytes, Meta(max_length=256)]
    event_sync_required: bool
    ready_event: Annotated[bytes, Meta(max_length=256)]
    generation: GenerationSlot | None = None
    #: one-time token that redeems the generation table's descriptor (the slab's memory travels as the
    #: IPC handle above); present whenever ``generation`` is
    token: Token | None = None
    TAG: ClassVar[str] = "cuda"

    @property
    def channel_token(self) -> bytes | None:
        return self.token


class VmmSlabHandle(_Handle, frozen=True, tag="vmm"):
    """A CUDA VMM slab (backends/vmm.py): one ``cuMemCreate`` allocation exported as a POSIX descriptor,
    which travels by the descriptor channel only (``token``, fdchannel.py). ``ready_event`` as for CUDA IPC."""

    slab_id: SlabId
    nbytes: Positive
    device_uuid: Annotated[str, Meta(min_length=1, max_length=64)]
    ready_event: Annotated[bytes, Meta(max_length=256)]
    generation: GenerationSlot | None = None
    token: Token | None = None
    TAG: ClassVar[str] = "vmm"
    PASSES_DESCRIPTOR: ClassVar[bool] = True

    @property
    def channel_token(self) -> bytes | None:
        return self.token


SlabHandle = CpuSlabHandle | CudaSlabHandle | VmmSlabHandle

# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------

MESSAGE_TYPES: dict[str, type["Message"]] = {}


class Message(WireStruct, frozen=True):
    """Base of all wire messages. ``TYPE`` names the class on the wire; ``MAX_FRAME`` bounds its frames;
    ``TREES`` maps each tree-valued field to its (max encoded bytes, max nodes)."""

    TYPE: ClassVar[str]
    MAX_FRAME: ClassVar[int] = 4 << 10
    TREES: ClassVar[dict[str, tuple[int, int]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "TYPE" in cls.__dict__:
            MESSAGE_TYPES[cls.TYPE] = cls

    def __post_init__(self):
        for name, (_, max_nodes) in self.TREES.items():
            value = getattr(self, name)
            if value is not None:
                check_tree(value, max_nodes, name)


class ListRequest(Message, frozen=True, omit_defaults=True):
    """The catalog; with ``name``, only that name's entry (none if it was never published): a full list
    is cut to ``MAX_LISTED_BYTES`` on the server (``ListReply.left_out``), a named one never is. Without
    ``name`` the request is the empty map it always was."""

    name: Name | None = None
    TYPE: ClassVar[str] = "list"
    MAX_FRAME: ClassVar[int] = 4 << 10  # a name of MAX_NAME_CHARS 4-byte characters


class TensorSetSummary(WireStruct, frozen=True):
    name: Name
    versions: Annotated[list[Positive], Meta(max_length=MAX_VERSIONS_LISTED)]
    nbytes: Count


class ListReply(Message, frozen=True):
    sets: Annotated[list[TensorSetSummary], Meta(max_length=MAX_SETS_LISTED)]
    epoch: Epoch  # the store's epoch: its version numbers mean these bytes only in it
    left_out: Count = 0  # names not listed (the server bounds a reply in bytes)
    TYPE: ClassVar[str] = "list_reply"
    MAX_FRAME: ClassVar[int] = 8 << 20


class FetchRequest(Message, frozen=True):
    """Lease ``version`` (newest when None) of ``name`` (of store epoch ``epoch`` when not None).

    ``known_slabs`` / ``known_layouts`` / ``known_configs`` list what the client has cached, so the
    reply can leave out the slab handle, the per-tensor layout (names, dtypes, shapes) and the
    config when the client already has them: a steady-state reply is a few scalars.
    ``transport="host"`` asks for the version staged in host shared memory (the fallback where CUDA
    IPC cannot be imported); the exporter stages each version at most once.
    """

    name: Name
    version: Positive | None
    client_id: Annotated[str, Meta(min_length=1, max_length=128)]
    known_slabs: Annotated[list[SlabId], Meta(max_length=MAX_KNOWN)] = []
    known_layouts: Annotated[list[Digest], Meta(max_length=MAX_KNOWN)] = []
    known_configs: Annotated[list[Digest], Meta(max_length=MAX_KNOWN_CONFIGS)] = []
    transport: Literal["device", "host"] = "device"  # host: a host-staged copy of a GPU slab
    epoch: Epoch | None = None  # refuse (StaleEpoch) unless the store's epoch is this
    TYPE: ClassVar[str] = "fetch"
    MAX_FRAME: ClassVar[int] = 24 << 10


class FetchReply(Message, frozen=True):
    """A leased version. ``slab`` / ``entries`` / ``config`` are None when the request said the
    client knows them (by slab id, layout digest, config digest).

    ``generation`` is the slab's reuse count when this version was packed into it; the client checks
    it again after its copy (see ``GenerationSlot``): a changed count means the copy may be torn.
    """

    name: Name
    version: Positive
    lease_id: Positive
    config_digest: Digest
    config: Config | None
    slab_id: SlabId
    slab: SlabHandle | None
    generation: Count
    layout_digest: Digest
    entries: Entries | None
    used_bytes: Count
    live_slabs: Annotated[list[SlabId], Meta(max_length=MAX_LIVE_SLABS)]
    epoch: Epoch
    # where the name's newest-version board entry lies in the slab's generation table (tables.py): a client that
    # holds what an entry names fetches the next version from it without a request (None: no board)
    board_entry: ByteOffset | None = None
    TYPE: ClassVar[str] = "fetch_reply"
    MAX_FRAME: ClassVar[int] = MAX_FRAME_BYTES
    TREES: ClassVar[dict[str, tuple[int, int]]] = {"config": (MAX_CONFIG_BYTES, MAX_CONFIG_NODES)}


class ReleaseRequest(Message, frozen=True):
    """Drop a lease. ``fetch_ms`` is the client's own measure of the fetch (request sent -> bytes owned),
    which the server aggregates into its swap-latency histogram; 0 when unknown."""

    lease_id: Positive
    fetch_ms: Annotated[float, Meta(ge=0.0, le=1e9)] = 0.0
    TYPE: ClassVar[str] = "release"
    MAX_FRAME: ClassVar[int] = 128


class ReleaseReply(Message, frozen=True):
    lease_id: Positive
    TYPE: ClassVar[str] = "release_reply"
    MAX_FRAME: ClassVar[int] = 128


class BoardFetch(WireStruct, frozen=True, array_like=True):
    """One fetch made from the newest-version board, on the wire ``[name, version, fetch_ms]``: the version copied
    and the client's own measure of it (board read -> bytes owned)."""

    name: Name
    version: Positive
    fetch_ms: Annotated[float, Meta(ge=0.0, le=1e9)]


class FetchNote(Message, frozen=True):
    """Fetches a client made from the newest-version board of store ``epoch``, without a request, since its last
    note: one note per batch (at most ``MAX_NOTED_FETCHES``; sent once a second or per batch while it fetches, and
    before its next request), not waited for. The server counts them in its fetch metrics and answers
    ``FetchNoteReply``; a note of another epoch (a store since closed or replaced) is refused (``StaleEpoch``)."""

    epoch: Epoch
    fetches: Annotated[list[BoardFetch], Meta(min_length=1, max_length=MAX_NOTED_FETCHES)]
    TYPE: ClassVar[str] = "fetch_note"
    MAX_FRAME: ClassVar[int] = 160 << 10  # 64 fetches of names of up to 512 characters


class FetchNoteReply(Message, frozen=True):
    counted: Count
    TYPE: ClassVar[str] = "fetch_note_reply"
    MAX_FRAME: ClassVar[int] = 128


class PublishRequest(Message, frozen=True):
    """Ask a daemon to take its own copy of a slab the sender exported, as a new version of ``name``."""

    name: Name
    config: Config
    slab: SlabHandle
    entries: Entries
    used_bytes: Count
    TYPE: ClassVar[str] = "publish"
    MAX_FRAME: ClassVar[int] = MAX_FRAME_BYTES
    TREES: ClassVar[dict[str, tuple[int, int]]] = {"config": (MAX_CONFIG_BYTES, MAX_CONFIG_NODES)}


class PublishReply(Message, frozen=True):
    name: Name
    version: Positive
    TYPE: ClassVar[str] = "publish_reply"
    MAX_FRAME: ClassVar[int] = 1 << 10


class StatusRequest(Message, frozen=True):
    TYPE: ClassVar[str] = "status"
    MAX_FRAME: ClassVar[int] = 256


class VersionStatus(WireStruct, frozen=True):
    name: Name
    version: Positive
    bytes: Count
    tensors: Count
    leases: Count
    retiring: bool
    published_at: Number


class LeaseStatus(WireStruct, frozen=True):
    lease_id: Positive
    name: Name
    version: Positive
    # the client's id, or its connection's routing id in hex
    holder: Annotated[str, Meta(min_length=0, max_length=1024)]
    expires_in_s: Number


class SlabStatus(WireStruct, frozen=True):
    live: Count
    free: Count
    bytes: Count


class LatencyStatus(WireStruct, frozen=True):
    """A Prometheus-style histogram: counts per upper bound in ms (the last bound is "+Inf")."""

    buckets_ms: Annotated[list[Number | Literal["+Inf"]], Meta(max_length=64)]
    counts: Annotated[list[Count], Meta(max_length=64)]
    sum_ms: Number
    count: Count


class MetricsStatus(WireStruct, frozen=True):
    publishes: Count
    fetches: Count
    board_fetches: Count  # of ``fetches``: made from the newest-version board (FetchNote)
    bytes_published: Count
    bytes_served: Count
    leases_expired: Count
    leases_revoked: Count
    host_stagings: Count
    errors: Count
    errors_by_type: Annotated[dict[Annotated[str, Meta(min_length=1, max_length=64)], Count], Meta(max_length=1024)]
    slabs_allocated: Count
    fetch_latency: LatencyStatus
    publish_latency: LatencyStatus


class ServerStatus(WireStruct, frozen=True):
    """The server's connections (see guard.py), added by the server to a status report."""

    connections: Count
    connection_cap: Count
    peak_connections: Count
    dropped_connections: Count
    requests: Count


class StatusReport(WireStruct, frozen=True):
    """The operator view: what ``TensorSetStore.status`` returns, plus ``endpoint``/``pid``/``server`` from
    the server. Read by the CLI, the Prometheus exporter and the daemon."""

    uptime_s: Number
    epoch: Epoch
    keep: Count
    # bounded in bytes when asked (the server does)
    versions: Annotated[list[VersionStatus], Meta(max_length=MAX_SETS_LISTED)]
    versions_left_out: Count  # versions not listed in ``versions``
    lease_count: Count
    leases: Annotated[list[LeaseStatus], Meta(max_length=MAX_STATUS_LEASES)]
    limits: Annotated[dict[Annotated[str, Meta(min_length=1, max_length=64)], Count], Meta(max_length=64)]
    slabs: SlabStatus
    metrics: MetricsStatus
    endpoint: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    pid: Pid | None = None
    server: ServerStatus | None = None


class StatusReply(Message, frozen=True):
    """Operator view (see :class:`StatusReport`)."""

    report: StatusReport
    TYPE: ClassVar[str] = "status_reply"
    MAX_FRAME: ClassVar[int] = 8 << 20


class ErrorReply(Message, frozen=True):
    """A typed error: ``error`` is its code (a class name, tags.py), ``message`` its text."""

    error: Annotated[str, Meta(min_length=1, max_length=MAX_ERROR_CODE_CHARS)]
    message: Annotated[str, Meta(min_length=0, max_length=MAX_ERROR_CHARS)]
    TYPE: ClassVar[str] = "error"
    MAX_FRAME: ClassVar[int] = 8 << 10

    @classmethod
    def from_error(cls, exc: LoraIpcError) -> "ErrorReply":
        return cls(code_of(exc), str(exc)[:MAX_ERROR_CHARS])

    def to_exception(self) -> LoraIpcError:
        return from_code(self.error)(self.message)


REQUEST_TYPES = frozenset(
    c.TYPE for c in (ListRequest, FetchRequest, ReleaseRequest, FetchNote, PublishRequest, StatusRequest)
)
REPLY_TYPES = frozenset(
    c.TYPE for c in (ListReply, FetchReply, ReleaseReply, FetchNoteReply, PublishReply, StatusReply, ErrorReply)
)
