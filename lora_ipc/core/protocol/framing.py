"""Frames: encoding, and the bounded decoder a hostile peer's bytes go through.

A frame is the msgpack array ``[PROTOCOL_VERSION, type, request_id, body]`` (messages.py). Decoding is
bounded before it builds anything: a frame over ``MAX_FRAME_BYTES`` or over its type's ``MAX_FRAME`` is
refused; for a frame over ``SMALL_FRAME`` the three header scalars are read one by one (:func:`_read_header`)
before the body is walked, and a config is decoded only after its encoded size is checked
(:func:`_decode_large`); msgspec checks each container's declared length against its bound before it builds
an item. Every failure is a ProtocolError, with the request id as soon as the header could be read, naming
the field (errortext.py).
"""

from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import Raw

from ..errors import ProtocolError
from .errortext import at_path, explain, is_header_item
from .limits import MAX_FRAME_BYTES, SMALL_FRAME
from .messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message


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
        raise ProtocolError(f"invalid {cls.TYPE} message: {explain(str(exc))}", request_id) from None
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
    if is_header_item(text):
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


def _sized_trees(cls: type[Message]) -> msgspec.msgpack.Decoder:
    """A decoder for ``cls`` with its tree-valued fields left undecoded (``Raw``), derived from ``cls``."""
    fields: list[Any] = []
    for f in msgspec.structs.fields(cls):
        kind = Raw if f.name in cls.TREES else f.type
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, kind, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, kind, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, kind))
    sized = msgspec.defstruct(f"{cls.__name__}Sized", fields, forbid_unknown_fields=True)
    return msgspec.msgpack.Decoder(sized)


def _decode_large(cls: type[Message], body: Raw) -> Message:
    """A body of a frame over SMALL_FRAME whose message has trees: each tree's encoded size is checked
    before it is built (1 byte of msgpack can be a 56-byte Python list), everything else as usual."""
    sized = _SIZED[cls].decode(body)
    values = {name: getattr(sized, name) for name in cls.__struct_fields__}
    for name, (max_bytes, _) in cls.TREES.items():
        raw = values[name]
        if len(raw) > max_bytes:
            raise ProtocolError(f"field {name!r}: {len(raw)} bytes, at most {max_bytes} allowed")
        try:
            values[name] = _TREES[cls, name].decode(raw)
        except msgspec.ValidationError as exc:  # its path, as if decoded in place
            raise ProtocolError(explain(at_path(str(exc), name))) from None
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
