"""Full-weight refit over lora_ipc slabs: bucket plans (``plans``), the bucket reference that crosses the
control plane (``buckets``), the trainer's sender (``sender``) and the engine's receiver (``receiver``). No
vLLM here (``lora_ipc.vllm.weight_transfer`` plugs these into vLLM's weight-transfer framework).

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

from .buckets import BucketRef
from .errors import RefitBusy, RefitError, RefitPieceError, RefitStrayBucket, RefitTakenOver, RefitTimeout
from .plans import (
    DEFAULT_BUCKET_BYTES,
    MAX_PARAM_ELEMENTS,
    MAX_PIECES_PER_BUCKET,
    MIN_BUCKET_BYTES,
    BucketPlan,
    Piece,
    check_bucket_bytes,
    plan_buckets,
)
from .receiver import WeightReceiver
from .sender import WeightSender

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "MAX_PARAM_ELEMENTS",
    "MAX_PIECES_PER_BUCKET",
    "MIN_BUCKET_BYTES",
    "BucketPlan",
    "BucketRef",
    "Piece",
    "RefitBusy",
    "RefitError",
    "RefitPieceError",
    "RefitStrayBucket",
    "RefitTakenOver",
    "RefitTimeout",
    "WeightReceiver",
    "WeightSender",
    "check_bucket_bytes",
    "plan_buckets",
]
