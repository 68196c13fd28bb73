"""Declarative wire schema: each field's check declared once, next to the field; one streaming decoder.

Why streaming: ``msgpack.unpackb`` builds every object of a frame before anything can be checked, so
a hostile 64 MiB frame of nested empty arrays costs gigabytes of Python objects and seconds of CPU.
Here the decoder walks the frame with ``msgpack.Unpacker``: it reads container *headers* first
(``read_array_header``/``read_map_header``), checks their length against the field's spec, and looks
at the next type byte before it unpacks a scalar, so a container is only ever built where the schema
expects one and only up to its declared size. A hostile frame therefore costs at most what the
largest legal message of its type costs, and each message type also has its own frame-size limit.

Specs:  ``Int(lo, hi)``  ``Float(lo, hi)``  ``Bool()``  ``Str(max_chars)``  ``Bytes(max_len)``
        ``ListOf(spec, max_items)``  ``Tuple(*specs)``  ``Optional(spec)``  ``Tree(max_depth, max_nodes)``
        ``Struct(cls)`` (a dataclass whose fields carry specs)  ``Tagged(key, {tag: cls})``.

A dataclass field declares its spec with :func:`wire`: ``name: str = wire(Str())``.

Two ways to apply a spec, one set of rules: ``read(reader)`` walks a large frame as a stream, and
``check(value)`` validates what C ``msgpack.unpackb`` built from a small frame (at most
``SMALL_FRAME`` bytes, which can hold at most that many objects), the fast path of steady state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack

from .errors import ProtocolError

# First-byte classes of the msgpack format (https://github.com/msgpack/msgpack/blob/master/spec.md).
_ARRAY = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_MAP = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_EXT = frozenset([0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8])
_CONTAINER = _ARRAY | _MAP | _EXT


def wire(spec: Spec, **field_kw) -> Any:
    """A dataclass field whose wire check is ``spec``."""
    return dataclasses.field(metadata={"wire": spec}, **field_kw)


class Reader:
    """A cursor over one frame. Every read either returns a checked value or raises ProtocolError."""

    def __init__(self, data: bytes, max_str: int = 1 << 20):
        self.data = bytes(data)
        self.nodes = 0
        self._u = msgpack.Unpacker(max_buffer_size=max(len(self.data), 1), raw=False, strict_map_key=True,
                                   max_str_len=max_str, max_bin_len=max_str, max_array_len=1 << 20,
                                   max_map_len=1 << 20, max_ext_len=0)
        self._u.feed(self.data)

    def next_byte(self, where: str) -> int:
        pos = self._u.tell()
        if pos >= len(self.data):
            raise ProtocolError(f"field {where!r}: frame ends early")
        return self.data[pos]

    def scalar(self, where: str) -> Any:
        if self.next_byte(where) in _CONTAINER:
            raise ProtocolError(f"field {where!r}: expected a scalar, got a container")
        return self._call(self._u.unpack, where)

    def array(self, where: str, max_items: int) -> int:
        """The next array's length (its items follow), checked before any item is read."""
        return self._header(where, max_items, _ARRAY, self._u.read_array_header, "an array", "items")

    def map(self, where: str, max_items: int) -> int:
        """The next map's number of keys (key, value pairs follow), checked before any is read."""
        return self._header(where, max_items, _MAP, self._u.read_map_header, "a map", "keys")

    def _header(self, where, max_items, first_bytes, read, kind, unit) -> int:
        if self.next_byte(where) not in first_bytes:
            raise ProtocolError(f"field {where!r}: expected {kind}")
        n = self._call(read, where)
        if n > max_items:
            raise ProtocolError(f"field {where!r}: {n} {unit}, at most {max_items} allowed")
        return n

    def at_end(self) -> bool:
        return self._u.tell() == len(self.data)

    @staticmethod
    def _call(fn, where: str) -> Any:
        try:
            return fn()
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack raises several unrelated types for garbage
            raise ProtocolError(f"field {where!r}: undecodable msgpack ({type(exc).__name__}: {exc})") from None


SMALL_FRAME = 64 << 10


class Spec:
    def check(self, value: Any, where: str) -> Any:
        """Validate an already-decoded value; return it (converted where the spec says)."""
        raise NotImplementedError

    def read(self, r: Reader, where: str) -> Any:
        """Read and validate the next value of a stream (scalars: one unpack, then ``check``)."""
        return self.check(r.scalar(where), where)

    def encode(self, value: Any) -> Any:
        return value


