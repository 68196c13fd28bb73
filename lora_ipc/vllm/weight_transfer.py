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
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Annotated, Any, ClassVar, cast

import torch
from msgspec import Meta

from .compat import checked_refit_surface, params_of

checked_refit_surface()  # UnsupportedVLLM naming what differs, before anything below subclasses vLLM's classes

from vllm.distributed.weight_transfer.base import (  # noqa: E402
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from ..core.channels.endpoint import ipc_path  # noqa: E402
from ..core.protocol import Count, Name, carried, check_fields, tagged  # noqa: E402
from ..refit import (  # noqa: E402
    DEFAULT_BUCKET_BYTES,
    BucketRef,
    RefitBusy,
    RefitError,
    RefitStrayBucket,
    RefitTakenOver,
    RefitTimeout,
    WeightReceiver,
    WeightSender,
)
from .plugin import BACKEND, register_weight_transfer  # noqa: E402
from .refit_guard import LayerUndo, check_update  # noqa: E402

log = logging.getLogger("lora_ipc.vllm")

DEFAULT_IDLE_TIMEOUT_S = 300.0
STAGE_LIMIT_FACTOR = 4  # default cap on what one update stages: this many times the served model's bytes
SUPERSEDED_KEPT = 16  # streams an engine remembers as taken over, to tell their controllers so


def refit_error(exc: Exception) -> RefitError:
    """``exc`` as a :class:`RefitError`: the one a worker raised, same class and message (it crosses vLLM's
    RPC as a typed code, see :func:`lora_ipc.core.protocol.carried`), else a RefitError with ``exc``'s text."""
    found = carried(exc)
    if isinstance(found, RefitError):
        return found
    return RefitError(f"{type(exc).__name__}: {exc}")


# ---- init / update info ----------------------------------------------------------------------


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


# ---- worker side -----------------------------------------------------------------------------


@dataclass
class _Update:
    """One open update on this worker: what arrived so far, staged until ``finish`` applies it."""

    deadline: float
    stream: str = ""  # the controller's stream (the engine's init stream when the update was started)
    staged: list = field(default_factory=list)  # (name, owned tensor) in arrival order
    update: int = 0
    buckets: int = 0
    total: int = 0
    bytes: int = 0
    fetch_s: float = 0.0
    expired: str | None = None  # set when the worker rolled it back on its own (idle timeout)


def _load_format_bytes(model: torch.nn.Module) -> int:
    """The model's bytes in the format ``load_weights`` takes: the shapes vLLM recorded at load time for
    layerwise reload (kernels may repack weights afterwards, e.g. the CPU backend's oneDNN weights are
    smaller), or the live tensors, whichever is larger."""
    live = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    except ImportError:
        return live
    recorded = 0
    for module in model.modules():
        info = LAYERWISE_INFO.get(module)
        if info is not None:
            for tensors in info.restore_metadata:
                recorded += sum(t.numel() * t.element_size() for t in tensors.values())
    return max(live, recorded)


def _owning_worker() -> weakref.ref | None:
    """The vLLM worker constructing this engine (``Worker.load_model`` calls the factory), found on the stack.

    Needed for one field: vLLM ends its update session only when ``update_weights`` raises or
    ``finish_weight_update`` returns, so an update abandoned by a dead trainer, or one whose ``finish``
    failed, would keep refusing ``start_weight_update`` forever. The engine ends it (see ``_end_session``).
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if owner is not None and hasattr(owner, "_weight_update_active") and hasattr(owner, "model_runner"):
            try:
                return weakref.ref(owner)
            except TypeError:
                return None
        frame = frame.f_back
    return None


class LoraIpcWeightTransferEngine(WeightTransferEngine[LoraIpcInitInfo, LoraIpcUpdateInfo]):
    """Worker side: ``update_weights`` fetches one bucket into owned memory and stages it; ``finish``
    applies the whole update to the model at once. An update that fails, or goes ``idle_timeout_s``
    without a call, is rolled back: staged tensors dropped, the model untouched."""

    init_info_cls = LoraIpcInitInfo
    update_info_cls = LoraIpcUpdateInfo

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        checked_refit_surface(loader=True)  # what finish applies an update with: refused now, not at the first finish
        super().__init__(config, vllm_config, device, model)
        self._worker = _owning_worker()
        if self._worker is None:
            log.warning(
                "lora_ipc weight transfer: vLLM's worker was not found; an abandoned update will keep "
                "vLLM refusing start_weight_update until update_weights or finish_weight_update is called"
            )
        self._cond = threading.Condition()  # guards everything below; the reaper waits on it
        self._receiver: WeightReceiver | None = None
        self._info: LoraIpcInitInfo | None = None
        self._open: _Update | None = None
        self._reaper: threading.Thread | None = None
        self._superseded: collections.OrderedDict[str, str] = collections.OrderedDict()  # old stream -> by whom
        self._keep_session = False  # a stray bucket was refused: vLLM's session of the open update goes on
        self.last_update: dict = {"rollbacks": 0}  # the last complete update, plus rollbacks so far

    def parse_init_info(self, init_dict: dict[str, Any]) -> LoraIpcInitInfo:
        try:
            return LoraIpcInitInfo(**init_dict)
        except TypeError as exc:
            raise ValueError(f"invalid lora_ipc init_info: {exc}") from None

    def init_transfer_engine(self, init_info: LoraIpcInitInfo) -> None:
        with self._cond:
            update = self._open
            if update is not None and update.expired is None and update.buckets > 0:
                if not init_info.take_over:  # another controller is mid-update: it keeps the engine
                    raise tagged(
                        RefitBusy,
                        f"lora_ipc weight update {update.update} of stream {update.stream!r} is open "
                        f"({update.buckets} of {update.total} buckets): init for stream {init_info.stream!r} "
                        "refused, the open update is untouched. Wait for it to finish or to be rolled back "
                        "(idle timeout), or pass take_over=True",
                    )
                reason = f"stream {init_info.stream!r} took over (take_over=True)"
            else:  # nothing open, an empty update, or one the reaper already rolled back (a dead trainer)
                reason = f"stream {init_info.stream!r} called init_weight_transfer_engine"
            if update is not None:
                self._discard_open(f"{reason} during it")
                self._end_session()
            if self._info is not None and self._info.stream != init_info.stream:
                self._superseded[self._info.stream] = reason
                while len(self._superseded) > SUPERSEDED_KEPT:
                    self._superseded.popitem(last=False)
            self._superseded.pop(init_info.stream, None)
            if self._receiver is not None:
                self._receiver.close()
            limit = init_info.max_update_bytes or STAGE_LIMIT_FACTOR * _load_format_bytes(self.model)
            self._receiver = WeightReceiver(
                init_info.endpoint, init_info.stream, timeout_s=init_info.timeout_s, max_update_bytes=limit
            )
            self._info = init_info
        log.info("lora_ipc weight transfer: stream %s at %s", init_info.stream, init_info.endpoint)

    def _require_receiver(self) -> tuple[WeightReceiver, LoraIpcInitInfo]:
        """The receiver and the init info of ``init_transfer_engine``; RefitError before it was called."""
        if self._receiver is None or self._info is None:
            raise tagged(RefitError, "init_weight_transfer_engine was not called (the trainer's trainer_init does it)")
        return self._receiver, self._info

    def start_weight_update(self) -> None:
        with self._cond:
            receiver, info = self._require_receiver()
            if self._open is not None:  # vLLM let a start through: its own session ended (e.g. Ctrl-C mid-bucket)
                self._discard_open("a new update started")
            receiver.begin()
            self._open = _Update(deadline=time.monotonic() + info.idle_timeout_s, stream=info.stream)
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="lora-ipc-refit-reaper", daemon=True)
                self._reaper.start()
            self._cond.notify_all()

    def _refuse_stray(self, update: _Update | None, stream: str, what: str) -> BaseException:
        """The error for a call of a stream this engine is not initialized for. The open update is left as
        it was, and so is vLLM's session of it (restored in ``reset_weight_update_target``, which vLLM calls
        when ``update_weights`` raises). Caller holds ``_cond``."""
        if update is not None and update.buckets > 0:
            self._keep_session = True
        elif update is not None:  # an empty update: vLLM's session ends, so does ours
            self._open = None
        mine = self._info.stream if self._info is not None else None
        if stream in self._superseded:
            return tagged(
                RefitTakenOver,
                f"{what} of stream {stream!r} refused: {self._superseded[stream]} on this engine since; "
                f"the engine's own update is untouched",
            )
        return tagged(
            RefitStrayBucket,
            f"{what} of stream {stream!r} refused before anything was fetched: this engine was initialized "
            f"for stream {mine!r}; its open update is untouched",
        )

    def reset_weight_update_target(self) -> None:
        super().reset_weight_update_target()
        if self._keep_session:  # vLLM ended its session for a refused stray bucket: the open update goes on
            self._keep_session = False
            worker = self._worker() if self._worker is not None else None
            if worker is not None:
                worker._weight_update_active = True

    def receive_weights(self, update_info: LoraIpcUpdateInfo) -> None:
        with self._cond:
            self._keep_session = False
            update = self._open
            receiver, info = self._require_receiver()
            if update_info.stream != info.stream:
                raise self._refuse_stray(update, update_info.stream, "abort" if update_info.abort else "a bucket")
            if update_info.abort:
                self._abort(update)
                return
            if update is None:
                raise tagged(RefitError, "no lora_ipc update is open on this worker (call start_weight_update)")
            if update.expired is not None:  # vLLM ends its session when this raises
                self._open = None
                raise tagged(RefitTimeout, update.expired)
            try:
                started = time.perf_counter()
                weights = receiver.receive(update_info, "cpu" if info.stage_on_host else self.device)
                update.fetch_s += time.perf_counter() - started
                if info.check_finite:
                    bad = [n for n, t in weights if t.is_floating_point() and not bool(torch.isfinite(t).all())]
                    if bad:
                        raise RefitError(f"NaN or inf in {len(bad)} tensor(s), e.g. {bad[:3]} (check_finite)")
            except BaseException as exc:  # Ctrl-C included: roll back first, then let it through untouched
                self._roll_back(update, f"bucket {update_info.bucket + 1} of {update_info.buckets} failed")
                self._open = None
                if not isinstance(exc, Exception):
                    raise
                cls = type(exc) if isinstance(exc, RefitError) else RefitError
                raise tagged(
                    cls,
                    f"lora_ipc weight update {update_info.update} failed at bucket "
                    f"{update_info.bucket + 1} of {update_info.buckets}: {type(exc).__name__}: {exc}. "
                    "Rolled back: the engine serves the weights of the last complete update",
                ) from exc
            update.staged.extend(weights)
            update.bytes += sum(t.numel() * t.element_size() for _, t in weights)
            update.update, update.buckets, update.total = update_info.update, update.buckets + 1, update_info.buckets
            update.deadline = time.monotonic() + info.idle_timeout_s
            self._cond.notify_all()

    def _abort(self, update: _Update | None) -> None:
        """The controller ends its own open update: rolled back, vLLM's session ended. Caller holds ``_cond``."""
        if update is not None:
            self._discard_open(f"its controller aborted it (stream {update.stream!r})")
        self._end_session()
        if self._worker is None:  # vLLM's session can only be ended by raising
            raise tagged(RefitError, "lora_ipc weight update aborted by its controller and rolled back")

    def finish_weight_update(self) -> None:
        with self._cond:
            update = self._open
            receiver = self._receiver
            if update is not None and update.expired is None and update.buckets > 0 and receiver is not None:
                missing = receiver.missing()
                if missing is not None:  # vLLM's finish names no stream: an incomplete update is left alone
                    raise tagged(
                        RefitError,
                        f"lora_ipc weight update {update.update} of stream {update.stream!r} is incomplete "
                        f"({missing}): not applied, and left open for its controller to complete or abort "
                        "(rolled back after its idle timeout); the engine serves the weights of the last "
                        "complete update",
                    )
            self._open = None
            try:
                if update is None:
                    raise tagged(RefitError, "no lora_ipc update is open on this worker")
                if update.expired is not None:
                    raise tagged(RefitTimeout, update.expired)
                try:
                    self._require_receiver()[0].end()
                except RefitError as exc:
                    self._roll_back(update, str(exc))
                    raise tagged(
                        type(exc), f"{exc}. Rolled back: the engine serves the weights of the last complete update"
                    ) from exc
                self._apply(update)
            except BaseException:
                self._end_session()  # vLLM ends its session only when finish returns (Ctrl-C re-raised as is)
                raise

    def _apply(self, update: _Update) -> None:
        """Check the staged update against the model (a dry run on ``meta``: refused with the model untouched),
        then load every staged tensor inside one layerwise reload; finalize always runs (nothing stays on
        meta). If the model refuses half-way, the layers are put back from a host copy taken just before."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        info = self._require_receiver()[1]
        with _mtp_completeness_check_disabled():
            check_update(self.model, update.staged, update.update)
        undo = LayerUndo(self.model.modules()) if info.restore_on_refusal else None
        mtp_off = _mtp_completeness_check_disabled()

        staged = collections.deque(update.staged)
        update.staged = []

        def drain():  # hands each tensor over once: vLLM drops it after its layer is processed
            while staged:
                yield staged.popleft()

        started = time.perf_counter()
        failure: BaseException | None = None
        initialize_layerwise_reload(self.model)
        try:
            with mtp_off:
                cast(Any, self.model).load_weights(drain())  # vLLM's model classes, not nn.Module's API
        except BaseException as exc:  # any refusal of the model's loader becomes the typed RefitError below
            failure = exc
        finally:
            loaded = time.perf_counter()
            staged.clear()
            try:
                finalize_layerwise_reload(self.model, self.model_config)
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            if undo is None:
                if not isinstance(failure, Exception):
                    raise failure
                raise tagged(
                    RefitError,
                    f"the model refused lora_ipc weight update {update.update} "
                    f"({type(failure).__name__}: {failure}); layers loaded before the refused "
                    "tensor hold the new weights (restore_on_refusal=False): send a complete, matching update",
                ) from failure
            undo.restore()
            self.last_update["restored"] = self.last_update.get("restored", 0) + 1
            if not isinstance(failure, Exception):  # Ctrl-C: the old weights are back, then it goes on as is
                raise failure
            raise tagged(
                RefitError,
                f"the model refused lora_ipc weight update {update.update} while applying it "
                f"({type(failure).__name__}: {failure}); every layer was restored from the copy taken "
                "before: the engine serves the weights of the last complete update",
            ) from failure
        self.last_update.update(
            buckets=update.buckets,
            bytes=update.bytes,
            fetch_ms=update.fetch_s * 1e3,
            load_weights_ms=(loaded - started) * 1e3,
            finalize_ms=(time.perf_counter() - loaded) * 1e3,
        )
        log.info("lora_ipc weight update complete: %s", self.last_update)

    def _roll_back(self, update: _Update, reason: str) -> None:
        """Drop what ``update`` staged (the model was never touched). Caller holds ``_cond``."""
        update.staged = []
        if self._receiver is not None:
            self._receiver.begin()
        self.last_update["rollbacks"] = self.last_update.get("rollbacks", 0) + 1
        self.last_update["last_rollback"] = {
            "update": update.update,
            "buckets": update.buckets,
            "of": update.total,
            "reason": reason,
        }
        log.warning(
            "lora_ipc weight update %s rolled back after %d of %d buckets: %s",
            update.update,
            update.buckets,
            update.total,
            reason,
        )

    def _discard_open(self, reason: str) -> None:
        """Roll back the open update unless the reaper already did. Caller holds ``_cond``."""
        if self._open is not None and self._open.expired is None:
            self._roll_back(self._open, reason)
        self._open = None

    def _end_session(self) -> None:
        """End vLLM's update session on this worker, so the next ``start_weight_update`` is accepted."""
        worker = self._worker() if self._worker is not None else None
        if worker is not None:
            worker._weight_update_active = False
        self.reset_weight_update_target()

    def _reap(self) -> None:
        """Rolls back an open update once it has gone ``idle_timeout_s`` without a call. It keeps vLLM's
        session open, so the late trainer's next call gets ``RefitTimeout`` (and ends it), and a new
        trainer's ``init_weight_transfer_engine`` ends it too."""
        me = threading.current_thread()
        with self._cond:
            while self._reaper is me:
                update = self._open
                if update is None or update.expired is not None:
                    self._cond.wait()
                    continue
                left = update.deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                idle = self._info.idle_timeout_s if self._info is not None else 0.0
                update.expired = (
                    f"lora_ipc weight update {update.update} got no call for {idle:g} s after "
                    f"{update.buckets} of {update.total or '?'} buckets and was rolled back: the "
                    "engine serves the weights of the last complete update"
                )
                self._roll_back(update, f"idle for {idle:g} s")

    def shutdown(self) -> None:
        with self._cond:
            if self._open is not None:
                self._discard_open("the weight transfer engine was shut down")
            self._reaper = None
            self._cond.notify_all()
            if self._receiver is not None:
                self._receiver.close()
                self._receiver = None


