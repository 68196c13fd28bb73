"""``BucketRef``: what crosses the control plane for one bucket (stream, version, update, the pieces)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

from msgspec import Meta

from ..core.errors import ProtocolError
from ..core.protocol import MAX_DIMS, Count, Name, Positive, check_fields
from .plans import (
    MAX_PARAM_ELEMENTS,
    MAX_PIECES_PER_BUCKET,
    BucketPlan,
)

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
