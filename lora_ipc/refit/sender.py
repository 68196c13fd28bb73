"""The trainer's side: ``WeightSender`` packs each bucket into a slab and publishes it as the next version of
the update stream."""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable, Iterable, Iterator

import torch

from ..core.serving.exporter import TensorSetExporter
from .buckets import BucketRef
from .errors import RefitError
from .plans import (
    DEFAULT_BUCKET_BYTES,
    BucketPlan,
    check_bucket_bytes,
    plan_buckets,
)


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