# ---- trainer side ----------------------------------------------------------------------------

_TRAINER_BASE_PARAMS = params_of(TrainerWeightTransferEngine.__init__, drop_first=True)
_BASE_TAKES_CONFIG = "config" in _TRAINER_BASE_PARAMS.names
_BASE_TAKES_RANK = "rank" in _TRAINER_BASE_PARAMS.names  # vLLM 0.34


def _mtp_completeness_check_disabled() -> contextlib.AbstractContextManager:
    """vLLM 0.32-0.33 check after ``load_weights`` that an MTP draft model got every weight (a partial
    update is legal here); 0.34 has no such check (checked at registration: :mod:`.compat`)."""
    try:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
    except ImportError:
        return contextlib.nullcontext()
    return disable_mtp_completeness_check()


def _config_and_init_info(args: tuple, named: dict) -> tuple[Any, Any]:
    """(config, init_info) from either ``trainer_init`` form; anything else is a TypeError."""
    if unknown := set(named) - {"config", "init_info"}:
        raise TypeError(f"trainer_init() got unexpected keyword arguments {sorted(unknown)}")
    given = dict(zip(("init_info",) if len(args) == 1 else ("config", "init_info"), args))
    if len(args) > 2 or set(given) & set(named):
        raise TypeError("trainer_init() takes (init_info) or (config, init_info), each once")
    given.update(named)
    if "init_info" not in given:
        raise TypeError("trainer_init() missing its init_info")
    return given.get("config"), given["init_info"]


