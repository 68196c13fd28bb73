"""``lora_ipc`` as a backend of vLLM's weight-transfer framework (full-weight refit for RL).

Engine: ``LLM(..., weight_transfer_config={"backend": "lora_ipc"})`` (the plugin registers the
backend in every vLLM process). Trainer::

    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from lora_ipc.vllm.weight_transfer import LoraIpcTrainerInitInfo

    engine = WeightTransferTrainerFactory.trainer_init(
        LoraIpcTrainerInitInfo(rank=0), client=client, source=ModuleSource(model))
    ...  # after each optimizer step:
    engine.send_weights(weight_version="step-7")

``client`` is any four-method ``VLLMWeightSyncClient`` (vLLM's HTTP or Ray client, or
:class:`OfflineLLMClient` for an ``LLM`` in this process). The update info it carries is a
:class:`~lora_ipc.refit.BucketRef` as a dict of strings, ints and lists: it goes through the HTTP RL
routes without ``VLLM_ALLOW_INSECURE_SERIALIZATION``. The bytes go through lora_ipc slabs (shared
memory on CPU, CUDA IPC on GPU), see :mod:`lora_ipc.refit`.

Atomic updates: a worker stages the buckets of an update in memory it owns and touches the model
only in ``finish_weight_update``, which applies the whole update through vLLM's layerwise reload.
Until then the engine serves the previous weights, unchanged. An update that fails (a bucket that
cannot be fetched or is refused) or goes ``idle_timeout_s`` without a call (the trainer died) is
rolled back by the worker: the staged tensors are dropped, the model is never touched, the late
caller gets :class:`~lora_ipc.refit.RefitTimeout`, and the next ``trainer_init`` + ``send_weights``
works. An update the model itself refuses is refused whole: ``finish`` first dry-runs the apply on
``meta`` tensors (:mod:`.refit_guard`), and puts every layer back from a host copy if the real apply
still fails half-way. A worker serves one controller (the stream of the last init): another
controller's init while an update is open is refused (``RefitBusy``) unless it asks to take over, and
a bucket of another stream or a ``finish`` of an incomplete update leaves the open update alone. Cost:
up to one checkpoint-format copy of the model, held from the first bucket to ``finish`` (on the
model's device, or in host memory with ``stage_on_host``), and one host copy of the served model
during ``finish`` (``restore_on_refusal``). See docs/guides/refit.md.

LoRA: vLLM's ``finish_weight_update`` removes every loaded adapter (``reset_lora_state``). Requests
that name a ``lora-ipc://`` adapter load it again on first use (the exporter must still serve that
version); adapters added with ``add_lora`` must be re-added after each refit.

Modules: :mod:`.registration` (checked, then registered: first), :mod:`.messages` (init and update info),
:mod:`.worker_engine`, :mod:`.trainer_engine`, :mod:`.offline` (the in-process client).
"""

from __future__ import annotations

from .registration import check_and_register

check_and_register()  # UnsupportedVLLM naming what differs, before anything below subclasses vLLM's classes

from .messages import (  # noqa: E402
    DEFAULT_IDLE_TIMEOUT_S,
    LoraIpcInitInfo,
    LoraIpcTrainerInitInfo,
    LoraIpcUpdateInfo,
    refit_error,
)
from .offline import OfflineLLMClient  # noqa: E402
from .trainer_engine import LoraIpcTrainerWeightTransferEngine  # noqa: E402
from .worker_engine import LoraIpcWeightTransferEngine  # noqa: E402

__all__ = [
    "DEFAULT_IDLE_TIMEOUT_S",
    "LoraIpcInitInfo",
    "LoraIpcTrainerInitInfo",
    "LoraIpcTrainerWeightTransferEngine",
    "LoraIpcUpdateInfo",
    "LoraIpcWeightTransferEngine",
    "OfflineLLMClient",
    "refit_error",
]
