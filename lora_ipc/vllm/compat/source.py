"""The source reader: the surface of a vLLM that need not import (a GPU wheel beside a CPU torch), read with
``ast`` from its package directory. Used by ``scripts/check_vllm_api.py`` (and the tests' edited copies);
it fills the same :class:`~.expectations.VLLMSurface` the runtime reader does, for the same checks."""

from __future__ import annotations

import ast
from pathlib import Path

from . import expectations as E
from .expectations import EntrySurface, RefitSurface, VLLMSurface
from .reading import (
    ast_abstract,
    attribute_assignments,
    class_fields,
    exported,
    method,
    method_params,
    params_from_ast,
    parse_module,
    read_load_adapter,
    self_assignments,
    top_level,
)


def _module_path(root: Path, module: str) -> Path:
    """``vllm.a.b`` -> ``root/a/b.py`` (or ``root/a/b/__init__.py``)."""
    parts = module.split(".")[1:]
    path = root.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _class(root: Path, module: str, name: str) -> ast.ClassDef | None:
    found = (parse_module(_module_path(root, module)) or {}).get(name)
    return found if isinstance(found, ast.ClassDef) else None


def _init_sets(cls: ast.ClassDef | None) -> frozenset[str]:
    init = method(cls, "__init__") if cls is not None else None
    return self_assignments(init) if init is not None else frozenset()


def surface_from_source(root: str | Path, version: str | None = None) -> VLLMSurface:
    """The surface of the vLLM whose package directory (the one holding ``lora/``) is ``root``."""
    root = Path(root)
    s = VLLMSurface(where=str(root), version=version)
    modules: dict[str, dict[str, ast.AST]] = {}
    for path in sorted((root / "lora").glob("*.py")):
        try:
            modules[path.stem] = top_level(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
    wm = modules.get("worker_manager", {})
    worker = wm.get("WorkerLoRAManager")
    if isinstance(worker, ast.ClassDef):
        s.load_adapter = method_params(worker, "_load_adapter")
        fn = method(worker, "_load_adapter")
        s.load_adapter_body = read_load_adapter(fn) if fn is not None else None
        s.worker_init_attrs = _init_sets(worker)
        s.list_adapters = method(worker, "list_adapters") is not None
        for cls in (worker, wm.get("LRUCacheWorkerLoRAManager")):
            if isinstance(cls, ast.ClassDef) and (params := method_params(cls, "add_adapter")) is not None:
                s.add_adapter[cls.name] = params
    for module in ("lora_model", "models"):
        cls = modules.get(module, {}).get("LoRAModel")
        if isinstance(cls, ast.ClassDef) and (params := method_params(cls, "from_lora_tensors")) is not None:
            s.from_lora_tensors, s.lora_model_module = params, f"vllm.lora.{module}"
            break
    helper = modules.get("peft_helper", {}).get("PEFTHelper")
    if isinstance(helper, ast.ClassDef):
        s.peft_helper_methods = frozenset(m for m in E.PEFT_HELPER_METHODS if method(helper, m) is not None)
        s.peft_helper_fields = frozenset(
            n.target.id for n in helper.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        )
    for name in E.UTILS:
        util = modules.get("utils", {}).get(name)
        if isinstance(util, ast.FunctionDef):
            s.utils[name] = params_from_ast(util, drop_first=False)
    request = modules.get("request", {}).get("LoRARequest")
    if isinstance(request, ast.ClassDef):
        s.lora_request_is_struct = any(
            (getattr(b, "attr", None) or getattr(b, "id", None)) == "Struct" for b in request.bases
        )
        s.lora_request_fields = frozenset(
            n.target.id for n in request.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        )
    s.resolver_names = frozenset(modules.get("resolver", {}))
    s.entry = entry_surface_from_source(root)
    s.refit = refit_surface_from_source(root)
    return s


def entry_surface_from_source(root: str | Path) -> EntrySurface:
    root = Path(root)
    e = EntrySurface()
    e.hooks = frozenset(
        f"{cls_name}.{attr}"
        for module, cls_name, attr in E.OPENAI_HOOKS
        if (cls := _class(root, module, cls_name)) is not None and method(cls, attr) is not None
    )
    e.models_attrs = _init_sets(_class(root, E.OPENAI_MODELS_MODULE, E.OPENAI_MODELS_CLASS)) & E.OPENAI_MODELS_ATTRS
    path = _module_path(root, E.ERROR_RESPONSE[0])
    tree = parse_module(path)
    e.error_response = tree is not None and E.ERROR_RESPONSE[1] in exported(tree, path)
    runner = _class(root, E.RUNNER_MODULE, E.RUNNER_CLASS)
    e.runner_lora_manager = runner is not None and E.RUNNER_LORA_MANAGER in self_assignments(runner)
    return e


def refit_surface_from_source(root: str | Path) -> RefitSurface:
    """The weight-transfer surface of the vLLM package directory ``root``, read with ``ast``."""
    root = Path(root)
    r = RefitSurface()
    wt = root / "distributed" / "weight_transfer"
    base, factory = parse_module(wt / "base.py"), parse_module(wt / "factory.py")
    if base is None or factory is None:
        return r
    r.present = True
    r.base_names = frozenset(n for n in E.REFIT_BASE_NAMES if n in exported(base, wt / "base.py"))
    engine, trainer = base.get("WeightTransferEngine"), base.get("TrainerWeightTransferEngine")
    if isinstance(engine, ast.ClassDef):
        r.engine_init = method_params(engine, "__init__")
        r.engine_methods = frozenset(
            n.name for n in engine.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        )
        r.engine_abstract = ast_abstract(engine)
    if isinstance(trainer, ast.ClassDef):
        r.trainer_init = method_params(trainer, "__init__")
        r.trainer_abstract = ast_abstract(trainer)
    for name in E.REFIT_FACTORIES:
        cls = factory.get(name)
        if isinstance(cls, ast.ClassDef) and (params := method_params(cls, "register_engine")) is not None:
            r.register_engine[name] = params
    loader = root / "model_executor" / "model_loader"
    r.loader_read = True
    reload = parse_module(loader / "reload" / "__init__.py")
    if reload is not None:
        r.reload_names = E.REFIT_RELOAD & exported(reload, loader / "reload" / "__init__.py")
    layerwise = parse_module(_module_path(root, E.LAYERWISE_MODULE))
    if layerwise is not None:
        r.layerwise_names = E.REFIT_LAYERWISE & frozenset(layerwise)
        init = layerwise.get("initialize_layerwise_reload")
        if isinstance(init, ast.FunctionDef):
            r.layerwise_init_sets = attribute_assignments(init) & E.LAYERWISE_INIT_SETS
    info = _class(root, E.LAYER_INFO_MODULE, E.LAYER_INFO_CLASS)
    if info is not None:
        r.layer_info_attrs = E.LAYER_INFO_ATTRS & class_fields(info)
    worker = _class(root, E.WORKER_MODULE, E.WORKER_CLASS)
    if worker is not None:
        r.worker_session = E.WORKER_SESSION_FLAG in _init_sets(worker)
        r.worker_bind = method(worker, E.WORKER_BIND_METHOD) is not None
    mtp = parse_module(loader / "mtp_validation.py")
    r.mtp_module = mtp is not None
    r.mtp_check = mtp is not None and isinstance(mtp.get(E.REFIT_MTP), ast.FunctionDef)
    return r