class LoraIpcTrainerWeightTransferEngine(TrainerWeightTransferEngine[LoraIpcTrainerInitInfo]):
    """Trainer side. Rank 0 owns the exporter and drives the client; other ranks only iterate the
    source in step (a sharded source's ``full_tensor()`` is a collective every rank must join)."""

    init_info_cls = LoraIpcTrainerInitInfo

    def __init__(
        self,
        config: Any = None,
        *,
        client: VLLMWeightSyncClient,
        source: WeightSource | None,
        is_sender: bool = True,
        sender: WeightSender | None = None,
        rank: int = 0,
    ) -> None:
        # vLLM's base took a ``config`` first in some releases (Generic[TConfig, TInitInfo]) and not in others;
        # 0.34's takes the trainer rank
        named: dict[str, Any] = {"client": client, "source": source, "is_sender": is_sender}
        if _BASE_TAKES_RANK:
            named["rank"] = rank
        if _BASE_TAKES_CONFIG:
            super().__init__(config, **named)  # type: ignore[call-arg]
        else:
            super().__init__(**named)
        self.rank = rank
        self.config = config
        self.sender = sender

    @classmethod
    def trainer_init(
        cls, *args: Any, client: VLLMWeightSyncClient, source: WeightSource | None = None, **named: Any
    ) -> LoraIpcTrainerWeightTransferEngine:
        """``trainer_init(init_info, *, client, source)``, or vLLM's other form ``trainer_init(config,
        init_info, *, client, source)`` (also by keyword); ``config`` is kept, lora_ipc needs nothing from it."""
        config, init_info = _config_and_init_info(args, named)
        if source is None:
            raise ValueError("the lora_ipc trainer engine needs a WeightSource (e.g. ModuleSource(model))")
        if not isinstance(init_info, LoraIpcTrainerInitInfo):
            raise TypeError(
                f"the lora_ipc trainer engine takes a LoraIpcTrainerInitInfo, not {type(init_info).__name__}"
            )
        if not init_info.is_sender:
            return cls(config, client=client, source=source, is_sender=False, rank=int(getattr(init_info, "rank", 0)))
        sender = WeightSender(
            init_info.endpoint,
            bucket_bytes=init_info.bucket_bytes,
            device=init_info.device,
            lease_timeout_s=max(60.0, 2 * init_info.timeout_s),
        )
        try:
            client.init_weight_transfer_engine(
                asdict(
                    LoraIpcInitInfo(
                        sender.endpoint,
                        sender.stream,
                        timeout_s=float(init_info.timeout_s),
                        idle_timeout_s=float(init_info.idle_timeout_s),
                        stage_on_host=bool(init_info.stage_on_host),
                        max_update_bytes=int(init_info.max_update_bytes),
                        check_finite=bool(init_info.check_finite),
                        take_over=bool(init_info.take_over),
                        restore_on_refusal=bool(init_info.restore_on_refusal),
                    )
                )
            )
        except BaseException:  # cleanup, then the same exception (Ctrl-C included) goes on
            sender.close()
            raise
        return cls(config, client=client, source=source, sender=sender, rank=int(getattr(init_info, "rank", 0)))

    def send_weights(self, weight_version: str | None = None) -> None:
        """One full update: start, one ``update_weights`` per bucket, finish (with ``weight_version``).

        Raises :class:`RefitError` (or a subclass, e.g. :class:`RefitTimeout` when the workers had already
        rolled the update back) if the update did not complete; the engine then still serves the weights of
        the last complete update, and the next ``send_weights`` starts afresh.
        """
        assert self.source is not None
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        assert self.sender is not None
        params = [(m.name, m.dtype, tuple(m.shape)) for m in self.source.metadata()]
        try:
            self.client.start_weight_update()
        except Exception as exc:  # vLLM refuses a start while an update is open: one this trainer left
            self._abandon()  # unfinished (e.g. Ctrl-C inside send_weights). End it, then start once more.
            # (Exception, not BaseException: a Ctrl-C here propagates as is, as everywhere in the refit path.)
            try:
                self.client.start_weight_update()
            except Exception:  # refused again: the first refusal is the one to report
                raise refit_error(exc) from exc
        try:
            self.sender.send(params, iter(self.source), lambda ref: self.client.update_weights(asdict(ref)))
            self.client.finish_weight_update(weight_version)
        except Exception as exc:  # a client's RPC error (vLLM's plain Exception) or ours: typed RefitError
            self._abandon()
            raise refit_error(exc) from exc

    def _abandon(self) -> None:
        """End this trainer's failed update on the engine now rather than at its idle timeout: an abort
        bound to this trainer's stream (another controller's update is never touched). If the engine
        already ended it, the abort only ends vLLM's session, or fails (vLLM: no session open)."""
        assert self.sender is not None
        abort = LoraIpcUpdateInfo(self.sender.stream, 1, max(1, self.sender.updates), 0, 1, abort=True)
        try:
            self.client.update_weights(asdict(abort))
        except Exception as exc:  # expected where the engine already ended the update
            log.debug("aborting the failed update: %s", exc)

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None


