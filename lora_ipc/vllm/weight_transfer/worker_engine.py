"""The worker side: ``LoraIpcWeightTransferEngine``, made by vLLM's ``WeightTransferEngineFactory`` in each
worker (``Worker.load_model``). ``update_weights`` fetches one bucket into owned memory and stages it;
``finish`` applies the whole update at once through vLLM's layerwise reload, after a dry run
(:mod:`..refit_guard`). vLLM's update session is steered through :mod:`..update_session`."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from ...core.protocol import tagged
from ...refit import RefitBusy, RefitError, RefitStrayBucket, RefitTakenOver, RefitTimeout, WeightReceiver
from .. import update_session
from ..compat import checked_refit_surface, runtime
from ..refit_guard import LayerUndo, check_update
from .messages import LoraIpcInitInfo, LoraIpcUpdateInfo

log = logging.getLogger("lora_ipc.vllm")

STAGE_LIMIT_FACTOR = 4  # default cap on what one update stages: this many times the served model's bytes
SUPERSEDED_KEPT = 16  # streams an engine remembers as taken over, to tell their controllers so


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
    infos = runtime.layerwise().LAYERWISE_INFO
    recorded = 0
    for module in model.modules():
        info = infos.get(module)
        if info is not None:
            for tensors in info.restore_metadata:
                recorded += sum(t.numel() * t.element_size() for t in tensors.values())
    return max(live, recorded)


class LoraIpcWeightTransferEngine(WeightTransferEngine[LoraIpcInitInfo, LoraIpcUpdateInfo]):
    """Worker side: ``update_weights`` fetches one bucket into owned memory and stages it; ``finish``
    applies the whole update to the model at once. An update that fails, or goes ``idle_timeout_s``
    without a call, is rolled back: staged tensors dropped, the model untouched."""

    init_info_cls = LoraIpcInitInfo
    update_info_cls = LoraIpcUpdateInfo

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        checked_refit_surface(loader=True)  # what finish applies an update with: refused now, not at the first finish
        super().__init__(config, vllm_config, device, model)
        update_session.install()  # the worker's init_weight_transfer_engine tells init_transfer_engine its worker
        self._worker: weakref.ref | None = None  # vLLM's worker, whose update session this engine ends and keeps
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
            self._worker = update_session.calling_worker() or self._worker
            if self._worker is None:
                log.warning(
                    "lora_ipc weight transfer: vLLM's worker did not hand over this init (a worker class that "
                    "overrides init_weight_transfer_engine?); an abandoned update keeps vLLM refusing "
                    "start_weight_update until its controller aborts it"
                )
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
            update_session.set_active(self._worker, True)

    def abort_weight_update(self) -> None:
        """vLLM's hook for a session it drops, where it has one (an update or finish that raised): the open
        update is rolled back, unless the drop was for a refused stray bucket, which leaves it alone."""
        with self._cond:
            if not self._keep_session and self._open is not None:
                self._discard_open("vLLM ended the update session")

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
        update_session.set_active(self._worker, False)
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


def _mtp_completeness_check_disabled() -> contextlib.AbstractContextManager:
    """vLLM 0.32-0.33 check after ``load_weights`` that an MTP draft model got every weight (a partial
    update is legal here); 0.34 has no such check (checked at registration: :mod:`.compat`)."""
    try:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
    except ImportError:
        return contextlib.nullcontext()
    return disable_mtp_completeness_check()
