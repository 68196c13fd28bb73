"""The checks: what a reader found (:mod:`.runtime`, :mod:`.source`) against what lora_ipc expects
(:mod:`.expectations`), and the typed error that stops registration when they differ.

Feature detection, never version numbers. :func:`checked_surface` runs at plugin registration in every vLLM
process (the LoRA loader, the OpenAI hooks, the model runner); :func:`checked_refit_surface` when the refit
backend is imported (the weight-transfer classes) and, with ``loader``, when a worker engine is made (the
layerwise reload, the worker's update session). A difference is :class:`UnsupportedVLLM` naming each one,
never a silent fallback.
"""

from __future__ import annotations

import functools

from ...core.errors import LoraIpcError
from . import expectations as E
from .expectations import EntrySurface, RefitSurface, VLLMSurface
from .runtime import refit_surface_from_runtime, surface_from_runtime


class UnsupportedVLLM(LoraIpcError):
    """The installed vLLM lacks, or changed, something lora_ipc hooks; the plugin refuses to register."""


def problems(s: VLLMSurface) -> list[str]:
    """Every way ``s`` differs from what lora_ipc's plugin and loader assume; empty when it is safe to hook."""
    out: list[str] = []
    if s.load_adapter is None:
        return ["vllm.lora.worker_manager.WorkerLoRAManager._load_adapter not found"]
    la = s.load_adapter
    if not la.positional or la.required - {la.positional[0]}:
        out.append(
            f"WorkerLoRAManager._load_adapter{la}: expected (lora_request) (the wrapper calls it with one "
            "positional request)"
        )
    body = s.load_adapter_body
    if body is None:
        out.append(
            "the source of WorkerLoRAManager._load_adapter could not be read (nothing to check the loader's "
            "mirror of it against)"
        )
    else:
        if not body.checkpoint_call_found:
            out.append("WorkerLoRAManager._load_adapter no longer calls from_local_checkpoint(...)")
        unknown = body.checkpoint_kwargs - set(E.FROM_LORA_TENSORS_KWARGS) - E.DISK_ONLY_KWARGS - E.HANDLED_KWARGS
        if unknown:
            out.append(
                f"_load_adapter passes {sorted(unknown)} to from_local_checkpoint; lora_ipc's loader does not "
                "mirror them"
            )
        if missing := E.WORKER_ATTRS - body.worker_attrs:
            out.append(f"_load_adapter no longer reads self.{sorted(missing)} (renamed?); the loader does")
        if missing := E.MANAGER_ATTRS - body.manager_attrs:
            out.append(f"_load_adapter no longer reads self._adapter_manager.{sorted(missing)}; the loader does")
        if "moe_ep_spec" in body.checkpoint_kwargs and E.MOE_EP_ATTR not in body.manager_attrs:
            out.append(
                f"_load_adapter passes moe_ep_spec but no longer reads self._adapter_manager.{E.MOE_EP_ATTR} "
                "(renamed?); the loader reads it to refuse expert-parallel MoE adapters"
            )
    if missing := E.WORKER_INIT_ATTRS - s.worker_init_attrs:
        out.append(f"WorkerLoRAManager.__init__ no longer sets self.{sorted(missing)} (lora_ipc reads them)")
    if not s.list_adapters:
        out.append("WorkerLoRAManager.list_adapters not found")
    if not s.add_adapter:
        out.append("no add_adapter on WorkerLoRAManager or LRUCacheWorkerLoRAManager")
    for cls, params in s.add_adapter.items():
        if len(params.positional) != 1 or params.required - set(params.positional):
            out.append(f"{cls}.add_adapter{params}: expected one request argument")
    ft = s.from_lora_tensors
    if ft is None:
        out.append("LoRAModel.from_lora_tensors not found")
    else:
        if not_accepted := [k for k in E.FROM_LORA_TENSORS_KWARGS if not ft.accepts(k)]:
            out.append(f"LoRAModel.from_lora_tensors{ft} does not accept {not_accepted}")
        if unknown_required := sorted(ft.required - set(E.FROM_LORA_TENSORS_KWARGS)):
            out.append(f"LoRAModel.from_lora_tensors{ft} requires {unknown_required}, which the loader does not pass")
    if missing := E.PEFT_HELPER_METHODS - s.peft_helper_methods:
        out.append(f"PEFTHelper lacks {sorted(missing)}")
    if missing := E.PEFT_HELPER_FIELDS - s.peft_helper_fields:
        out.append(f"PEFTHelper has no field(s) {sorted(missing)}")
    for name, expected in E.UTILS.items():
        found = s.utils.get(name)
        if found is None:
            out.append(f"vllm.lora.utils.{name} not found")
        elif found.positional[: len(expected)] != expected or found.required - set(expected):
            out.append(f"vllm.lora.utils.{name}{found}: expected ({', '.join(expected)})")
    if missing := E.LORA_REQUEST_FIELDS - s.lora_request_fields:
        out.append(f"LoRARequest has no field(s) {sorted(missing)}")
    if not s.lora_request_is_struct:
        out.append("LoRARequest is not a msgspec.Struct (the in-place wrapper copies it with msgspec.structs.replace)")
    if missing := E.RESOLVER_NAMES - s.resolver_names:
        out.append(f"vllm.lora.resolver lacks {sorted(missing)} (the OpenAI server's resolver)")
    return out


