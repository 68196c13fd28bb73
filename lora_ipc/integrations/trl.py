"""TRL 1.16: adapter-only LoRA sync for every trainer built on ``VLLMGeneration`` (GRPO, RLOO, ...), and AsyncGRPO.

    import lora_ipc.integrations.trl as lora_trl
    lora_trl.install(adapter="policy")                       # colocate: install(adapter="policy", max_lora_rank=16)
    trainer = GRPOTrainer(model=..., peft_config=LoraConfig(...), reward_funcs=...,
                          args=GRPOConfig(use_vllm=True, vllm_mode="server"))   # or "colocate"
    trainer.train()

Server mode needs a vLLM server on this node with LoRA enabled (lora_ipc installed there: its plugin serves
``lora-ipc://`` paths), e.g. ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 trl vllm-serve --model M --enable-lora
--max-lora-rank 16``.

TRL 1.16 syncs a PEFT model by merging the adapter into the base weights and pushing every weight (NCCL to a
server, ``load_weights`` into a colocated engine), then unmerging. ``install`` replaces, at runtime and nothing
on disk, two methods of ``trl.generation.vllm_generation.VLLMGeneration``:

- ``_init_vllm``: server mode builds TRL's ``VLLMClient`` without ``init_communicator`` (no NCCL group) and
  checks the server serves LoRA adapters of the model's rank; colocate mode builds TRL's own ``LLM(...)`` with
  ``enable_lora``, ``max_lora_rank``, ``max_loras``, ``max_cpu_loras`` added, and wraps it so that ``generate``
  uses the newest synced version (and raises before the first sync, never the base model).
- ``sync_weights``: the adapter (never merged weights; ``merge_adapter`` is not called, the engine's base
  weights never change) is published through an :class:`~lora_ipc.AdapterExporter` (gathered first under
  ZeRO-3 / FSDP2, published from rank 0), then the engine loads exactly that version: server mode through
  ``/v1/load_lora_adapter`` with the pinned ``lora-ipc://`` URI (``exporter.uri``) under the name
  ``<adapter>-v<version>-<epoch>``, to which TRL's requests are pointed (``vllm_client.model``), the
  previous version unloaded; colocate mode through :func:`lora_ipc.vllm.add_lora`, the previous version removed.

The store epoch in every name and path keeps a restarted trainer (its versions numbered from 1 again) from
ever being served a previous run's bytes by a long-lived server. A model vLLM cannot serve as an adapter (not a
PEFT model, DoRA, ``modules_to_save``, trained biases, several active adapters, ...: TRL's own
``validate_lora_for_vllm_sync`` decides) keeps TRL's merged path, with one warning naming the reason.
Refused with an error: colocate sleep mode (its level 2 discards the base weights, which only TRL's merged
path re-pushes), FSDP1, colocate without ``max_lora_rank``, a server without LoRA or with a smaller
``--max-lora-rank``.

``install`` also does the same for ``trl.experimental.async_grpo``: its
``_sync_weight_lora`` publishes through lora_ipc and loads ``trl-policy-<tag>-v<N>`` from the pinned URI
instead of saving to ``output_dir/.vllm_lora`` and loading from disk (``trl-policy-<random>`` per trainer,
so a restarted trainer never meets a previous run's names); its version numbers, its unloads of stale
versions and its rollout worker are TRL's.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import trl
from packaging.version import Version
from trl.generation import vllm_generation
from trl.generation.vllm_generation import VLLMGeneration

from ..lora.adapters import AdapterExporter, RemoteExporter
from ..lora.uri import AdapterURI
from .sharded import publish_sharded

SUPPORTED_TRL = ("1.16.0", "1.17")  # [lowest tested, first untested): TRL releases change VLLMGeneration often
_PATCHED = ("_init_vllm", "sync_weights")
_ORIGINAL = {name: VLLMGeneration.__dict__[name] for name in _PATCHED}
_lock = threading.Lock()


@dataclass(frozen=True)
class Settings:
    """What :func:`install` was given."""

    adapter: str
    max_lora_rank: int | None = None
    max_loras: int = 1
    max_cpu_loras: int | None = None
    keep: int = 2
    exporter: Any = None  # an AdapterExporter / RemoteExporter the caller owns; None: one of ours, made on first use
    engine_args: dict = field(default_factory=dict)


_settings: Settings | None = None
_owned_exporter: AdapterExporter | None = None
_syncs: weakref.WeakSet = weakref.WeakSet()


@dataclass
class SyncTiming:
    version: int
    publish_s: float  # gather (when sharded) + publish into the exporter
    load_s: float  # the engine loads that version (server: /v1/load_lora_adapter; colocate: add_lora)


class AdapterSync:
    """One ``VLLMGeneration``'s adapter sync (``vllm_generation.lora_ipc``): what rank 0 published last, what the
    engine serves now, and each sync's timing."""

    def __init__(self, settings: Settings, mode: str):
        self.settings = settings
        self.mode = mode
        self.version: int | None = None  # the version the engine generates with now (None: nothing synced yet)
        self.served: Any = None  # server: the model name requests use; colocate: the LoRARequest
        self.timings: list[SyncTiming] = []
        self._server: Any = None  # server mode, rank 0: TRL's VLLMClient

    # ---- publishing (every rank: the gathers are collectives) ----

    def publish(self, gen: VLLMGeneration) -> tuple[Any, int | None]:
        """(the exporter, the version) on the main process; (None, None) elsewhere."""
        model = gen.model
        exporter = _exporter() if gen.accelerator.is_main_process else None
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        with gen._dist.gather_params(lora):  # ZeRO-3: TRL's own gather; FSDP2 (DTensor) gathers in publish_sharded
            version = publish_sharded(
                self.settings.adapter, model, publish=exporter.publish if exporter is not None else _no_publish
            )
        return exporter, version

    def sync(self, gen: VLLMGeneration) -> None:
        t0 = time.perf_counter()
        exporter, version = self.publish(gen)
        t1 = time.perf_counter()
        if self.mode == "server":
            if version is not None:  # main process; TRL's requests come only from there
                self._load_server(exporter, version)
        else:
            self._load_colocated(gen, exporter, version)
        if version is not None:
            self.timings.append(SyncTiming(version, t1 - t0, time.perf_counter() - t1))

    def _load_server(self, exporter, version: int) -> None:
        uri = exporter.uri(self.settings.adapter, version)
        name = f"{self.settings.adapter}-v{version}-{AdapterURI.parse(uri).epoch}"
        _post(self._server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": uri})
        previous, self.served, self.version = self.served, name, version
        self._server.model = name  # TRL's generate sends {"model": vllm_client.model}
        if previous is not None:
            _post(self._server, "/v1/unload_lora_adapter", {"lora_name": previous}, quiet=True)

    def _load_colocated(self, gen: VLLMGeneration, exporter, version: int | None) -> None:
        from ..vllm.request import add_lora

        where = (exporter.endpoint, version) if version is not None else None
        if gen.accelerator.num_processes > 1:  # every rank's engine loads rank 0's version
            from accelerate.utils import broadcast_object_list

            where = broadcast_object_list([where], from_process=0)[0]
        if where is None:
            raise RuntimeError("lora_ipc: rank 0 published no adapter version")
        endpoint, version = where
        engine = gen.llm.llm_engine
        request = add_lora(gen.llm, self.settings.adapter, endpoint, version)  # raises LoraIpcError; nothing swapped
        previous, self.served, self.version = self.served, request, version
        if previous is not None and previous.lora_int_id != request.lora_int_id:
            engine.remove_lora(previous.lora_int_id)

    def close(self) -> None:
        """Unload what this sync loaded into a server (best effort: the server may be gone)."""
        if self.mode == "server" and self._server is not None and self.served is not None:
            _post(self._server, "/v1/unload_lora_adapter", {"lora_name": self.served}, quiet=True)
            self.served = None


class _AdapterLLM:
    """TRL's colocated ``LLM`` whose ``generate`` uses the newest synced version when given no ``lora_request``."""

    def __init__(self, llm, sync: AdapterSync):
        self._llm = llm
        self._sync = sync

    def generate(self, *args, **kwargs):
        if kwargs.get("lora_request") is None:
            if self._sync.served is None:
                raise RuntimeError("lora_ipc: no adapter version synced into the engine yet (sync_weights first)")
            kwargs["lora_request"] = self._sync.served
        return self._llm.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._llm, name)


