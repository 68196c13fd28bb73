"""Slab layout: where each tensor lives inside one flat byte buffer, and how to pack and unpack it.

Entries are 256-byte aligned. Tensors of the same dtype and shape are placed next to each other,
so the receiver can turn a whole group into tensor objects with one ``view(...).unbind(0)`` instead
of one ``split``/``view`` per tensor (measured on an H200: per-tensor Python work dominates once the
bytes are cheap). The wire form lists entries in publish order as ``[name, dtype, shape, offset, nbytes]``
(``protocol.LayoutEntry``, which declares their types and bounds; this module checks geometry).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
import torch

from ..errors import LayoutError
from ..protocol import MAX_DIMS, MAX_ENTRIES, Entries
from ..protocol import LayoutEntry as TensorEntry

ALIGN = 256
__all__ = ["ALIGN", "DTYPES", "DTYPE_NAMES", "MAX_DIMS", "MAX_ENTRIES", "SlabLayout", "TensorEntry"]

#: dtype names accepted on the wire. Anything else is a LayoutError.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int8",
        "uint8",
        "int16",
        "int32",
        "int64",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
    )
    if hasattr(torch, name)
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def align_up(n: int, alignment: int = ALIGN) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class ShapeGroup:
    """Consecutive entries of one dtype and shape, ``stride`` bytes apart, starting at ``offset``."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    stride: int
    names: tuple[str, ...]


def _groups(entries: list[TensorEntry]) -> tuple[ShapeGroup, ...]:
    groups: list[ShapeGroup] = []
    run: list[TensorEntry] = []

    def flush():
        if run:
            stride = align_up(run[0].nbytes)
            groups.append(
                ShapeGroup(DTYPES[run[0].dtype], run[0].shape, run[0].offset, stride, tuple(e.name for e in run))
            )
            run.clear()

    for e in sorted(entries, key=lambda e: e.offset):
        if (
            run
            and (e.dtype, e.shape) == (run[0].dtype, run[0].shape)
            and e.offset == run[-1].offset + align_up(e.nbytes)
        ):
            run.append(e)
        else:
            flush()
            run.append(e)
    flush()
    return tuple(groups)


