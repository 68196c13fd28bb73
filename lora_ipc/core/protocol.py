"""Wire protocol: the contract declared once, as msgspec Structs, and the msgpack framing around it.

A frame is a msgpack array ``[PROTOCOL_VERSION, type_name, request_id, body]``. ``body`` is a map
whose keys are the message's fields (a :class:`msgspec.Struct` per message type). Every field's type
carries its bounds (``msgspec.Meta``: string, bytes and array lengths, integer ranges), unknown keys
are refused (``forbid_unknown_fields``), and msgspec checks each container's declared length before it
builds anything, so a frame costs no more to refuse than the largest legal message of its type costs
to accept. Each message type also has its own frame-size limit (``MAX_FRAME``); the only untyped
values (a tensor set's config) are JSON-like trees of bounded depth, bytes and node count. Nothing here
pickles and nothing here imports torch.

What moves is a *tensor set*: a named, versioned set of tensors with a config (a LoRA config for an
adapter, empty for a refit bucket). A few keys keep the names protocol version 2 gave them when it moved
adapters only: a field declared ``config = field(name="peft_config")`` is ``config`` in Python and
``peft_config`` on the wire (likewise ``sets``/``versions`` for ``adapters``).

Requests (client -> server) and their replies:

=====================  ===================  ==========================================
request                reply                purpose
=====================  ===================  ==========================================
``ListRequest``        ``ListReply``        tensor sets and their kept versions
``FetchRequest``       ``FetchReply``       lease a version, get handle + layout
``ReleaseRequest``     ``ReleaseReply``     drop a lease (the client sends it, and does not wait)
``PublishRequest``     ``PublishReply``     a remote trainer asks a daemon to copy a slab in
``StatusRequest``      ``StatusReply``      operator view: versions, leases, metrics
any                    ``ErrorReply``       typed error, named by class
=====================  ===================  ==========================================

The on-wire shape is the one protocol version 2 always had (any msgpack peer can speak it): bodies
and handles are maps, a handle's ``backend`` tag comes first, layout entries are 5-item arrays.
"""

import functools
import hashlib
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta, Raw, Struct

from .errors import WIRE_ERRORS, LoraIpcError, ProtocolError, wire_error

PROTOCOL_VERSION = 2

# --------------------------------------------------------------------------------------------
# limits: the one place they are set (layout.py, imports.py and the refit plans read them from here)
# --------------------------------------------------------------------------------------------

MAX_FRAME_BYTES = 32 << 20  # the largest frame any message type may have (a 32k-tensor layout)
SMALL_FRAME = 64 << 10  # a frame up to this size is decoded in one pass (it holds at most this many values)
MAX_NAME_CHARS = 512
MAX_ENTRIES = 1 << 15  # tensors in one slab layout
MAX_DIMS = 8  # dimensions of one tensor
MAX_KNOWN = 64  # slab ids / layout digests a fetch request may list
MAX_KNOWN_CONFIGS = 16
MAX_VERSIONS_LISTED = 1024
MAX_SETS_LISTED = 4096
MAX_LIVE_SLABS = 4096
MAX_BYTE_OFFSET = 1 << 62
MAX_CONFIG_NODES = 4096
MAX_STATUS_LEASES = 100  # leases listed one by one in a status report (all are counted)
MAX_TREE_DEPTH = 8
MAX_TREE_CHARS = 4096
#: encoded bytes of one tree in a frame over SMALL_FRAME (checked before the tree is built: a frame of
#: nested empty arrays would otherwise cost a Python object per byte)
MAX_CONFIG_BYTES = 1 << 20
_I64 = (1 << 63) - 1


def digest_of(obj: Any) -> bytes:
    """16-byte digest of a msgpack-able value (layouts and configs are cached by it)."""
    return hashlib.blake2b(msgspec.msgpack.encode(obj), digest_size=16).digest()


# --------------------------------------------------------------------------------------------
# field types
# --------------------------------------------------------------------------------------------

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]


@wire_error
class BadName(LoraIpcError, ValueError):
    """A name refused at publish: see :func:`check_name`."""


#: the end of a pinned model name, ``<name>@v<N>``: vLLM's OpenAI server reads ``"exp@v2"`` as version 2 of
#: ``exp`` (``lora_ipc.vllm.resolver``), so no tensor set may be published under a name that ends like this
PINNED_SUFFIX = re.compile(r"@v[0-9]+\Z")