# ---- the patched VLLMGeneration methods -------------------------------------------------------------------


def _init_vllm(self: VLLMGeneration) -> None:
    settings = _require_settings()
    reason = unservable_reason(self.model)
    if reason is not None or self.mode not in ("server", "colocate"):
        if reason is not None:
            warnings.warn(
                f"lora_ipc.integrations.trl: TRL's own merged-weight sync is used for this trainer: {reason}",
                stacklevel=2,
            )
        self.lora_ipc = None
        _ORIGINAL["_init_vllm"](self)
        return
    if self._dist.is_fsdp and self._dist.fsdp_version == 1:
        raise ValueError("lora_ipc.integrations.trl: FSDP1 is not supported (FSDP2 and DeepSpeed ZeRO-3 are)")
    rank = _adapter_rank(self.model)
    sync = AdapterSync(settings, self.mode)
    if self.mode == "colocate":
        if self.enable_sleep_mode:
            raise ValueError(
                "lora_ipc.integrations.trl: vllm_enable_sleep_mode is not supported in colocate mode (its level-2 "
                "sleep discards the base weights, which only TRL's merged sync pushes back); turn it off, or "
                "lora_trl.uninstall()"
            )
        if settings.max_lora_rank is None:
            raise ValueError("lora_ipc.integrations.trl: colocate mode needs install(..., max_lora_rank=...)")
        if rank > settings.max_lora_rank:
            raise ValueError(f"the adapter has rank {rank}, above install(max_lora_rank={settings.max_lora_rank})")
        with _lora_engine_args(settings):
            _ORIGINAL["_init_vllm"](self)
        self.llm = _AdapterLLM(self.llm, sync)
    else:
        if self.accelerator.is_main_process:  # TRL's server setup, less init_communicator (the NCCL group)
            base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
            self.vllm_client = vllm_generation.VLLMClient(
                base_url=base_url, group_port=self.group_port, connection_timeout=self.server_timeout
            )
            _check_server(self.vllm_client, rank)
            sync._server = self.vllm_client
            # Until the first sync names an adapter, a request must fail rather than use the base model.
            self.vllm_client.model = "lora-ipc-no-adapter-synced-yet"
        self.accelerator.wait_for_everyone()
    self.lora_ipc = sync
    _syncs.add(sync)