def entry_problems(e: EntrySurface) -> list[str]:
    """Every way the OpenAI server's hooks and the model runner differ from what lora_ipc wraps and reads."""
    out: list[str] = []
    for module, cls_name, attr in E.OPENAI_HOOKS:
        if f"{cls_name}.{attr}" not in e.hooks:
            out.append(f"{module}.{cls_name}.{attr} not found (lora_ipc's OpenAI server check wraps it)")
    if missing := E.OPENAI_MODELS_ATTRS - e.models_attrs:
        out.append(
            f"{E.OPENAI_MODELS_CLASS}.__init__ no longer sets self.{sorted(missing)} "
            "(lora_ipc's OpenAI check reads them)"
        )
    if not e.error_response:
        out.append(f"{'.'.join(E.ERROR_RESPONSE)} not found")
    if not e.runner_lora_manager:
        out.append(f"{E.RUNNER_MODULE}.{E.RUNNER_CLASS} no longer sets self.{E.RUNNER_LORA_MANAGER}")
    return out


def require_compatible(surface: VLLMSurface | None = None) -> VLLMSurface:
    """The runtime surface, or :class:`UnsupportedVLLM` naming every difference."""
    surface = surface or surface_from_runtime()
    found = problems(surface) + entry_problems(surface.entry)
    if found:
        raise UnsupportedVLLM(
            f"lora_ipc cannot hook vLLM {surface.version or '?'} ({surface.where}) safely:\n  - "
            + "\n  - ".join(found)
            + "\nUpgrade or downgrade lora_ipc or vLLM (docs/guides/vllm.md: versions tested), "
            "or run vLLM without lora_ipc's plugin (VLLM_PLUGINS=<the other plugins>, or uninstall lora-ipc)."
        )
    return surface


