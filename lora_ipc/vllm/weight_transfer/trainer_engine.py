"""The trainer side: ``LoraIpcTrainerWeightTransferEngine``, made by vLLM's ``WeightTransferTrainerFactory``
(``trainer_init``). Rank 0 owns the exporter and drives the four-method client; ``send_weights`` is one
whole update, ended on the engine (an abort bound to this trainer's stream) when it fails."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from vllm.distributed.weight_transfer.base import TrainerWeightTransferEngine, VLLMWeightSyncClient, WeightSource

from ...refit import WeightSender
from ..compat import params_of
from .messages import LoraIpcInitInfo, LoraIpcTrainerInitInfo, LoraIpcUpdateInfo, refit_error

log = logging.getLogger("lora_ipc.vllm")

_TRAINER_BASE_PARAMS = params_of(TrainerWeightTransferEngine.__init__, drop_first=True)
_BASE_TAKES_CONFIG = "config" in _TRAINER_BASE_PARAMS.names
_BASE_TAKES_RANK = "rank" in _TRAINER_BASE_PARAMS.names  # vLLM 0.34


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