def _sync_weights(self: VLLMGeneration) -> None:
    sync = getattr(self, "lora_ipc", None)
    if sync is None:
        _ORIGINAL["sync_weights"](self)
        return
    sync.sync(self)


# ---- AsyncGRPO --------------------------------------------------------------------------------------------

_ASYNC_PATCHED = ("_init_lora_sync", "_sync_weight_lora")
_async_original: dict[str, Any] = {}


def _async_init_lora_sync(self, model) -> bool:
    lora_sync = _async_original["_init_lora_sync"](self, model)
    if lora_sync:  # a name of this trainer's own: a restarted trainer's v1 is never a previous run's v1
        self._lora_name = f"trl-policy-{secrets.token_hex(4)}"
    return lora_sync


def _async_sync_weight_lora(self, t0: float):
    """AsyncGRPO's ``_sync_weight_lora`` with the save to disk replaced by a publish through lora_ipc."""
    settings = _require_settings()
    version = self.model_version + 1
    model = self.accelerator.unwrap_model(self.model)
    if self.accelerator.is_main_process:
        self.vllm_client.pause()
    t_pause = time.time()
    self.accelerator.wait_for_everyone()
    t_barrier = time.time()
    exporter = _exporter() if self.accelerator.is_main_process else None
    published = publish_sharded(
        settings.adapter,
        model,
        publish=exporter.publish if exporter is not None else _no_publish,
        adapter_name=self._adapter_name,
    )
    t_transfer = time.time()
    self.accelerator.wait_for_everyone()
    if self.accelerator.is_main_process:
        assert exporter is not None and published is not None
        self.vllm_client.load_lora_adapter(f"{self._lora_name}-v{version}", exporter.uri(settings.adapter, published))
        self.vllm_client.resume()
        stale_version = version - (self.args.max_staleness + 1)
        if stale_version > 0:
            self.vllm_client.unload_lora_adapter(f"{self._lora_name}-v{stale_version}")
        self.model_version = version
        if self.rollout_worker:
            self.rollout_worker.update_model_version(self.model_version)
    return t_pause, t_barrier, t_transfer


