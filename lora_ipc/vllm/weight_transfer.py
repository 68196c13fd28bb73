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

Failure: if a bucket cannot be fetched (trainer gone: no reply within ``timeout_s``), the worker
finalizes vLLM's layerwise reload so every layer is materialized again and raises. The model then
holds the new weights for the layers that were complete, the old ones for layers no bucket reached,
and unspecified values for a layer cut mid-way: do not trust its outputs until a complete update has
finished (re-run ``trainer_init`` from a live trainer, then ``send_weights``).

LoRA: vLLM's ``finish_weight_update`` removes every loaded adapter (``reset_lora_state``). Requests
that name a ``lora-ipc://`` adapter load it again on first use (the exporter must still serve that
version); adapters added with ``add_lora`` must be re-added after each refit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from ..endpoint import ipc_path
from ..errors import ProtocolError
from ..refit import DEFAULT_BUCKET_BYTES, BucketRef, RefitError, WeightReceiver, WeightSender
from .plugin import BACKEND, register_weight_transfer

log = logging.getLogger("lora_ipc.vllm")


# ---- init / update info ----------------------------------------------------------------------


@dataclass
class LoraIpcInitInfo(WeightTransferInitInfo):
    """What a worker needs to fetch buckets: the trainer's endpoint, its stream name, a timeout."""

    endpoint: str
    stream: str
    timeout_s: float = 60.0

    def __post_init__(self):
        if type(self.endpoint) is not str:
            raise ProtocolError("init info 'endpoint' must be a string")
        ipc_path(self.endpoint)
        if type(self.stream) is not str or not 0 < len(self.stream) <= 512:
            raise ProtocolError("init info 'stream' must be a non-empty string")
        if type(self.timeout_s) not in (int, float) or not 0 < self.timeout_s <= 3600:
            raise ProtocolError("init info 'timeout_s' must be a number of seconds in (0, 3600]")


@dataclass
class LoraIpcUpdateInfo(WeightTransferUpdateInfo, BucketRef):
    """One bucket of one update (fields and checks: :class:`~lora_ipc.refit.BucketRef`)."""


@dataclass
class LoraIpcTrainerInitInfo(TrainerInitInfo):
    """Trainer side. Every field has a default: ``LoraIpcTrainerInitInfo(rank=0)`` works.

    ``endpoint``: where the trainer's exporter listens (default ``$LORA_IPC_ENDPOINT`` or a fresh
    private socket). ``bucket_bytes``: slab size per bucket (default 256 MiB; fewer, larger buckets mean
    fewer ``load_weights`` calls, each with a fixed cost in vLLM); a parameter larger than this is split.
    ``device``: where slabs live (default where the parameters are: CUDA IPC for GPU parameters).
    ``timeout_s``: how long a worker waits for the trainer before it fails the update.
    """

    backend: ClassVar[str] = BACKEND
    endpoint: str | None = None
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    device: str | None = None
    timeout_s: float = 60.0


# ---- worker side -----------------------------------------------------------------------------