def refit_problems(r: RefitSurface) -> list[str]:
    """Every way vLLM's weight-transfer framework differs from what the refit backend assumes (empty when
    it fits, or when this vLLM has no such framework)."""
    if not r.present:
        return []
    where = "vllm.distributed.weight_transfer.base"
    out: list[str] = []
    if missing := E.REFIT_BASE_NAMES - r.base_names:
        out.append(f"{where} lacks {sorted(missing)}")
    ei = r.engine_init
    if ei is None:
        out.append(f"{where}.WeightTransferEngine.__init__ not found")
    elif ei.positional[: len(E.REFIT_ENGINE_INIT)] != E.REFIT_ENGINE_INIT or ei.required - set(E.REFIT_ENGINE_INIT):
        out.append(
            f"WeightTransferEngine.__init__{ei}: expected ({', '.join(E.REFIT_ENGINE_INIT)}), which the "
            "lora_ipc engine passes on"
        )
    if unknown := r.engine_abstract - E.REFIT_ENGINE_METHODS:
        out.append(f"WeightTransferEngine has abstract methods {sorted(unknown)} the lora_ipc engine does not define")
    if missing := E.REFIT_ENGINE_INHERITED - r.engine_methods:
        out.append(f"WeightTransferEngine lacks {sorted(missing)}, which the lora_ipc engine relies on")
    ti = r.trainer_init
    if ti is None:
        out.append(f"{where}.TrainerWeightTransferEngine.__init__ not found")
    else:
        if not_accepted := [k for k in E.REFIT_TRAINER_KWARGS if not ti.accepts(k)]:
            out.append(f"TrainerWeightTransferEngine.__init__{ti} does not accept {not_accepted}")
        if required := sorted(ti.required - set(E.REFIT_TRAINER_KWARGS) - {"config"}):
            out.append(
                f"TrainerWeightTransferEngine.__init__{ti} requires {required}, which the lora_ipc trainer "
                "engine does not pass"
            )
    if unknown := r.trainer_abstract - E.REFIT_TRAINER_METHODS:
        out.append(
            f"TrainerWeightTransferEngine has abstract methods {sorted(unknown)} the lora_ipc trainer engine "
            "does not define"
        )
    for factory in E.REFIT_FACTORIES:
        params = r.register_engine.get(factory)
        if params is None:
            out.append(f"vllm.distributed.weight_transfer.factory.{factory}.register_engine not found")
        elif len(params.positional) < 3 or params.required - set(params.positional[:3]):
            out.append(f"{factory}.register_engine{params}: expected (name, module_path, class_name)")
    if r.loader_read and (missing := E.REFIT_RELOAD - r.reload_names):
        out.append(f"vllm.model_executor.model_loader.reload lacks {sorted(missing)} (how an update is applied)")
    if r.loader_read and (missing := E.REFIT_LAYERWISE - r.layerwise_names):
        out.append(f"{E.LAYERWISE_MODULE} lacks {sorted(missing)} (the dry run of an update, refit_guard.py)")
    if r.loader_read and (missing := E.LAYERWISE_INIT_SETS - r.layerwise_init_sets):
        out.append(
            f"{E.LAYERWISE_MODULE}.initialize_layerwise_reload no longer sets {sorted(missing)} on the model "
            "(the dry run puts them back as finalize does)"
        )
    if r.loader_read and (missing := E.LAYER_INFO_ATTRS - r.layer_info_attrs):
        out.append(f"{E.LAYER_INFO_MODULE}.{E.LAYER_INFO_CLASS} lacks {sorted(missing)} (refit_guard.py reads them)")
    if r.loader_read and not r.worker_session:
        out.append(
            f"{E.WORKER_MODULE}.{E.WORKER_CLASS}.__init__ no longer sets self.{E.WORKER_SESSION_FLAG} (the "
            "update session the lora_ipc engine ends and keeps)"
        )
    if r.loader_read and not r.worker_bind:
        out.append(f"{E.WORKER_MODULE}.{E.WORKER_CLASS}.{E.WORKER_BIND_METHOD} not found")
    if r.loader_read and r.mtp_module and not r.mtp_check:
        out.append(f"vllm.model_executor.model_loader.mtp_validation.{E.REFIT_MTP} not found")
    return out


def require_refit_compatible(surface: RefitSurface | None = None, loader: bool = True) -> RefitSurface:
    """This vLLM's weight-transfer surface, or :class:`UnsupportedVLLM` naming every difference (also when
    this vLLM has no weight-transfer framework at all: the refit backend has nothing to plug into)."""
    r = surface or refit_surface_from_runtime(loader)
    found = (
        refit_problems(r)
        if r.present
        else ["vllm.distributed.weight_transfer (the weight-transfer framework) not found"]
    )
    if found:
        import vllm

        raise UnsupportedVLLM(
            f"lora_ipc's refit backend cannot plug into vLLM {getattr(vllm, '__version__', '?')}:\n  - "
            + "\n  - ".join(found)
            + "\nUpgrade or downgrade lora_ipc or vLLM (docs/guides/vllm.md: versions tested). The LoRA plugin "
            "does not depend on it."
        )
    return r


@functools.cache
def checked_surface() -> VLLMSurface:
    """This process's vLLM, checked once (the plugin calls it at registration, the loader reuses it)."""
    return require_compatible()


@functools.cache
def checked_refit_surface(loader: bool = False) -> RefitSurface:
    """This process's weight-transfer surface, checked once: the classes when the refit backend's module is
    imported (a trainer process too), and with ``loader`` the model loader's reload functions, when a worker
    engine is made (vLLM has imported them there already)."""
    return require_refit_compatible(loader=loader)
