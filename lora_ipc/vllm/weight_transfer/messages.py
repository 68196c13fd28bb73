"""What crosses between the trainer and the workers: the init and update info (plain dicts of strings, ints and
lists on the wire: they go through vLLM's HTTP RL routes without ``VLLM_ALLOW_INSECURE_SERIALIZATION``), the
trainer's own init info, and the error a worker's failure comes back as."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from msgspec import Meta
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from ...core.channels.endpoint import ipc_path
from ...core.protocol import Count, Name, carried, check_fields
from ...refit import DEFAULT_BUCKET_BYTES, BucketRef, RefitError
from ..plugin import BACKEND

DEFAULT_IDLE_TIMEOUT_S = 300.0


def refit_error(exc: Exception) -> RefitError:
    """``exc`` as a :class:`RefitError`: the one a worker raised, same class and message (it crosses vLLM's
    RPC as a typed code, see :func:`lora_ipc.core.errors.carried`), else a RefitError with ``exc``'s text."""
    found = carried(exc)
    if isinstance(found, RefitError):
        return found
    return RefitError(f"{type(exc).__name__}: {exc}")


@dataclass
class LoraIpcInitInfo(WeightTransferInitInfo):
    """What a worker needs to fetch buckets: the trainer's endpoint, its stream name, a timeout."""

    endpoint: Annotated[str, Meta(min_length=1, max_length=4096)]
    stream: Name
    timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    idle_timeout_s: Annotated[float, Meta(gt=0, le=86400)] = DEFAULT_IDLE_TIMEOUT_S
    stage_on_host: bool = False
    max_update_bytes: Count = 0  # 0: STAGE_LIMIT_FACTOR x the served model's parameter and buffer bytes
    check_finite: bool = False  # refuse a bucket holding NaN or inf
    take_over: bool = False  # discard another controller's open update (it is told at its next call)
    restore_on_refusal: bool = True  # host copy of the served weights during finish, to undo a refused apply

    def __post_init__(self):
        check_fields(self, "init info")
        ipc_path(self.endpoint)


@dataclass
class LoraIpcUpdateInfo(WeightTransferUpdateInfo, BucketRef):
    """One bucket of one update (fields and checks: :class:`~lora_ipc.refit.BucketRef`); with ``abort``,
    no bucket: the controller of ``stream`` ends its open update (rolled back, vLLM's session ended)."""

    abort: bool = False


@dataclass
class LoraIpcTrainerInitInfo(TrainerInitInfo):
    """Trainer side. Every field has a default: ``LoraIpcTrainerInitInfo(rank=0)`` works.

    ``endpoint``: where the trainer's exporter listens (default ``$LORA_IPC_ENDPOINT`` or a fresh
    private socket). ``bucket_bytes``: slab size per bucket (default 256 MiB; fewer, larger buckets mean
    fewer ``load_weights`` calls, each with a fixed cost in vLLM); a parameter larger than this is split.
    ``device``: where slabs live (default where the parameters are: CUDA IPC for GPU parameters).
    ``timeout_s``: how long a worker waits for one bucket's fetch before it fails the update.
    ``idle_timeout_s``: how long a started update may go without a call (start, a bucket, finish)
    before the worker rolls it back on its own (default 300 s).
    ``stage_on_host``: stage received buckets in host memory instead of on the model's device (saves
    up to one model's worth of GPU memory during an update, costs a host round trip).
    ``max_update_bytes``: the most one update may stage on a worker (default 0: four times the served
    model's parameter and buffer bytes); an update past it is refused and rolled back.
    ``check_finite``: workers refuse a bucket holding NaN or inf (the update is rolled back).
    ``take_over``: discard an update another controller has open on the engine (default: this
    controller's ``trainer_init`` is refused with :class:`~lora_ipc.refit.RefitBusy` while one is open).
    ``restore_on_refusal``: workers keep a host copy of the served weights while ``finish`` applies an
    update, and put it back if the model refuses the update half-way (default True; False saves one
    model's worth of host memory and a copy per update, and leaves such an update half-applied).
    """

    backend: ClassVar[str] = BACKEND
    endpoint: str | None = None
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    device: str | None = None
    timeout_s: float = 60.0
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    stage_on_host: bool = False
    max_update_bytes: int = 0
    check_finite: bool = False
    take_over: bool = False
    restore_on_refusal: bool = True