# ---- an in-process client --------------------------------------------------------------------


class OfflineLLMClient:
    """The four-method client for an offline ``vllm.LLM`` in this process.

    After each finished update it resets the prefix cache: vLLM keys cached KV blocks by tokens (and
    adapter), not by weights, so blocks computed with the old weights would otherwise be reused.
    Every failure is raised as a :class:`RefitError` (the one the worker raised, same class and message:
    vLLM's ``LLM`` raises a plain ``Exception`` carrying the worker's typed code, hence ``except Exception``).
    """

    def __init__(self, llm: Any, reset_prefix_cache: bool = True) -> None:
        self.llm = llm
        self.reset_prefix_cache = reset_prefix_cache

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        try:
            self.llm.init_weight_transfer_engine({"init_info": init_info})
        except Exception as exc:
            raise refit_error(exc) from exc

    def start_weight_update(self) -> None:
        try:
            self.llm.start_weight_update()
        except Exception as exc:
            raise refit_error(exc) from exc

    def update_weights(self, update_info: dict[str, Any]) -> None:
        try:
            self.llm.update_weights({"update_info": update_info})
        except Exception as exc:
            raise refit_error(exc) from exc

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        try:
            self.llm.finish_weight_update(weight_version)
        except Exception as exc:
            raise refit_error(exc) from exc
        if self.reset_prefix_cache:
            self.llm.reset_prefix_cache()


register_weight_transfer()
