"""The engine's side: ``WeightReceiver`` fetches a bucket into an owned copy, checks that its pieces tile their
parameters, and hands complete tensors to ``load_weights``."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch

from ..core.fetching.client import TensorSetClient
from .buckets import BucketRef
from .errors import RefitError, RefitPieceError


@dataclass
class _Partial:
    flat: torch.Tensor  # owned, 1-D, the full parameter's elements
    shape: tuple[int, ...]
    filled: int = 0
    spans: list[tuple[int, int]] = field(default_factory=list)  # sorted, disjoint [start, end) received

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.spans, (start, end))
        return (i > 0 and self.spans[i - 1][1] > start) or (i < len(self.spans) and self.spans[i][0] < end)

    def add(self, start: int, end: int) -> None:
        bisect.insort(self.spans, (start, end))
        self.filled += end - start


@dataclass(frozen=True)
class _Placed:
    """One slab tensor of a bucket, checked: a whole parameter, or a piece ``[start, end)`` of ``param``."""

    entry: str
    param: str
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0
    piece: bool = False


class WeightReceiver:
    """Fetches buckets into memory this process owns and reassembles split parameters.

    One update is ``begin()``, ``receive(ref)`` per bucket in order, ``end()``. Nothing returned is a
    view of the trainer's slab: a fetch copies the bucket out and releases its lease before returning.
    A bucket is checked whole before any of it is used (order, every piece in bounds, no overlap with
    itself or what arrived before, no parameter twice): a refused bucket changes nothing here.
    """

    def __init__(self, endpoint: str, stream: str, *, timeout_s: float = 60.0, max_update_bytes: int | None = None):
        self.stream = stream
        self.max_update_bytes = max_update_bytes  # whole parameters returned + split ones allocated, per update
        self.client = TensorSetClient(endpoint, timeout_s=timeout_s)
        self._partial: dict[str, _Partial] = {}
        self._complete: set[str] = set()
        self.begin()

    def begin(self) -> None:
        self._partial.clear()
        self._complete = set()
        self._next: tuple[int, int] | None = None  # (update, bucket) expected next
        self._buckets = 0
        self._total = 0
        self._bytes = 0

    def receive(self, ref: BucketRef, device: torch.device | str | None = None) -> list[tuple[str, torch.Tensor]]:
        """The complete parameters in bucket ``ref`` (split ones once their last piece arrived)."""
        if ref.stream != self.stream:
            raise RefitError(f"bucket of stream {ref.stream!r}, but this engine was initialized for {self.stream!r}")
        expected = self._next or (ref.update, 0)
        if (ref.update, ref.bucket) != expected:
            raise RefitError(
                f"bucket {ref.bucket} of update {ref.update} arrived, expected bucket {expected[1]} "
                f"of update {expected[0]} (buckets must be loaded in order)"
            )
        if self._next is not None and ref.buckets != self._total:
            raise RefitError(
                f"bucket {ref.bucket} says the update has {ref.buckets} buckets, bucket 0 said {self._total}"
            )
        bucket = self.client.fetch(ref.stream, ref.version, device=device)
        if bucket.version != ref.version:
            raise RefitError(f"asked for version {ref.version}, got {bucket.version}")
        placed = self._place(ref, bucket.tensors)
        self._bytes += self._new_bytes(placed, bucket.tensors)
        out: list[tuple[str, torch.Tensor]] = []
        for item in placed:  # checked: nothing below can refuse the bucket half-way
            tensor = bucket.tensors[item.entry]
            if not item.piece:
                self._complete.add(item.param)
                out.append((item.param, tensor))
                continue
            part = self._partial.get(item.param)
            if part is None:
                part = self._partial[item.param] = _Partial(
                    torch.empty(math.prod(item.shape), dtype=tensor.dtype, device=tensor.device), item.shape
                )
            part.flat[item.start : item.end].copy_(tensor)
            part.add(item.start, item.end)
            if part.filled == part.flat.numel():  # disjoint spans in bounds that add up to numel: a tiling
                self._complete.add(item.param)
                out.append((item.param, self._partial.pop(item.param).flat.view(item.shape)))
        self._buckets += 1
        self._next = (ref.update, ref.bucket + 1)
        self._total = ref.buckets
        return out

    def _new_bytes(self, placed: list[_Placed], tensors: dict[str, torch.Tensor]) -> int:
        """Bytes this bucket adds to the update (a split parameter counts in full at its first piece);
        refuses the bucket if that passes ``max_update_bytes``."""
        new, allocated = 0, set()
        for item in placed:
            itemsize = tensors[item.entry].element_size()
            if not item.piece:
                new += tensors[item.entry].numel() * itemsize
            elif item.param not in self._partial and item.param not in allocated:
                allocated.add(item.param)
                new += math.prod(item.shape) * itemsize
        if self.max_update_bytes is not None and self._bytes + new > self.max_update_bytes:
            raise RefitError(
                f"the update would hold {self._bytes + new} bytes, over its limit of "
                f"{self.max_update_bytes} (max_update_bytes)"
            )
        return new

    def _place(self, ref: BucketRef, tensors: dict[str, torch.Tensor]) -> list[_Placed]:
        """Check every tensor of the bucket against ``ref.pieces`` and what arrived before; change nothing."""
        pieces: dict[str, tuple[str, int, tuple[int, ...]]] = {}
        for entry, param, start, full_shape in ref.pieces:
            if entry in pieces:
                raise RefitPieceError(f"bucket {ref.bucket}: piece {entry!r} is listed twice")
            if entry not in tensors:
                raise RefitPieceError(f"bucket {ref.bucket}: piece {entry!r} is listed but not in the bucket")
            pieces[entry] = (param, start, tuple(full_shape))
        whole = {name for name in tensors if name not in pieces}
        for name in whole:
            if name in self._complete or name in self._partial:
                raise RefitPieceError(f"bucket {ref.bucket}: parameter {name!r} was already delivered in this update")
        placed = [_Placed(name, name, tuple(tensors[name].shape)) for name in tensors if name in whole]
        spans: dict[str, list[tuple[int, int]]] = {}  # this bucket's pieces, per parameter
        dtypes: dict[str, torch.dtype] = {}
        for name, (param, start, shape) in pieces.items():
            tensor = tensors[name]
            end = start + tensor.numel()
            where = f"bucket {ref.bucket}: piece {name!r} ({tensor.dtype}, {tuple(tensor.shape)}) of {param} {shape}"
            if param in self._complete or param in whole:
                raise RefitPieceError(f"{where}: {param} was already delivered in this update")
            if tensor.dim() != 1 or tensor.numel() == 0 or end > math.prod(shape):
                raise RefitPieceError(f"{where} at element {start} is empty or out of bounds")
            part = self._partial.get(param)
            if part is not None and (part.shape != shape or part.flat.dtype != tensor.dtype):
                raise RefitPieceError(f"{where}: earlier pieces said {part.flat.dtype} {part.shape}")
            if dtypes.setdefault(param, tensor.dtype) != tensor.dtype:
                raise RefitPieceError(f"{where}: other pieces of {param} in this bucket are {dtypes[param]}")
            mine = spans.setdefault(param, [])
            if (part is not None and part.overlaps(start, end)) or any(a < end and start < b for a, b in mine):
                raise RefitPieceError(f"{where}: elements [{start}, {end}) overlap another piece")
            if any(shape != p.shape for p in placed if p.param == param):
                raise RefitPieceError(f"{where}: other pieces of {param} in this bucket give another shape")
            mine.append((start, end))
            placed.append(_Placed(name, param, shape, start, end, True))
        order = {name: i for i, name in enumerate(tensors)}
        return sorted(placed, key=lambda p: order[p.entry])  # slab order: parameters complete in model order

    @property
    def buckets_received(self) -> int:
        return self._buckets

    def missing(self) -> str | None:
        """What the update still lacks (None when complete); changes nothing."""
        received, total = self._buckets, self._total
        if received == 0 or received != total:
            return f"the update has {received} of {total or 'its'} buckets"
        if self._partial:
            return f"parameters missing pieces: {sorted(self._partial)[:5]}"
        return None

    def end(self) -> int:
        """Check the update was complete; returns how many buckets it had."""
        received, total, partial = self._buckets, self._total, sorted(self._partial)
        self.begin()
        if received == 0 or received != total:
            raise RefitError(f"the update ended after {received} of {total or 'its'} buckets")
        if partial:
            raise RefitError(f"the update ended with parameters missing pieces: {partial[:5]}")
        return received

    def close(self) -> None:
        self.client.close()
