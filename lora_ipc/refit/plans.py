"""Bucket plans: a model's parameters in buckets of at most ``bucket_bytes``; a parameter larger than a
bucket is split into 1-D pieces of whole elements."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..core.memory.layout import ALIGN, DTYPE_NAMES, DTYPES, align_up
from ..core.protocol import MAX_ENTRIES
from .errors import RefitError

DEFAULT_BUCKET_BYTES = 256 << 20
MIN_BUCKET_BYTES = 4 << 10
MAX_PIECES_PER_BUCKET = MAX_ENTRIES  # a bucket is one slab layout
MAX_PARAM_ELEMENTS = 1 << 40  # a split parameter's full size, checked before the receiver allocates it


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + numel)`` of parameter ``param`` (flattened), or all of it."""

    param: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    numel: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.numel == math.prod(self.shape)

    @property
    def entry(self) -> str:
        """The piece's name in the bucket's slab layout."""
        return self.param if self.whole else f"{self.param}#{self.start}"

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class BucketPlan:
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(align_up(p.nbytes) for p in self.pieces)


def check_bucket_bytes(bucket_bytes: int) -> int:
    if type(bucket_bytes) is not int or bucket_bytes < MIN_BUCKET_BYTES:
        raise ValueError(f"bucket_bytes must be an int of at least {MIN_BUCKET_BYTES}, got {bucket_bytes!r}")
    return bucket_bytes // ALIGN * ALIGN


def plan_buckets(params: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], bucket_bytes: int) -> list[BucketPlan]:
    """Group parameters, in order, into buckets whose slab layouts need at most ``bucket_bytes``.

    Parameters that fit are never split; one larger than a bucket is cut into pieces that each fill a
    bucket (the last piece shares its bucket with what follows). Buckets are then balanced: as many as
    greedy filling needs, but of similar sizes, so the store's slabs fit every bucket and are reused
    instead of a short last bucket allocating a slab of its own each update.
    """
    params = [(name, dtype, tuple(int(d) for d in shape)) for name, dtype, shape in params]
    bucket_bytes = check_bucket_bytes(bucket_bytes)
    plans = _fill_greedily(params, bucket_bytes)
    if len(plans) < 2:
        return plans
    sizes = [align_up(math.prod(shape) * dtype.itemsize) for _, dtype, shape in params]
    capacity = max(
        align_up(-(-sum(b.nbytes for b in plans) // len(plans))),
        max((n for n in sizes if n <= bucket_bytes), default=0),
    )
    while capacity < bucket_bytes:
        balanced = _fill_greedily(params, capacity)
        if len(balanced) <= len(plans):
            return balanced
        capacity = min(bucket_bytes, align_up(capacity * 21 // 20))
    return plans


def _fill_greedily(params: list[tuple[str, torch.dtype, tuple[int, ...]]], bucket_bytes: int) -> list[BucketPlan]:
    buckets: list[BucketPlan] = []
    current: list[Piece] = []
    used = 0

    def flush():
        nonlocal used
        if current:
            buckets.append(BucketPlan(tuple(current)))
            current.clear()
            used = 0

    seen: set[str] = set()
    for name, dtype, shape in params:
        if name in seen:
            raise RefitError(f"parameter {name!r} appears twice")
        seen.add(name)
        if dtype not in DTYPE_NAMES:
            raise RefitError(f"{name}: dtype {dtype} cannot be sent (supported: {sorted(DTYPES)})")
        numel = math.prod(shape)
        nbytes = align_up(numel * dtype.itemsize)
        if used + nbytes <= bucket_bytes and len(current) < MAX_PIECES_PER_BUCKET:
            current.append(Piece(name, dtype, shape, 0, numel))
            used += nbytes
            continue
        flush()
        if nbytes <= bucket_bytes:
            current.append(Piece(name, dtype, shape, 0, numel))
            used = nbytes
            continue
        per_piece = bucket_bytes // dtype.itemsize
        for start in range(0, numel, per_piece):
            piece = Piece(name, dtype, shape, start, min(per_piece, numel - start))
            current.append(piece)
            used = align_up(piece.nbytes)
            if used >= bucket_bytes:
                flush()
    flush()
    return buckets


# ---- the control-plane message ---------------------------------------------------------------
