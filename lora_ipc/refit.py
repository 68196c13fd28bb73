"""Full-weight refit over lora_ipc slabs: bucket plans, the bucket reference that crosses the control
plane, the trainer's sender and the engine's receiver. No vLLM here (``lora_ipc.vllm.weight_transfer``
plugs these into vLLM's weight-transfer framework).

Data path, one update::

    trainer (rank 0)                                    each inference worker
    ----------------                                    ---------------------
    plan: parameters -> buckets of <= bucket_bytes
    for bucket k:
      pack its tensors into a slab, publish it as
      version v_k of the update stream           ----> update_weights(BucketRef(stream, v_k, ...))
      (packing k+1 overlaps the worker's k)             fetch v_k -> owned copy, lease released
                                                        model.load_weights(tensors)

A bucket is one version of one stream (a store name), so the store's keep policy, leases, slab reuse
and the CPU (shared memory) and CUDA (IPC) backends apply unchanged. Memory is bounded: the store keeps
``keep=2`` versions (the bucket being loaded and the one being packed) plus at most two free slabs
for reuse, so the trainer holds at most four bucket-sized slabs however large the model. The sender
publishes bucket k+1 only after the worker has loaded bucket k-1 (its ``update_weights`` call returned),
so no bucket is retired before every worker has copied it out.

A parameter larger than a bucket is split into 1-D pieces of whole elements, each in its own bucket;
the receiver copies pieces into one owned tensor and hands it to ``load_weights`` when complete. The
pieces of a parameter must tile it exactly: every piece in bounds, none overlapping another, none
repeated, every element covered by the end of the update. A bucket that breaks this is refused whole
(:class:`RefitPieceError`) before any of its bytes are copied, so nothing already received changes.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import math
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated

import torch
from msgspec import Meta

from .core.errors import LoraIpcError, ProtocolError, wire_error
from .core.fetching.client import TensorSetClient
from .core.memory.layout import ALIGN, DTYPE_NAMES, DTYPES, align_up
from .core.protocol import MAX_DIMS, MAX_ENTRIES, Count, Name, Positive, check_fields
from .core.serving.exporter import TensorSetExporter

DEFAULT_BUCKET_BYTES = 256 << 20
MIN_BUCKET_BYTES = 4 << 10
MAX_PIECES_PER_BUCKET = MAX_ENTRIES  # a bucket is one slab layout
MAX_PARAM_ELEMENTS = 1 << 40  # a split parameter's full size, checked before the receiver allocates it


@wire_error
class RefitError(LoraIpcError):
    """A full-weight update could not complete (source mismatch, missing bucket, trainer gone)."""


@wire_error
class RefitTimeout(RefitError):
    """The update was open longer than its idle timeout without a call: the engine rolled it back and
    serves the weights of the last complete update."""


@wire_error
class RefitPieceError(RefitError):
    """A bucket's pieces do not tile their parameter: out of bounds, overlapping, repeated, a piece the
    slab lacks, or a parameter delivered twice. The bucket was refused before any of it was copied."""


@wire_error
class RefitBusy(RefitError):
    """Another controller's update is open on this engine: a second ``init_weight_transfer_engine`` is
    refused while it is (unless it asks to take over). Nothing of the open update was touched."""


@wire_error
class RefitTakenOver(RefitError):
    """Another controller (another stream) initialized this engine since this controller did: its calls
    are refused, and the other controller's update is left as it was."""


@wire_error
class RefitStrayBucket(RefitError):
    """A bucket of a stream this engine was not initialized for: refused before anything was fetched,
    and the open update of the engine's own controller is left as it was."""


# ---- planning --------------------------------------------------------------------------------


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

#: ``[entry, param, start, full_shape]`` per split parameter in a bucket (JSON: lists, not tuples)
PieceRef = tuple[Name, Name, Count, Annotated[list[Count], Meta(max_length=MAX_DIMS)]]
Pieces = Annotated[list[PieceRef], Meta(max_length=MAX_PIECES_PER_BUCKET)]


