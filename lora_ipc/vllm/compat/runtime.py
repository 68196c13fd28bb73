"""The runtime reader: what the imported vLLM offers (``inspect``, plus ``ast`` over the source of the few
functions whose body matters), and the one way lora_ipc's modules reach vLLM's private names.

Every private vLLM name a lora_ipc module touches is read or written through a function here, and is
declared in :mod:`.expectations` and checked at registration (:mod:`.checks`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any

from . import expectations as E
from .expectations import EntrySurface, Params, RefitSurface, VLLMSurface
from .reading import (
    FunctionNode,
    attribute_assignments,
    method,
    params_from_ast,
    parse_class,
    parse_function,
    read_load_adapter,
    self_assignments,
    top_level,
)


def params_of(fn, drop_first: bool) -> Params:
    sig = inspect.signature(inspect.unwrap(fn))
    ps = list(sig.parameters.values())[1 if drop_first else 0 :]
    kinds = inspect.Parameter
    names = tuple(p.name for p in ps if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD))
    positional = tuple(p.name for p in ps if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD))
    required = frozenset(
        p.name for p in ps if p.default is p.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
    )
    return Params(names, positional, required, any(p.kind is kinds.VAR_KEYWORD for p in ps))


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# ---- the accessors: lora_ipc's only way to vLLM's private names -------------------------------------


def lora_model_class():
    """``LoRAModel`` wherever this vLLM defines it (``vllm.lora.lora_model``; ``vllm.lora.models`` before)."""
    for module in ("vllm.lora.lora_model", "vllm.lora.models"):
        found = getattr(_import(module), "LoRAModel", None)
        if found is not None:
            return found
    return None


def adapter_manager(worker_manager: Any) -> Any:
    """``WorkerLoRAManager._adapter_manager`` (the model's LoRA manager)."""
    return worker_manager._adapter_manager


def lora_model_cls(worker_manager: Any) -> Any:
    """The ``LoRAModel`` class ``_load_adapter`` builds with (``WorkerLoRAManager._lora_model_cls``)."""
    return getattr(worker_manager, "_lora_model_cls", None) or lora_model_class()


def moe_ep_load_spec(manager: Any) -> Any:
    """The adapter manager's expert-parallel MoE load spec (None: not expert-parallel, or a vLLM before it)."""
    return getattr(manager, E.MOE_EP_ATTR, None)


def runner_lora_manager(model_runner: Any) -> Any:
    """The worker's LoRA manager (``model_runner.lora_manager``); None in an engine without LoRA."""
    return getattr(model_runner, E.RUNNER_LORA_MANAGER, None)


def layerwise():
    """vLLM's layerwise-reload module (checked when a worker engine is made: :func:`.checks.checked_refit_surface`)."""
    return importlib.import_module(E.LAYERWISE_MODULE)


def undo_layerwise_init(model: Any) -> None:
    """Put back what ``initialize_layerwise_reload`` set aside on ``model`` (torchao's reload flag), as
    ``finalize_layerwise_reload`` does."""
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload


def worker_class():
    """vLLM's ``Worker`` (the CPU worker subclasses it); None where this vLLM has none."""
    return getattr(_import(E.WORKER_MODULE), E.WORKER_CLASS, None)


def set_update_session(worker: Any, active: bool) -> None:
    """Open or end ``worker``'s weight-update session (the flag its start/update/finish check)."""
    setattr(worker, E.WORKER_SESSION_FLAG, active)


# ---- the runtime surface ------------------------------------------------------------------------------


def _own_load_adapter(wm, worker) -> FunctionNode | None:
    """vLLM's own ``WorkerLoRAManager._load_adapter``, even where a framework replaced it before the plugin ran."""
    fn = inspect.unwrap(worker._load_adapter)
    if getattr(fn, "__module__", None) == wm.__name__:
        return parse_function(fn)
    try:  # replaced (verl, SkyRL, ...): read vLLM's definition from its module instead
        tree = ast.parse(inspect.getsource(wm))
    except (OSError, TypeError, SyntaxError):
        return None
    cls = top_level(tree).get("WorkerLoRAManager")
    return method(cls, "_load_adapter") if isinstance(cls, ast.ClassDef) else None


def _own_init_sets(cls) -> frozenset[str]:
    """``self.<attr>`` assigned in ``cls.__init__`` (vLLM's own, under the plugin's wrapper)."""
    init = parse_function(cls.__init__) if "__init__" in cls.__dict__ else None
    return self_assignments(init) if init is not None else frozenset()


def surface_from_runtime() -> VLLMSurface:
    import vllm
    from vllm.lora import worker_manager as wm

    s = VLLMSurface(where=str(Path(vllm.__file__).parent), version=getattr(vllm, "__version__", None))
    s.entry = entry_surface_from_runtime()
    s.refit = refit_surface_from_runtime()
    worker = getattr(wm, "WorkerLoRAManager", None)
    if worker is None:
        return s
    if callable(getattr(worker, "_load_adapter", None)):
        node = _own_load_adapter(wm, worker)
        replaced = getattr(inspect.unwrap(worker._load_adapter), "__module__", None) != wm.__name__
        s.load_adapter = (
            params_from_ast(node, drop_first=True)
            if replaced and node is not None
            else params_of(worker._load_adapter, drop_first=True)
        )
        s.load_adapter_body = read_load_adapter(node) if node is not None else None
    s.worker_init_attrs = _own_init_sets(worker)
    s.list_adapters = callable(getattr(worker, "list_adapters", None))
    for cls in (worker, getattr(wm, "LRUCacheWorkerLoRAManager", None)):
        if cls is not None and "add_adapter" in cls.__dict__:
            s.add_adapter[cls.__name__] = params_of(cls.__dict__["add_adapter"], drop_first=True)
    lora_model = lora_model_class()
    if lora_model is not None and callable(getattr(lora_model, "from_lora_tensors", None)):
        s.from_lora_tensors = params_of(lora_model.from_lora_tensors, drop_first=False)  # bound classmethod
        s.lora_model_module = lora_model.__module__
    helper = getattr(_import("vllm.lora.peft_helper"), "PEFTHelper", None)
    if helper is not None:  # else left empty: problems() names it as missing
        s.peft_helper_methods = frozenset(m for m in E.PEFT_HELPER_METHODS if callable(getattr(helper, m, None)))
        s.peft_helper_fields = (
            frozenset(f.name for f in dataclasses.fields(helper)) if dataclasses.is_dataclass(helper) else frozenset()
        )
    utils = _import("vllm.lora.utils")
    if utils is not None:
        s.utils = {
            n: params_of(getattr(utils, n), drop_first=False) for n in E.UTILS if callable(getattr(utils, n, None))
        }
    request = getattr(_import("vllm.lora.request"), "LoRARequest", None)
    if request is not None:
        import msgspec

        s.lora_request_is_struct = issubclass(request, msgspec.Struct)
        s.lora_request_fields = frozenset(getattr(request, "__struct_fields__", ()))
    resolver = _import("vllm.lora.resolver")
    if resolver is not None:
        s.resolver_names = frozenset(n for n in E.RESOLVER_NAMES if hasattr(resolver, n))
    return s


def _own_method(cls, name: str) -> bool:
    """``cls`` itself defines ``name`` (the plugin's wrapper in its place counts: it wraps the class's own)."""
    return cls is not None and callable(cls.__dict__.get(name))


def entry_surface_from_runtime() -> EntrySurface:
    e = EntrySurface()
    hooks = set()
    for module, cls_name, attr in E.OPENAI_HOOKS:
        if _own_method(getattr(_import(module), cls_name, None), attr):
            hooks.add(f"{cls_name}.{attr}")
    e.hooks = frozenset(hooks)
    models = getattr(_import(E.OPENAI_MODELS_MODULE), E.OPENAI_MODELS_CLASS, None)
    e.models_attrs = _own_init_sets(models) & E.OPENAI_MODELS_ATTRS if models is not None else frozenset()
    e.error_response = callable(getattr(_import(E.ERROR_RESPONSE[0]), E.ERROR_RESPONSE[1], None))
    runner = getattr(_import(E.RUNNER_MODULE), E.RUNNER_CLASS, None)
    node = parse_class(runner) if runner is not None else None
    e.runner_lora_manager = node is not None and E.RUNNER_LORA_MANAGER in self_assignments(node)
    return e


def _abstract(cls) -> frozenset[str]:
    return frozenset(getattr(cls, "__abstractmethods__", ()))


def refit_surface_from_runtime(loader: bool = True) -> RefitSurface:
    """The weight-transfer surface of the imported vLLM (nothing of lora_ipc's refit backend is imported);
    ``loader=False`` leaves out the model loader's reload functions and the worker (importing them takes
    seconds)."""
    r = RefitSurface()
    factory = _import("vllm.distributed.weight_transfer.factory")
    base = _import("vllm.distributed.weight_transfer.base")
    if factory is None or base is None:
        return r
    r.present = True
    r.base_names = frozenset(n for n in E.REFIT_BASE_NAMES if hasattr(base, n))
    engine, trainer = getattr(base, "WeightTransferEngine", None), getattr(base, "TrainerWeightTransferEngine", None)
    if isinstance(engine, type):
        r.engine_init = params_of(engine.__init__, drop_first=True)  # type: ignore[misc]  # the class's own
        r.engine_methods = frozenset(n for n in dir(engine) if callable(getattr(engine, n, None)))
        r.engine_abstract = _abstract(engine)
    if isinstance(trainer, type):
        r.trainer_init = params_of(trainer.__init__, drop_first=True)  # type: ignore[misc]  # the class's own
        r.trainer_abstract = _abstract(trainer)
    for name in E.REFIT_FACTORIES:
        register = getattr(getattr(factory, name, None), "register_engine", None)
        if callable(register):
            r.register_engine[name] = params_of(register, drop_first=False)  # a bound classmethod
    if not loader:
        return r
    r.loader_read = True
    reload = _import("vllm.model_executor.model_loader.reload")
    if reload is not None:  # else reported as missing by refit_problems
        r.reload_names = frozenset(n for n in E.REFIT_RELOAD if callable(getattr(reload, n, None)))
    layerwise_module = _import(E.LAYERWISE_MODULE)
    if layerwise_module is not None:
        r.layerwise_names = frozenset(n for n in E.REFIT_LAYERWISE if hasattr(layerwise_module, n))
        init = getattr(layerwise_module, "initialize_layerwise_reload", None)
        node = parse_function(init) if callable(init) else None
        r.layerwise_init_sets = attribute_assignments(node) & E.LAYERWISE_INIT_SETS if node is not None else frozenset()
    info = getattr(_import(E.LAYER_INFO_MODULE), E.LAYER_INFO_CLASS, None)
    if isinstance(info, type):
        fields = {f.name for f in dataclasses.fields(info)} if dataclasses.is_dataclass(info) else set()
        r.layer_info_attrs = frozenset(a for a in E.LAYER_INFO_ATTRS if a in fields or callable(getattr(info, a, None)))
    worker = worker_class()
    if worker is not None:
        r.worker_session = E.WORKER_SESSION_FLAG in _own_init_sets(worker)
        r.worker_bind = _own_method(worker, E.WORKER_BIND_METHOD)
    mtp = _import("vllm.model_executor.model_loader.mtp_validation")
    if mtp is not None:
        r.mtp_module = True
        r.mtp_check = callable(getattr(mtp, E.REFIT_MTP, None))
    return r