def signature_of(tensors: Mapping[str, torch.Tensor]) -> tuple:
    """Names, dtypes and shapes, in order: equal signatures can share one layout."""
    return tuple((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())


class SlabLayout:
    """An immutable, validated layout. Build with :meth:`plan` (producer) or :meth:`from_wire` (consumer)."""

    __slots__ = ("entries", "used_bytes", "digest", "groups", "_wire")

    def __init__(self, entries: list[TensorEntry], used_bytes: int):
        self.entries = tuple(entries)
        self.used_bytes = used_bytes
        self._wire = [[e.name, e.dtype, list(e.shape), e.offset, e.nbytes] for e in self.entries]
        self.digest = hashlib.blake2b(msgspec.msgpack.encode(self._wire), digest_size=16).digest()
        self.groups = _groups(entries)

    # ---- producer side ---------------------------------------------------------------------

    @classmethod
    def plan(cls, tensors: Mapping[str, torch.Tensor]) -> SlabLayout:
        """Place ``tensors``: grouped by (dtype, shape) in order of first appearance, each 256-byte aligned."""
        if not tensors:
            raise LayoutError("a tensor set needs at least one tensor")
        by_kind: dict[tuple, list[str]] = {}
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise LayoutError(f"tensor names must be non-empty strings, got {name!r:.60}")
            if not isinstance(t, torch.Tensor):
                raise LayoutError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in DTYPE_NAMES:
                raise LayoutError(f"{name}: dtype {t.dtype} is not supported")
            by_kind.setdefault((t.dtype, tuple(t.shape)), []).append(name)
        placed: dict[str, TensorEntry] = {}
        offset = 0
        for (dtype, shape), names in by_kind.items():
            nbytes = math.prod(shape) * dtype.itemsize
            for name in names:
                placed[name] = TensorEntry(name, DTYPE_NAMES[dtype], shape, offset, nbytes)
                offset += align_up(nbytes)
        return cls([placed[n] for n in tensors], align_up(offset))

    def destination_views(self, slab: torch.Tensor) -> list[torch.Tensor]:
        """One view of ``slab`` (uint8, 1-D) per entry, in entry order — the targets of :meth:`pack`."""
        return [slab[e.offset : e.offset + e.nbytes].view(DTYPES[e.dtype]).view(e.shape) for e in self.entries]

    def signature(self) -> tuple:
        """What a dict of tensors must match to be packed with this layout (see :func:`signature_of`)."""
        return tuple((e.name, DTYPES[e.dtype], e.shape) for e in self.entries)

    def pack(self, destinations: list[torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (matching :meth:`signature`) into their places with one batched copy."""
        with torch.no_grad():
            torch._foreach_copy_(destinations, [tensors[e.name] for e in self.entries])

    def to_wire(self) -> list:
        return self._wire

    # ---- consumer side ---------------------------------------------------------------------

    @classmethod
    def from_wire(cls, wire: object, used_bytes: int, slab_nbytes: int) -> SlabLayout:
        """Check a layout received from a peer against the slab it describes. Types and bounds are the
        wire contract's (``protocol.LayoutEntry``); what is checked here is geometry: the dtype allow-list,
        byte counts, alignment, bounds and overlap."""
        if type(used_bytes) is not int or used_bytes % ALIGN or not 0 < used_bytes <= slab_nbytes:
            raise LayoutError(
                f"used_bytes {used_bytes!r:.20} must be a multiple of {ALIGN} within the slab ({slab_nbytes} bytes)"
            )
        try:
            items = msgspec.convert(wire, Entries)
        except msgspec.ValidationError as exc:
            raise LayoutError(f"layout: {exc}") from None
        if not items:
            raise LayoutError(f"layout must be a list of 1..{MAX_ENTRIES} entries")
        seen: set[str] = set()
        for e in items:
            name, dtype, shape = e.name, e.dtype, e.shape
            if name in seen:
                raise LayoutError(f"{name}: name must be a unique non-empty string")
            seen.add(name)
            if dtype not in DTYPES:
                raise LayoutError(f"{name}: dtype {dtype!r:.30} is not in the allow-list {sorted(DTYPES)}")
            if not all(d <= slab_nbytes for d in shape):
                raise LayoutError(f"{name}: shape {list(shape)} has a dimension larger than the slab")
            expected = math.prod(shape) * DTYPES[dtype].itemsize
            if math.prod(max(d, 1) for d in shape) * DTYPES[dtype].itemsize > slab_nbytes:
                raise LayoutError(f"{name}: shape {list(shape)} does not fit a slab of {slab_nbytes} bytes, even empty")
            if e.nbytes != expected:
                raise LayoutError(
                    f"{name}: {e.nbytes} bytes do not match shape {list(shape)} of {dtype} ({expected} bytes)"
                )
            if e.offset % ALIGN:
                raise LayoutError(f"{name}: offset {e.offset} is not {ALIGN}-byte aligned")
            if e.offset + e.nbytes > used_bytes:
                raise LayoutError(
                    f"{name}: bytes [{e.offset}, {e.offset + e.nbytes}) lie outside the slab's {used_bytes} used bytes"
                )
        entries = items
        end = 0
        for e in sorted(entries, key=lambda e: e.offset):
            if e.offset < end:
                raise LayoutError(f"{e.name}: overlaps the previous entry")
            end = e.offset + e.nbytes
        layout = cls(entries, used_bytes)
        try:  # every view the receiver will make, made once on a meta tensor (no memory): any failure is ours
            layout.group_views(torch.empty(used_bytes, dtype=torch.uint8, device="meta"))
        except (RuntimeError, ValueError, OverflowError, IndexError) as exc:
            raise LayoutError(f"layout cannot be laid over {used_bytes} bytes: {exc}") from None
        return layout

    def group_views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """One ``(n, *shape)`` view of ``buf`` (uint8, 1-D) per shape group, in ``self.groups`` order."""
        views = []
        for g in self.groups:
            n = len(g.names)
            region = buf[g.offset : g.offset + n * g.stride].view(g.dtype)
            numel = math.prod(g.shape)
            views.append(region.view(n, g.stride // g.dtype.itemsize)[:, :numel].view(n, *g.shape))
        return views

    def unpack(self, owned: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``owned`` (uint8, 1-D, at least ``used_bytes``) per entry, one ``unbind`` per shape group."""
        out: dict[str, torch.Tensor] = {}
        for g, view in zip(self.groups, self.group_views(owned)):
            out.update(zip(g.names, view.unbind(0)))
        return {e.name: out[e.name] for e in self.entries}

    def non_finite_names(self, buf: torch.Tensor) -> list[str]:
        """Names of floating entries in ``buf`` that hold NaN or ±Inf.

        One min/max pass per shape group (NaN propagates through both) and one device-to-host sync.
        """
        floating = [
            (g, v) for g, v in zip(self.groups, self.group_views(buf)) if g.dtype.is_floating_point and v.numel()
        ]
        if not floating:
            return []
        extremes = torch.stack([torch.stack([v.amax(), v.amin()]).float() for _, v in floating])
        if bool(extremes.isfinite().all()):
            return []
        bad = []  # the slow path only runs for a bad version: find which tensors
        for g, v in floating:
            bad += [name for name, t in zip(g.names, v.unbind(0)) if not bool(t.isfinite().all())]
        return bad