# ---- install / uninstall ----------------------------------------------------------------------------------


def install(
    adapter: str = "policy",
    *,
    max_lora_rank: int | None = None,
    max_loras: int = 1,
    max_cpu_loras: int | None = None,
    keep: int = 2,
    exporter: Any = None,
    **engine_args: Any,
) -> None:
    """Make TRL's vLLM trainers sync the LoRA adapter through lora_ipc (before building the trainer).

    ``adapter``: the name versions are published under. Colocate mode: ``max_lora_rank`` (at least the
    adapter's rank), ``max_loras``, ``max_cpu_loras`` and extra ``engine_args`` go into TRL's ``LLM(...)``.
    ``keep``: versions the exporter keeps (at least 2: the one the engine serves and the one before).
    ``exporter``: publish into this ``AdapterExporter`` / ``RemoteExporter`` (yours to close); by default one
    is made in this process on first use, closed by :func:`uninstall`. Calling ``install`` again replaces the
    settings (``uninstall`` first: trainers built before then fail at their next sync).
    """
    check_trl_version()
    if not isinstance(adapter, str) or not adapter:
        raise ValueError("adapter must be the non-empty name versions are published under")
    if max_lora_rank is not None and (type(max_lora_rank) is not int or max_lora_rank <= 0):
        raise ValueError(f"max_lora_rank must be a positive int, got {max_lora_rank!r}")
    if type(max_loras) is not int or max_loras <= 0:
        raise ValueError(f"max_loras must be a positive int, got {max_loras!r}")
    if max_cpu_loras is not None and (type(max_cpu_loras) is not int or max_cpu_loras < max_loras):
        raise ValueError(f"max_cpu_loras must be an int >= max_loras, got {max_cpu_loras!r}")
    if type(keep) is not int or keep < 2:
        raise ValueError(f"keep must be an int >= 2 (the served version and the one before), got {keep!r}")
    if exporter is not None and not isinstance(exporter, (AdapterExporter, RemoteExporter)):
        raise TypeError("exporter must be a lora_ipc AdapterExporter or RemoteExporter")
    clash = {"enable_lora", "max_lora_rank", "max_loras", "max_cpu_loras"} & set(engine_args)
    if clash:
        raise ValueError(f"pass {sorted(clash)} as install()'s own arguments")
    settings = Settings(adapter, max_lora_rank, max_loras, max_cpu_loras, keep, exporter, dict(engine_args))
    uninstall()
    global _settings
    with _lock:
        _settings = settings
        for name in _PATCHED:
            setattr(VLLMGeneration, name, globals()[f"_{name.lstrip('_')}"])
    _install_async_grpo()


def uninstall() -> None:
    """Put TRL's own ``VLLMGeneration`` (and AsyncGRPO) methods back, unload what synced trainers loaded into
    a server, and close the exporter :func:`install` made (not one given to it)."""
    global _settings, _owned_exporter
    with _lock:
        for name in _PATCHED:
            setattr(VLLMGeneration, name, _ORIGINAL[name])
        if _async_original:
            from trl.experimental.async_grpo import async_grpo_trainer

            for name, fn in _async_original.items():
                setattr(async_grpo_trainer.AsyncGRPOTrainer, name, fn)
            _async_original.clear()
        syncs, exporter = list(_syncs), _owned_exporter
        _syncs.clear()
        _settings, _owned_exporter = None, None
    for sync in syncs:
        sync.close()
    if exporter is not None:
        exporter.close()


def installed() -> Settings | None:
    """The settings in force (None: not installed)."""
    return _settings


def check_trl_version(version: str | None = None) -> None:
    """Refuse a TRL outside the tested releases (``VLLMGeneration`` changes between TRL minors)."""
    version = trl.__version__ if version is None else version
    low, high = SUPPORTED_TRL
    if not Version(low) <= Version(Version(version).base_version) < Version(high):
        raise RuntimeError(
            f"lora_ipc.integrations.trl supports TRL >={low},<{high} (tested: {low}); this is TRL {version}. "
            "Its VLLMGeneration is what install() patches, and it changes between TRL releases."
        )
    missing = [name for name in _PATCHED if not callable(_ORIGINAL.get(name))]
    if missing:
        raise RuntimeError(f"this TRL's VLLMGeneration lacks {missing}")