@dataclass
class BucketRef:
    """Where one bucket of one update is: plain JSON data, safe on any control plane (HTTP, Ray, pipes).

    ``pieces`` lists only split parameters: ``[entry, param, start, full_shape]`` per piece in the bucket.
    """

    stream: Name
    version: Positive
    update: Positive
    bucket: Count
    buckets: Positive
    pieces: Pieces = field(default_factory=list)

    def __post_init__(self):
        check_fields(self, "update info")
        if self.bucket >= self.buckets:
            raise ProtocolError(f"update info 'bucket' must be in [0, {self.buckets}), got {self.bucket!r:.40}")
        for item in self.pieces:
            if math.prod(item[3]) > MAX_PARAM_ELEMENTS:
                raise ProtocolError(f"update info piece {item[0]!r:.80}: full shape {item[3]} is too large")

    @classmethod
    def for_bucket(cls, stream: str, version: int, update: int, bucket: int, plans: list[BucketPlan]) -> BucketRef:
        pieces = [(p.entry, p.param, p.start, list(p.shape)) for p in plans[bucket].pieces if not p.whole]
        return cls(stream, version, update, bucket, len(plans), pieces)


# ---- trainer side ----------------------------------------------------------------------------


class WeightSender:
    """Publishes a model's parameters bucket by bucket; ``deliver(ref)`` makes the engine load one.

    ``deliver`` must return only once every worker has copied the bucket out (vLLM's ``update_weights``
    does: it returns after ``load_weights``). It runs on a helper thread so packing bucket k+1 overlaps
    the engine loading bucket k; the two never touch the same slab.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        device: torch.device | str | None = None,
        lease_timeout_s: float = 60.0,
        stream: str | None = None,
    ):
        self.bucket_bytes = check_bucket_bytes(bucket_bytes)
        self.exporter = TensorSetExporter(endpoint, keep=2, device=device, lease_timeout_s=lease_timeout_s)
        self.stream = stream or f"weights-{uuid.uuid4().hex[:12]}"
        self.updates = 0
        self._plans: tuple[tuple, list[BucketPlan]] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lora-ipc-refit")

    @property
    def endpoint(self) -> str:
        return self.exporter.endpoint

    def plan(self, params: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[BucketPlan]:
        key = tuple((n, d, tuple(s)) for n, d, s in params)
        if self._plans is None or self._plans[0] != key:
            self._plans = (key, plan_buckets(key, self.bucket_bytes))
        return self._plans[1]

    def send(
        self,
        params: list[tuple[str, torch.dtype, tuple[int, ...]]],
        tensors: Iterable[tuple[str, torch.Tensor]],
        deliver: Callable[[BucketRef], None],
    ) -> int:
        """One update: ``params`` is the metadata (name, dtype, shape) that ``tensors`` yields, in order.

        Returns the update number. Raises :class:`RefitError` if the tensors do not match the metadata,
        and whatever ``deliver`` raised if the engine failed to load a bucket.
        """
        plans = self.plan(params)
        self.updates += 1
        update = self.updates
        pending: concurrent.futures.Future | None = None
        try:
            for index, bucket in enumerate(_fill(plans, iter(tensors))):
                version = self.exporter.publish(self.stream, bucket)
                if pending is not None:
                    pending.result()  # bucket index-1 loaded: the next publish may retire it
                ref = BucketRef.for_bucket(self.stream, version, update, index, plans)
                pending = self._pool.submit(deliver, ref)
            if pending is not None:
                pending.result()
                pending = None
        finally:
            if pending is not None:  # an error on this thread: let the in-flight call finish first
                concurrent.futures.wait([pending])
        return update

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.exporter.close()


def _fill(plans: list[BucketPlan], tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors of each bucket in turn, drawn from ``tensors`` in plan order (checked as they come)."""
    current: tuple[str, torch.Tensor] | None = None
    for plan in plans:
        bucket: dict[str, torch.Tensor] = {}
        for piece in plan.pieces:
            if current is None or current[0] != piece.param:
                try:
                    name, tensor = next(tensors)
                except StopIteration:
                    raise RefitError(f"the weight source ended before {piece.param!r}") from None
                if name != piece.param:
                    raise RefitError(f"the weight source yielded {name!r} where its metadata() has {piece.param!r}")
                if tensor.dtype != piece.dtype or tuple(tensor.shape) != piece.shape:
                    raise RefitError(
                        f"{name}: yielded {tensor.dtype} {tuple(tensor.shape)}, metadata() says "
                        f"{piece.dtype} {piece.shape}"
                    )
                current = (name, tensor.detach())
            tensor = current[1]
            if piece.whole:
                bucket[piece.entry] = tensor
            else:
                bucket[piece.entry] = tensor.contiguous().view(-1)[piece.start : piece.start + piece.numel]
        yield bucket
    extra = next(tensors, None)
    if extra is not None:
        raise RefitError(f"the weight source yielded {extra[0]!r}, which its metadata() does not list")


# ---- engine side -----------------------------------------------------------------------------


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