def unpack_small(data: bytes) -> Any:
    """C msgpack for a frame of at most SMALL_FRAME bytes (so at most that many objects); ext refused."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, max_str_len=SMALL_FRAME,
                               max_bin_len=SMALL_FRAME, max_array_len=SMALL_FRAME, max_map_len=SMALL_FRAME)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable msgpack frame ({type(exc).__name__}: {exc})") from None


def _fail(where: str, what: str) -> ProtocolError:
    return ProtocolError(f"field {where!r}: {what}")


@dataclasses.dataclass(frozen=True)
class Int(Spec):
    lo: int = 0
    hi: int = (1 << 63) - 1

    def check(self, v, where):
        if type(v) is not int or not self.lo <= v <= self.hi:
            raise _fail(where, f"expected an integer in [{self.lo}, {self.hi}], got {v!r:.40}")
        return v


@dataclasses.dataclass(frozen=True)
class Float(Spec):
    lo: float = 0.0
    hi: float = 1e18

    def check(self, v, where):
        if type(v) not in (int, float) or not self.lo <= v <= self.hi:  # NaN fails both comparisons
            raise _fail(where, f"expected a number in [{self.lo}, {self.hi}]")
        return float(v)


@dataclasses.dataclass(frozen=True)
class Bool(Spec):
    def check(self, v, where):
        if type(v) is not bool:
            raise _fail(where, "expected a boolean")
        return v


@dataclasses.dataclass(frozen=True)
class Str(Spec):
    max_chars: int = 512
    allow_empty: bool = False

    def check(self, v, where):
        if type(v) is not str or len(v) > self.max_chars or (not v and not self.allow_empty):
            raise _fail(where, f"expected a {'' if self.allow_empty else 'non-empty '}string of at most "
                               f"{self.max_chars} chars")
        return v


class Choice(Spec):
    """One of a few strings."""

    def __init__(self, *values: str):
        self.values = frozenset(values)

    def check(self, v, where):
        if v not in self.values or type(v) is not str:
            raise _fail(where, f"expected one of {sorted(self.values)}")
        return v


@dataclasses.dataclass(frozen=True)
class Bytes(Spec):
    max_len: int = 1024
    exact: int | None = None

    def check(self, v, where):
        if type(v) is not bytes or len(v) > self.max_len or (self.exact is not None and len(v) != self.exact):
            size = f"exactly {self.exact}" if self.exact is not None else f"at most {self.max_len}"
            raise _fail(where, f"expected {size} bytes")
        return v


@dataclasses.dataclass(frozen=True)
class Optional(Spec):
    inner: Spec

    def read(self, r, where):
        if r.next_byte(where) == 0xC0:  # nil
            r.scalar(where)
            return None
        return self.inner.read(r, where)

    def check(self, v, where):
        return None if v is None else self.inner.check(v, where)

    def encode(self, value):
        return None if value is None else self.inner.encode(value)


@dataclasses.dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    max_items: int

    def read(self, r, where):
        n = r.array(where, self.max_items)
        return [self.item.read(r, f"{where}[{i}]") for i in range(n)]

    def check(self, v, where):
        if type(v) is not list or len(v) > self.max_items:
            raise _fail(where, f"expected an array of at most {self.max_items} items")
        return [self.item.check(x, f"{where}[{i}]") for i, x in enumerate(v)]

    def encode(self, value):
        return [self.item.encode(v) for v in value]


class Tuple(Spec):
    """A fixed-length array whose items each have their own spec (returned as a list)."""

    def __init__(self, *items: Spec):
        self.items = items

    def read(self, r, where):
        n = r.array(where, len(self.items))
        if n != len(self.items):
            raise _fail(where, f"expected {len(self.items)} items, got {n}")
        return [spec.read(r, f"{where}[{i}]") for i, spec in enumerate(self.items)]

    def check(self, v, where):
        if type(v) is not list or len(v) != len(self.items):
            raise _fail(where, f"expected an array of {len(self.items)} items")
        return [spec.check(x, f"{where}[{i}]") for i, (spec, x) in enumerate(zip(self.items, v))]

    def encode(self, value):
        return [spec.encode(v) for spec, v in zip(self.items, value)]


@dataclasses.dataclass(frozen=True)
class Tree(Spec):
    """A JSON-like tree (adapter_config.json, a status report): bounded depth and node count, no NaN."""

    max_depth: int = 8
    max_nodes: int = 4096
    max_chars: int = 4096

    def read(self, r, where):
        if r.next_byte(where) not in _MAP:
            raise _fail(where, "expected a map")
        budget = [self.max_nodes]
        return self._node(r, where, 0, budget)

    def check(self, v, where):
        if type(v) is not dict:
            raise _fail(where, "expected a map")
        budget = [self.max_nodes]
        self._check_node(v, where, 0, budget)
        return v

    def _check_node(self, v, where, depth, budget):
        budget[0] -= 1
        if budget[0] < 0:
            raise _fail(where, f"more than {self.max_nodes} values")
        if depth > self.max_depth:
            raise _fail(where, "nested too deeply")
        if type(v) is list:
            for x in v:
                self._check_node(x, where, depth + 1, budget)
        elif type(v) is dict:
            for k, x in v.items():
                if type(k) is not str or len(k) > self.max_chars:
                    raise _fail(where, "keys must be short strings")
                self._check_node(x, f"{where}.{k}", depth + 1, budget)
        else:
            self._scalar(v, where)

    def _scalar(self, v, where):
        if v is None or type(v) in (bool, int):
            return v
        if type(v) is str:
            if len(v) > self.max_chars:
                raise _fail(where, f"string longer than {self.max_chars} chars")
            return v
        if type(v) is float:
            if math.isnan(v):
                raise _fail(where, "NaN in a config value")
            return v
        raise _fail(where, f"unsupported value of type {type(v).__name__}")

    def _node(self, r, where, depth, budget):
        budget[0] -= 1
        if budget[0] < 0:
            raise _fail(where, f"more than {self.max_nodes} values")
        if depth > self.max_depth:
            raise _fail(where, "nested too deeply")
        first = r.next_byte(where)
        if first in _ARRAY:
            n = r.array(where, budget[0])
            return [self._node(r, where, depth + 1, budget) for _ in range(n)]
        if first in _MAP:
            n = r.map(where, budget[0])
            out = {}
            for _ in range(n):
                key = Str(self.max_chars, allow_empty=True).read(r, f"{where} key")
                if key in out:
                    raise _fail(where, f"duplicate key {key!r:.40}")
                out[key] = self._node(r, f"{where}.{key}", depth + 1, budget)
            return out
        return self._scalar(r.scalar(where), where)


def _field_map(cls) -> dict[str, tuple[Spec, bool]]:
    cached = cls.__dict__.get("_wire_field_map")
    if cached is None:
        cached = {name: (spec, required) for name, spec, required in wire_fields(cls)}
        cls._wire_field_map = cached
    return cached


def _build(cls, fields, values):
    for name, (_, required) in fields.items():
        if required and name not in values:
            raise _fail(name, "missing")
    return cls(**values)


def wire_fields(cls) -> list[tuple[str, Spec, bool]]:
    """(name, spec, required) of a dataclass's wire fields, in declaration order (cached per class)."""
    cached = cls.__dict__.get("_wire_fields")
    if cached is None:
        cached = []
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("wire")
            if spec is None:
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            cached.append((f.name, spec, required))
        cls._wire_fields = cached
    return cached