def check_name(name: object) -> str:
    """``name`` when it may be published; else ``BadName`` saying why. The rules (docs/guides/naming.md): a str of
    1 to ``MAX_NAME_CHARS`` characters that is valid UTF-8 (no lone surrogates: it must cross the wire and a
    ``lora-ipc://`` URI), and does not end in ``@v<digits>`` (it would read as a pinned version)."""
    if type(name) is not str:
        raise BadName(f"a name is a str, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise BadName(f"a name has 1 to {MAX_NAME_CHARS} characters, not {len(name)}")
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise BadName(f"{name!r:.80} is not valid UTF-8 (a lone surrogate)") from None
    pinned = PINNED_SUFFIX.search(name)
    if pinned:
        raise BadName(
            f"{name!r:.80} ends in '@v<digits>', which reads as a pinned version of "
            f"{name[: pinned.start()]!r:.80} (docs/guides/naming.md); choose another name"
        )
    return name


SlabId = Annotated[str, Meta(min_length=1, max_length=128)]
Digest = Annotated[bytes, Meta(min_length=16, max_length=16)]
Token = Annotated[bytes, Meta(min_length=16, max_length=16)]
#: A store's epoch (``store.new_epoch``); "" from a server that names none (a client pinned to an epoch refuses it).
Epoch = Annotated[str, Meta(min_length=0, max_length=16)]
Positive = Annotated[int, Meta(ge=1, le=_I64)]
Count = Annotated[int, Meta(ge=0, le=_I64)]
Pid = Annotated[int, Meta(ge=1, le=1 << 31)]
Fd = Annotated[int, Meta(ge=0, le=1 << 20)]
ByteOffset = Annotated[int, Meta(ge=0, le=MAX_BYTE_OFFSET)]
#: a float that is not NaN (which fails every comparison, so any bound refuses it) nor -inf
Number = Annotated[float, Meta(ge=-sys.float_info.max)]


def tree(depth: int = MAX_TREE_DEPTH, max_chars: int = MAX_TREE_CHARS) -> Any:
    """A JSON-like map (a LoRA adapter_config.json): str keys; None, bool, int, float (not NaN), str, arrays
    and maps as values, at most ``depth`` levels below the root (deeper is refused as it is read, before
    it is built). Node counts: :func:`check_tree`."""
    text = Annotated[str, Meta(min_length=0, max_length=max_chars)]
    scalar = None | bool | int | Number | text
    node: Any = scalar
    for _ in range(depth - 1):
        node = None | bool | int | Number | text | list[node] | dict[text, node]
    return dict[text, node]


if TYPE_CHECKING:  # built at run time, with its bounds; to a type checker, a JSON-like map
    Config = dict[str, Any]
else:
    Config = tree()


def check_tree(value: Any, max_nodes: int, where: str) -> None:
    """Refuse a tree (already typed by :func:`tree`) of more than ``max_nodes`` values."""
    budget, stack = max_nodes, [value]
    while stack:
        v = stack.pop()
        budget -= 1
        if budget < 0:
            raise ValueError(f"{where}: more than {max_nodes} values")
        if type(v) is dict:
            stack.extend(v.values())
        elif type(v) is list:
            stack.extend(v)


_FIELD_TYPES: dict[type, tuple[tuple[str, ...], Any]] = {}


def check_fields(obj: Any, what: str) -> None:
    """Check the attributes of ``obj`` (a dataclass or Struct) against its class's annotated field types
    (their ``Meta`` bounds), for classes that others construct from a peer's values (vLLM builds its init
    and update infos from dicts; Ray hands a relay a replica's metadata), so that ``__post_init__`` or
    the receiver validates with the same declarations msgspec decodes with. Raises ProtocolError naming
    the field."""
    cls = type(obj)
    names, types = _FIELD_TYPES.get(cls) or _FIELD_TYPES.setdefault(cls, _annotated_fields(cls))
    try:
        msgspec.convert(tuple(getattr(obj, n) for n in names), types, strict=True)
    except msgspec.ValidationError as exc:
        m = re.match(r"^(?P<what>.*?) - at `\$\[(?P<i>\d+)\](?P<rest>.*)`$", str(exc), re.S)
        where = f"{names[int(m['i'])]}{m['rest']}" if m else "?"
        raise ProtocolError(f"{what} {where!r}: {m['what'] if m else exc}") from None


def _annotated_fields(cls: type) -> tuple[tuple[str, ...], Any]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    if dataclasses.is_dataclass(cls):
        names = tuple(f.name for f in dataclasses.fields(cls) if f.name in hints)
    else:
        names = cls.__struct_fields__  # type: ignore[attr-defined]  # a Struct class
    return names, tuple[tuple(hints[n] for n in names)]  # type: ignore[misc]  # built at run time


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
    """Where the exporter counts reuses of a slab: 8 bytes at ``slot * 8`` of a sealed memfd the
    exporter process ``pid`` holds as ``fd`` (opened by importers as ``/proc/<pid>/fd/<fd>``)."""

    pid: Pid
    fd: Fd
    slot: Annotated[int, Meta(ge=0, le=1 << 20)]
    # the memfd's name: an fd number is reused when a store closes and another opens
    table: Annotated[str, Meta(min_length=1, max_length=64)]


class _Handle(WireStruct, frozen=True, tag_field="backend"):
    """A slab handle: a map whose first key, ``backend``, names the class (``TAG``).

    What a kind of handle can do is declared here, not probed: ``PASSES_DESCRIPTOR`` says whether its
    slab's memory may travel by the descriptor channel (fdchannel.py; such a handle has a ``token`` field),
    ``channel_token`` is the token it carries (None: open the slab without the channel)."""

    PASSES_DESCRIPTOR: ClassVar[bool] = False

    @property
    def channel_token(self) -> bytes | None:
        """The one-time token that redeems this slab's descriptors at its server's descriptor channel."""
        return None


class CpuSlabHandle(_Handle, frozen=True, tag="cpu"):
    """A CPU slab: a sealed (cannot shrink or grow) memfd that process ``pid`` holds as ``fd``.

    Importers open ``/proc/<pid>/fd/<fd>`` read-only and check owner, seals, size and name on the
    opened descriptor. No file name exists to race for, and the memory goes when the exporter goes.
    """

    slab_id: SlabId
    nbytes: Positive
    pid: Pid
    fd: Fd
    generation: GenerationSlot | None = None
    #: one-time token for the descriptor channel (fdchannel.py): the memfd (and the generation table)
    #: by SCM_RIGHTS, across pid namespaces; without one, importers open ``path``
    token: Token | None = None
    TAG: ClassVar[str] = "cpu"
    PASSES_DESCRIPTOR: ClassVar[bool] = True

    @property
    def channel_token(self) -> bytes | None:
        return self.token

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"


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
    TAG: ClassVar[str] = "cuda"


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
                check_tree(value, max_nodes, wire_name(type(self), name))


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
    sets: Annotated[list[TensorSetSummary], Meta(max_length=MAX_SETS_LISTED)] = msgspec.field(name="adapters")
    epoch: Epoch = ""  # the store's epoch: its version numbers mean these bytes only in it
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
    config: Config | None = msgspec.field(name="peft_config")
    slab_id: SlabId
    slab: SlabHandle | None
    generation: Count
    layout_digest: Digest
    entries: Entries | None
    used_bytes: Count
    live_slabs: Annotated[list[SlabId], Meta(max_length=MAX_LIVE_SLABS)]
    epoch: Epoch = ""
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


class PublishRequest(Message, frozen=True):
    """Ask a daemon to take its own copy of a slab the sender exported, as a new version of ``name``."""

    name: Name
    config: Config = msgspec.field(name="peft_config")
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
    versions: Annotated[list[VersionStatus], Meta(max_length=MAX_SETS_LISTED)] = msgspec.field(name="adapters")
    versions_left_out: Count = msgspec.field(name="adapters_left_out")  # versions not listed in ``versions``
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
    error: Annotated[str, Meta(min_length=1, max_length=64)]
    message: Annotated[str, Meta(min_length=0, max_length=4000)]
    TYPE: ClassVar[str] = "error"
    MAX_FRAME: ClassVar[int] = 8 << 10

    @classmethod
    def from_error(cls, exc: LoraIpcError) -> "ErrorReply":
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
    message: Message


_ENCODER = msgspec.msgpack.Encoder()
_Scalar = None | bool | int | float | str
_HEADER = msgspec.msgpack.Decoder(tuple[_Scalar, _Scalar, _Scalar, Raw])
_BODY = {cls: msgspec.msgpack.Decoder(cls) for cls in MESSAGE_TYPES.values()}


def encode(message: Message, request_id: int = 0) -> bytes:
    return _ENCODER.encode((PROTOCOL_VERSION, message.TYPE, request_id, message))


def decode(data: bytes, accept: frozenset[str] | None = None) -> Frame:
    """Decode and validate one frame whose type is in ``accept``. Raises ProtocolError for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_FRAME_BYTES:
        size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else "?"
        raise ProtocolError(f"frame too large or not bytes ({size} bytes)")
    header = _read_header(data) if len(data) > SMALL_FRAME else None
    body: Any  # a memoryview of a large frame's body, or msgspec's Raw of a small one's
    if header is not None:  # a large frame: its header is checked before its body is walked at all
        version, type_name, request_id, start = header
        body = memoryview(data)[start:]
    else:
        try:
            version, type_name, request_id, body = _HEADER.decode(data)
        except Exception as exc:
            _refuse_undecodable(data, accept, exc)
    cls, request_id = _header(version, type_name, request_id, accept, len(data))
    try:
        _check_keys(cls, body)
        if len(data) > SMALL_FRAME and cls.TREES:
            return Frame(request_id, _decode_large(cls, body))
        return Frame(request_id, _BODY[cls].decode(body))
    except ProtocolError as exc:
        raise ProtocolError(f"invalid {cls.TYPE} message: {exc}", request_id) from None
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {cls.TYPE} message: {_explain(str(exc))}", request_id) from None
    except Exception as exc:  # DecodeError, RecursionError: still typed, still with the request id
        raise ProtocolError(
            f"invalid {cls.TYPE} message: undecodable ({type(exc).__name__}: {exc})", request_id
        ) from None


def _refuse_undecodable(data: bytes, accept: frozenset[str] | None, exc: Exception):
    """Raise the ProtocolError for a frame msgspec could not split; with the request id if its header reads."""
    header = _read_header(data)
    if header is None:
        raise _frame_error(exc) from None
    cls, request_id = _header(*header[:3], accept, len(data))
    raise ProtocolError(f"invalid {cls.TYPE} message: undecodable ({type(exc).__name__}: {exc})", request_id) from None


def _frame_error(exc: Exception) -> ProtocolError:
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):  # DecodeError, RecursionError: garbage, truncated, trailing
        return ProtocolError(f"undecodable msgpack frame ({type(exc).__name__}: {exc})")
    if "got `ext`" in text:
        return ProtocolError(f"undecodable msgpack frame (ext types are refused): {text}")
    if re.search(r"at `\$\[[0-2]\]`$", text):
        return ProtocolError(f"frame header must hold scalars: {text}")
    return ProtocolError("frame must be an array [protocol_version, type, request_id, body]")


_SCALAR = msgspec.msgpack.Decoder(_Scalar)
#: msgpack scalars by first byte: (bytes of the length that follows, fixed payload bytes)
_SIZES = {
    0xC0: (0, 0),
    0xC2: (0, 0),
    0xC3: (0, 0),
    0xCA: (0, 4),
    0xCB: (0, 8),
    0xCC: (0, 1),
    0xCD: (0, 2),
    0xCE: (0, 4),
    0xCF: (0, 8),
    0xD0: (0, 1),
    0xD1: (0, 2),
    0xD2: (0, 4),
    0xD3: (0, 8),
    0xD9: (1, 0),
    0xDA: (2, 0),
    0xDB: (4, 0),
}


def _read_header(data: bytes) -> tuple[Any, Any, Any, int] | None:
    """The three scalars after a frame's ``0x94`` (array of 4), read one by one, and where the body starts.
    For a large frame (its limits apply before its body is walked) and for one msgspec cannot split (a
    body nested past msgspec's depth limit: the error still names the request). None if unreadable."""
    view, pos, out = memoryview(data), 1, []
    if not view or view[0] != 0x94:
        return None
    for _ in range(3):
        if pos >= len(view):
            return None
        first = view[pos]
        if first <= 0x7F or first >= 0xE0:
            size = 1
        elif 0xA0 <= first <= 0xBF:
            size = 1 + (first & 0x1F)
        elif first in _SIZES:
            nlen, fixed = _SIZES[first]
            size = 1 + nlen + fixed + int.from_bytes(view[pos + 1 : pos + 1 + nlen], "big")
        else:
            return None
        try:
            out.append(_SCALAR.decode(view[pos : pos + size]))
        except msgspec.DecodeError:
            return None
        pos += size
    return out[0], out[1], out[2], pos


def _header(
    version: Any, type_name: Any, request_id: Any, accept: frozenset[str] | None, nbytes: int
) -> tuple[type[Message], int]:
    """Check a frame's header; errors carry the request id as soon as it could be read."""
    if type(request_id) is not int or not 0 <= request_id < (1 << 63):
        raise ProtocolError("request_id must be a non-negative integer")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r:.20} not supported (this side speaks {PROTOCOL_VERSION})", request_id
        )
    cls = MESSAGE_TYPES.get(type_name) if type(type_name) is str else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_name!r:.40}", request_id)
    if accept is not None and type_name not in accept:
        raise ProtocolError(f"{type_name} is not accepted here", request_id)
    if nbytes > cls.MAX_FRAME:
        raise ProtocolError(f"{type_name} frame of {nbytes} bytes exceeds its limit of {cls.MAX_FRAME}", request_id)
    return cls, request_id