def unservable_reason(model) -> str | None:
    """Why vLLM cannot serve ``model``'s adapter as a LoRA adapter (None: it can); TRL's own validator."""
    from accelerate.utils import is_peft_model

    if not is_peft_model(model):
        return "the model is not a PEFT model (there is no adapter to sync)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # importing trl.experimental warns that it is experimental
        from trl.experimental.async_grpo.async_grpo_trainer import validate_lora_for_vllm_sync
    try:
        validate_lora_for_vllm_sync(model)
    except ValueError as exc:
        return str(exc)
    return None


# ---- helpers ----------------------------------------------------------------------------------------------


def _require_settings() -> Settings:
    settings = _settings
    if settings is None:  # a method patched by an install that was undone under a trainer
        raise RuntimeError("lora_ipc.integrations.trl is not installed (lora_trl.install(...))")
    return settings


def _exporter():
    """The exporter versions are published into (main process only)."""
    global _owned_exporter
    settings = _require_settings()
    if settings.exporter is not None:
        return settings.exporter
    with _lock:
        if _owned_exporter is None:
            _owned_exporter = AdapterExporter(keep=settings.keep)
        return _owned_exporter


def _no_publish(*_args, **_kwargs) -> int:
    raise AssertionError("only rank 0 publishes")


def _adapter_rank(model) -> int:
    config = model.peft_config[model.active_adapter]
    ranks = [int(config.r), *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values())]
    return max(ranks)


@contextlib.contextmanager
def _lora_engine_args(settings: Settings):
    """TRL builds its colocated engine with the module-level ``LLM``: add the LoRA arguments for that one call."""
    original = vllm_generation.LLM
    lora = dict(settings.engine_args, enable_lora=True, max_lora_rank=settings.max_lora_rank)
    lora.update(max_loras=settings.max_loras, max_cpu_loras=settings.max_cpu_loras or settings.max_loras + 1)

    def llm_with_lora(*args, **kwargs):
        return original(*args, **{**kwargs, **lora})

    vllm_generation.LLM = llm_with_lora
    try:
        yield
    finally:
        vllm_generation.LLM = original


def _check_server(client, rank: int) -> None:
    """The server serves LoRA adapters of ``rank`` (asked of its /server_info, which TRL's servers have)."""
    try:
        info = client.get_server_info()
    except Exception:  # no development endpoints: the first load_lora_adapter says what is wrong
        return
    lora = info.get("lora_config")
    if lora is None:
        raise RuntimeError(
            f"the vLLM server at {client.base_url} was started without --enable-lora: start it with "
            f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and --enable-lora --max-lora-rank {rank} (or more)"
        )
    if int(lora.get("max_lora_rank") or rank) < rank:
        raise RuntimeError(
            f"the adapter has rank {rank}, the vLLM server at {client.base_url} --max-lora-rank "
            f"{lora['max_lora_rank']}: restart it with a higher --max-lora-rank"
        )


def _post(client, path: str, body: dict, quiet: bool = False) -> None:
    try:
        response = client.session.post(f"{client.base_url}{path}", json=body, timeout=120)
        ok, text = response.status_code == 200, f"{response.status_code} {response.text[:2000]}"
    except Exception as exc:  # noqa: BLE001 - reported below
        ok, text = False, repr(exc)
    if ok:
        return
    if quiet:
        warnings.warn(f"lora_ipc: {path} {body.get('lora_name')!r} failed: {text}", stacklevel=3)
        return
    raise RuntimeError(f"lora_ipc: the vLLM server at {client.base_url} refused {path} {body}: {text}")


def _install_async_grpo() -> None:
    """Patch AsyncGRPO when TRL's experimental package imports (it needs more than GRPO does)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.async_grpo import async_grpo_trainer
    except ImportError:  # pragma: no cover - an AsyncGRPO dependency is missing: GRPO is patched all the same
        return
    cls = async_grpo_trainer.AsyncGRPOTrainer
    for name in _ASYNC_PATCHED:
        if not callable(getattr(cls, name, None)):
            raise RuntimeError(f"this TRL's AsyncGRPOTrainer lacks {name}")
        _async_original[name] = cls.__dict__[name]
    cls._init_lora_sync = _async_init_lora_sync
    cls._sync_weight_lora = _async_sync_weight_lora