@dataclasses.dataclass(frozen=True)
class Struct(Spec):
    """A map whose keys are the wire fields of ``cls``; unknown, duplicate or missing keys are refused."""

    cls: type

    def read(self, r, where):
        fields = _field_map(self.cls)
        n = r.map(where, len(fields))
        values: dict[str, Any] = {}
        for _ in range(n):
            key = r.scalar(f"{where} key")
            if type(key) is not str or key not in fields:
                raise _fail(where, f"unknown key {key!r:.40}")
            if key in values:
                raise _fail(where, f"duplicate key {key!r:.40}")
            values[key] = fields[key][0].read(r, key)
        return _build(self.cls, fields, values)

    def check(self, v, where):
        if type(v) is not dict:
            raise _fail(where, "expected a map")
        fields = _field_map(self.cls)
        for key in v:
            if key not in fields:
                raise _fail(where, f"unknown key {key!r:.40}")
        return _build(self.cls, fields, {k: fields[k][0].check(x, k) for k, x in v.items()})

    def encode(self, value):
        return {name: spec.encode(getattr(value, name)) for name, spec, _ in wire_fields(self.cls)}


@dataclasses.dataclass(frozen=True)
class Tagged(Spec):
    """One of several Structs, chosen by the string under ``key`` (which must come first in the map)."""

    key: str
    choices: dict

    def read(self, r, where):
        # peek: the tag is encoded first, so read the map header and tag, then decode the rest
        n = r.map(where, 64)
        if n == 0:
            raise _fail(where, f"missing {self.key!r}")
        if r.scalar(f"{where} key") != self.key:
            raise _fail(where, f"{self.key!r} must be the first key")
        tag = Str(32).read(r, f"{where}.{self.key}")
        cls = self.choices.get(tag)
        if cls is None:
            raise _fail(where, f"unknown {self.key} {tag!r:.40}")
        fields = _field_map(cls)
        if n - 1 > len(fields):
            raise _fail(where, "too many keys")
        values: dict[str, Any] = {}
        for _ in range(n - 1):
            k = r.scalar(f"{where} key")
            if type(k) is not str or k not in fields or k in values:
                raise _fail(where, f"unknown or duplicate key {k!r:.40}")
            values[k] = fields[k][0].read(r, k)
        return _build(cls, fields, values)

    def check(self, v, where):
        if type(v) is not dict:
            raise _fail(where, "expected a map")
        cls = self.choices.get(v.get(self.key)) if type(v.get(self.key)) is str else None
        if cls is None:
            raise _fail(where, f"unknown {self.key} {v.get(self.key)!r:.40}")
        return Struct(cls).check({k: x for k, x in v.items() if k != self.key}, where)

    def encode(self, value):
        return {self.key: type(value).TAG, **Struct(type(value)).encode(value)}