def _map_len(body: Raw) -> int | None:
    """The number of keys a msgpack map declares (from its first bytes), None if it is not a map."""
    head = memoryview(body)[:5].tobytes()
    if not head:
        return None
    if 0x80 <= head[0] <= 0x8F:
        return head[0] & 0x0F
    if head[0] in (0xDE, 0xDF) and len(head) >= (3 if head[0] == 0xDE else 5):
        return int.from_bytes(head[1:3] if head[0] == 0xDE else head[1:5], "big")
    return None


def _check_keys(cls: type[Message], body: Raw) -> None:
    """Refuse a body declaring more keys than its message has fields, before any key is read."""
    keys, fields = _map_len(body), len(cls.__struct_fields__)
    if keys is not None and keys > fields:
        raise ProtocolError(f"field 'body': {keys} keys, at most {fields} allowed")


@functools.cache  # msgspec.structs.fields costs about a millisecond, and every message with a config asks
def wire_name(cls: type, name: str) -> str:
    """The key field ``name`` of Struct ``cls`` has on the wire."""
    return next((f.encode_name for f in msgspec.structs.fields(cls) if f.name == name), name)


def _sized_trees(cls: type[Message]) -> msgspec.msgpack.Decoder:
    """A decoder for ``cls`` with its tree-valued fields left undecoded (``Raw``), derived from ``cls``."""
    fields: list[Any] = []
    declared = msgspec.structs.fields(cls)
    rename = {f.name: f.encode_name for f in declared if f.name != f.encode_name}
    for f in declared:
        kind = Raw if f.name in cls.TREES else f.type
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, kind, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, kind, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, kind))
    sized = msgspec.defstruct(f"{cls.__name__}Sized", fields, rename=rename or None, forbid_unknown_fields=True)
    return msgspec.msgpack.Decoder(sized)