class LoraIpcWeightTransferEngine(WeightTransferEngine[LoraIpcInitInfo, LoraIpcUpdateInfo]):
    """Worker side: each ``update_weights`` call fetches one bucket into owned memory and loads it."""

    init_info_cls = LoraIpcInitInfo
    update_info_cls = LoraIpcUpdateInfo

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self._receiver: WeightReceiver | None = None
        self._timing = {"fetch_s": 0.0, "load_s": 0.0, "bytes": 0}
        self.last_update: dict = {}  # the last complete update: buckets, bytes, fetch/load/finalize ms

    def parse_init_info(self, init_dict: dict[str, Any]) -> LoraIpcInitInfo:
        try:
            return LoraIpcInitInfo(**init_dict)
        except TypeError as exc:
            raise ValueError(f"invalid lora_ipc init_info: {exc}") from None

    def init_transfer_engine(self, init_info: LoraIpcInitInfo) -> None:
        if self._receiver is not None:
            self._receiver.close()
        self._receiver = WeightReceiver(init_info.endpoint, init_info.stream, timeout_s=init_info.timeout_s)
        log.info("lora_ipc weight transfer: stream %s at %s", init_info.stream, init_info.endpoint)

    def _require_receiver(self) -> WeightReceiver:
        if self._receiver is None:
            raise RefitError("init_weight_transfer_engine was not called (the trainer's trainer_init does it)")
        return self._receiver

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self._require_receiver().begin()
        self._timing = {"fetch_s": 0.0, "load_s": 0.0, "bytes": 0}
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: LoraIpcUpdateInfo) -> None:
        receiver = self._require_receiver()
        try:
            started = time.perf_counter()
            weights = receiver.receive(update_info, self.device)
            fetched = time.perf_counter()
            from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

            with disable_mtp_completeness_check():
                self.model.load_weights(weights)
            self._timing["fetch_s"] += fetched - started
            self._timing["load_s"] += time.perf_counter() - fetched
            self._timing["bytes"] += sum(t.numel() * t.element_size() for _, t in weights)
        except BaseException as exc:
            self._finalize()
            receiver.begin()
            raise RefitError(
                f"lora_ipc weight update {update_info.update} failed at bucket {update_info.bucket + 1} of "
                f"{update_info.buckets}: {type(exc).__name__}: {exc}. The model now mixes new and old weights; "
                "run a complete update before trusting its outputs") from exc

    def finish_weight_update(self) -> None:
        started = time.perf_counter()
        try:
            buckets = self._require_receiver().end()
        finally:
            self._finalize()
        t = self._timing
        self.last_update = {"buckets": buckets, "bytes": t["bytes"], "fetch_ms": t["fetch_s"] * 1e3,
                            "load_weights_ms": t["load_s"] * 1e3, "finalize_ms": (time.perf_counter() - started) * 1e3}
        log.info("lora_ipc weight update complete: %s", self.last_update)

    def _finalize(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None


# ---- trainer side ----------------------------------------------------------------------------


class LoraIpcTrainerWeightTransferEngine(TrainerWeightTransferEngine[LoraIpcTrainerInitInfo]):
    """Trainer side. Rank 0 owns the exporter and drives the client; other ranks only iterate the
    source in step (a sharded source's ``full_tensor()`` is a collective every rank must join)."""

    init_info_cls = LoraIpcTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool = True,
                 sender: WeightSender | None = None) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.sender = sender

    @classmethod
    def trainer_init(cls, init_info: LoraIpcTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> LoraIpcTrainerWeightTransferEngine:
        if source is None:
            raise ValueError("the lora_ipc trainer engine needs a WeightSource (e.g. ModuleSource(model))")
        if not init_info.is_sender:
            return cls(client=client, source=source, is_sender=False)
        sender = WeightSender(init_info.endpoint, bucket_bytes=init_info.bucket_bytes, device=init_info.device,
                              lease_timeout_s=max(60.0, 2 * init_info.timeout_s))
        try:
            client.init_weight_transfer_engine(
                asdict(LoraIpcInitInfo(sender.endpoint, sender.stream, float(init_info.timeout_s))))
        except BaseException:
            sender.close()
            raise
        return cls(client=client, source=source, sender=sender)

    def send_weights(self, weight_version: str | None = None) -> None:
        """One full update: start, one ``update_weights`` per bucket, finish (with ``weight_version``)."""
        assert self.source is not None
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        assert self.sender is not None
        params = [(m.name, m.dtype, tuple(m.shape)) for m in self.source.metadata()]
        self.client.start_weight_update()
        self.sender.send(params, iter(self.source), lambda ref: self.client.update_weights(asdict(ref)))
        self.client.finish_weight_update(weight_version)

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None


# ---- an in-process client --------------------------------------------------------------------


class OfflineLLMClient:
    """The four-method client for an offline ``vllm.LLM`` in this process.

    After each finished update it resets the prefix cache: vLLM keys cached KV blocks by tokens (and
    adapter), not by weights, so blocks computed with the old weights would otherwise be reused.
    """

    def __init__(self, llm: Any, reset_prefix_cache: bool = True) -> None:
        self.llm = llm
        self.reset_prefix_cache = reset_prefix_cache

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)
        if self.reset_prefix_cache:
            self.llm.reset_prefix_cache()


register_weight_transfer()