def _decode_large(cls: type[Message], body: Raw) -> Message:
    """A body of a frame over SMALL_FRAME whose message has trees: each tree's encoded size is checked
    before it is built (1 byte of msgpack can be a 56-byte Python list), everything else as usual."""
    sized = _SIZED[cls].decode(body)
    values = {name: getattr(sized, name) for name in cls.__struct_fields__}
    for name, (max_bytes, _) in cls.TREES.items():
        raw, wire = values[name], wire_name(cls, name)
        if len(raw) > max_bytes:
            raise ProtocolError(f"field {wire!r}: {len(raw)} bytes, at most {max_bytes} allowed")
        try:
            values[name] = _TREES[cls, name].decode(raw)
        except msgspec.ValidationError as exc:  # its path, as if decoded in place
            raise ProtocolError(_explain(str(exc).replace("`$", f"`$.{wire}", 1))) from None
    try:
        return cls(**values)
    except ValueError as exc:  # __post_init__: a tree of too many values
        raise ProtocolError(str(exc)) from None


_SIZED = {cls: _sized_trees(cls) for cls in MESSAGE_TYPES.values() if cls.TREES}
_TREES = {
    (cls, f.name): msgspec.msgpack.Decoder(f.type)
    for cls in _SIZED
    for f in msgspec.structs.fields(cls)
    if f.name in cls.TREES
}


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$\.?(?P<path>.*)`)?$", re.S)


def _explain(text: str) -> str:
    """A msgspec validation error in this protocol's words: ``field 'path': what``."""
    m = _AT.match(text)
    if m is None:  # the pattern matches any text; kept for the type checker
        return text
    what, path = m.group("what"), m.group("path") or "body"
    what = re.sub(r"Object contains unknown field `(.*)`", r"unknown key '\1'", what)
    if path.endswith("backend") and what.startswith("Invalid value"):
        what = "unknown backend" + what[len("Invalid value") :]
    if "got `ext`" in what:
        what = f"undecodable msgpack (ext types are refused): {what}"
    return f"field {path!r}: {what}"
