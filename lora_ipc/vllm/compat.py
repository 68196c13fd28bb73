"""What lora_ipc needs from vLLM, checked by feature, never by version number.

The plugin wraps ``WorkerLoRAManager._load_adapter`` (and ``add_adapter``) and the loader mirrors
``_load_adapter`` step for step with ``from_lora_tensors`` in place of ``from_local_checkpoint``.
Peers that do this broke silently when vLLM moved (AReaL on a ``_load_adapter`` signature change;
vLLM 0.33 renamed the classification-head validations ``_load_adapter`` runs). So before wrapping
anything, :func:`problems` compares what this vLLM offers with what the loader assumes, and
:func:`require_compatible` turns any difference into :class:`UnsupportedVLLM` at plugin
registration — never a silent fallback to the disk loader.

The facts are gathered into a :class:`VLLMSurface` in one of two ways that feed the same checks:

- :func:`surface_from_runtime`: the imported classes (``inspect``), plus the source of
  ``_load_adapter`` for what it does (``ast``). Used by the plugin in every vLLM process.
- :func:`surface_from_source`: ``ast`` over the ``.py`` files of an unpacked or installed vLLM that
  need not import (a GPU wheel beside a CPU torch). Used by ``scripts/check_vllm_api.py``.

Part of the surface is followed rather than required: the ``_validate_*`` calls ``_load_adapter``
makes on its adapter manager after loading are read from its source and the loader makes the same
calls (:attr:`VLLMSurface.validations`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

from ..core.errors import LoraIpcError

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


class UnsupportedVLLM(LoraIpcError):
    """The installed vLLM lacks, or changed, something lora_ipc hooks; the plugin refuses to register."""


# What the loader passes to ``from_lora_tensors`` (by keyword) and where its value comes from in
# ``_load_adapter``'s own call to ``from_local_checkpoint``.
FROM_LORA_TENSORS_KWARGS = (
    "lora_model_id",
    "tensors",
    "peft_helper",
    "device",
    "dtype",
    "model_vocab_size",
    "weights_mapper",
    "skip_prefixes",
)
# ``from_local_checkpoint`` keywords that only concern reading files (nothing to mirror) ...
DISK_ONLY_KWARGS = frozenset({"lora_dir", "expected_lora_modules", "tensorizer_config_dict"})
# ... and those the loader handles itself (``moe_ep_spec``: it refuses expert-parallel MoE adapters;
# ``unsupported_lora_modules`` (vLLM 0.34): it refuses LoRA weights on those layers, as the disk loader does).
HANDLED_KWARGS = frozenset({"moe_ep_spec", "unsupported_lora_modules"})
# Attributes of the worker manager and of its adapter manager the loader reads; ``_load_adapter``
# must read them too, or they may have been renamed.
WORKER_ATTRS = frozenset({"_adapter_manager", "lora_config", "vocab_size", "max_position_embeddings"})
MANAGER_ATTRS = frozenset({"supported_lora_modules", "packed_modules_mapping", "model"})
PEFT_HELPER_METHODS = frozenset({"from_dict", "validate_legal"})
PEFT_HELPER_FIELDS = frozenset({"r", "lora_alpha", "target_modules", "vllm_max_position_embeddings"})
LORA_REQUEST_FIELDS = frozenset({"lora_name", "lora_int_id", "lora_path", "load_inplace"})
RESOLVER_NAMES = frozenset({"LoRAResolver", "LoRAResolverRegistry"})
UTILS = {"parse_fine_tuned_lora_name": ("name", "weights_mapper"), "is_base_embedding_weights": ("name",)}


# The refit backend (``weight_transfer.py``) subclasses vLLM's weight-transfer engines and is
# registered in its factories by module path. What it imports from ``vllm.distributed.weight_transfer.base``:
REFIT_BASE_NAMES = frozenset(
    {
        "TrainerInitInfo",
        "TrainerWeightTransferEngine",
        "VLLMWeightSyncClient",
        "WeightSource",
        "WeightTransferEngine",
        "WeightTransferInitInfo",
        "WeightTransferUpdateInfo",
    }
)
REFIT_ENGINE_INIT = ("config", "vllm_config", "device", "model")  # super().__init__(...), positionally
REFIT_ENGINE_METHODS = frozenset(
    {
        "parse_init_info",
        "init_transfer_engine",
        "start_weight_update",
        "receive_weights",
        "finish_weight_update",
        "shutdown",
    }
)  # what the worker engine defines
REFIT_ENGINE_INHERITED = frozenset({"update_weights", "reset_weight_update_target"})  # what it relies on the base for
REFIT_TRAINER_KWARGS = ("client", "source", "is_sender")  # super().__init__(client=, source=, is_sender=[, config])
REFIT_TRAINER_METHODS = frozenset({"trainer_init", "send_weights", "shutdown"})
REFIT_FACTORIES = ("WeightTransferEngineFactory", "WeightTransferTrainerFactory")  # register_engine(name, module, cls)
REFIT_RELOAD = frozenset({"initialize_layerwise_reload", "finalize_layerwise_reload"})  # ...model_loader.reload
# vllm.model_executor.model_loader.mtp_validation (vLLM 0.32-0.33; 0.34 has no MTP completeness check, so
# there is nothing to disable and the module is gone): present module without it = a rename to look at
REFIT_MTP = "disable_mtp_completeness_check"


@dataclass(frozen=True)
class Params:
    """A function's parameters, as the checks need them (``self``/``cls`` left out)."""

    names: tuple[str, ...]
    positional: tuple[str, ...]
    required: frozenset[str]
    var_keyword: bool = False

    def accepts(self, name: str) -> bool:
        return self.var_keyword or name in self.names

    def __str__(self) -> str:
        return (
            "("
            + ", ".join(n if n in self.required else f"{n}=…" for n in self.names)
            + (", **kwargs" if self.var_keyword else "")
            + ")"
        )


@dataclass
class LoadAdapterBody:
    """What ``_load_adapter`` does, read from its source."""

    checkpoint_kwargs: frozenset[str] = frozenset()  # keywords of its from_local_checkpoint call
    checkpoint_call_found: bool = False
    worker_attrs: frozenset[str] = frozenset()  # self.<attr> it reads
    manager_attrs: frozenset[str] = frozenset()  # self._adapter_manager.<attr> it reads
    validations: tuple[str, ...] = ()  # self._adapter_manager._validate_*(lora) it calls


@dataclass
class RefitSurface:
    """vLLM's weight-transfer framework, as the refit backend uses it. ``present`` is False when this vLLM
    has no such framework (then there is nothing to register and nothing to check)."""

    present: bool = False
    base_names: frozenset[str] = frozenset()
    engine_init: Params | None = None
    engine_methods: frozenset[str] = frozenset()  # methods WeightTransferEngine defines
    engine_abstract: frozenset[str] = frozenset()  # ... of which abstract
    trainer_init: Params | None = None  # TrainerWeightTransferEngine.__init__
    trainer_abstract: frozenset[str] = frozenset()
    register_engine: dict[str, Params] = field(default_factory=dict)  # factory -> register_engine params
    loader_read: bool = False  # the two below were looked for (the worker side reads them: heavy imports)
    reload_names: frozenset[str] = frozenset()
    mtp_module: bool = False  # vllm.model_executor.model_loader.mtp_validation exists
    mtp_check: bool = False  # ... and defines REFIT_MTP

    def summary(self) -> dict:
        return {
            "present": self.present,
            "WeightTransferEngine.__init__": str(self.engine_init),
            "TrainerWeightTransferEngine.__init__": str(self.trainer_init),
            "abstract": sorted(self.engine_abstract | self.trainer_abstract),
            "register_engine": {k: str(v) for k, v in self.register_engine.items()},
        }


@dataclass
class VLLMSurface:
    """The parts of vLLM lora_ipc uses. ``None`` means not found."""

    where: str
    version: str | None = None
    load_adapter: Params | None = None
    load_adapter_body: LoadAdapterBody | None = None
    add_adapter: dict[str, Params] = field(default_factory=dict)  # class name -> add_adapter params
    list_adapters: bool = False
    worker_init_attrs: frozenset[str] = frozenset()  # self.<attr> set in WorkerLoRAManager.__init__
    from_lora_tensors: Params | None = None
    lora_model_module: str | None = None
    peft_helper_methods: frozenset[str] = frozenset()
    peft_helper_fields: frozenset[str] = frozenset()
    utils: dict[str, Params] = field(default_factory=dict)
    lora_request_fields: frozenset[str] = frozenset()
    lora_request_is_struct: bool = False
    resolver_names: frozenset[str] = frozenset()
    refit: RefitSurface = field(default_factory=RefitSurface)

    @property
    def validations(self) -> tuple[str, ...]:
        return self.load_adapter_body.validations if self.load_adapter_body else ()

    def summary(self) -> dict:
        """A plain description, for diffs between versions and for reports."""
        body = self.load_adapter_body or LoadAdapterBody()
        return {
            "_load_adapter": str(self.load_adapter),
            "add_adapter": {k: str(v) for k, v in self.add_adapter.items()},
            "from_lora_tensors": f"{self.lora_model_module}.LoRAModel.from_lora_tensors{self.from_lora_tensors}",
            "from_local_checkpoint kwargs": sorted(body.checkpoint_kwargs),
            "_load_adapter reads": sorted(body.worker_attrs),
            "_adapter_manager reads": sorted(body.manager_attrs),
            "validations": list(body.validations),
            "PEFTHelper": sorted(self.peft_helper_methods),
            "utils": {k: str(v) for k, v in self.utils.items()},
            "LoRARequest": sorted(self.lora_request_fields),
            **{f"refit {k}": v for k, v in self.refit.summary().items()},
        }


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
        unknown = body.checkpoint_kwargs - set(FROM_LORA_TENSORS_KWARGS) - DISK_ONLY_KWARGS - HANDLED_KWARGS
        if unknown:
            out.append(
                f"_load_adapter passes {sorted(unknown)} to from_local_checkpoint; lora_ipc's loader does not "
                "mirror them"
            )
        if missing := WORKER_ATTRS - body.worker_attrs:
            out.append(f"_load_adapter no longer reads self.{sorted(missing)} (renamed?); the loader does")
        if missing := MANAGER_ATTRS - body.manager_attrs:
            out.append(f"_load_adapter no longer reads self._adapter_manager.{sorted(missing)}; the loader does")
    if "device" not in s.worker_init_attrs:
        out.append("WorkerLoRAManager.__init__ no longer sets self.device")
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
        if not_accepted := [k for k in FROM_LORA_TENSORS_KWARGS if not ft.accepts(k)]:
            out.append(f"LoRAModel.from_lora_tensors{ft} does not accept {not_accepted}")
        if unknown_required := sorted(ft.required - set(FROM_LORA_TENSORS_KWARGS)):
            out.append(f"LoRAModel.from_lora_tensors{ft} requires {unknown_required}, which the loader does not pass")
    if missing := PEFT_HELPER_METHODS - s.peft_helper_methods:
        out.append(f"PEFTHelper lacks {sorted(missing)}")
    if missing := PEFT_HELPER_FIELDS - s.peft_helper_fields:
        out.append(f"PEFTHelper has no field(s) {sorted(missing)}")
    for name, expected in UTILS.items():
        found = s.utils.get(name)
        if found is None:
            out.append(f"vllm.lora.utils.{name} not found")
        elif found.positional[: len(expected)] != expected or found.required - set(expected):
            out.append(f"vllm.lora.utils.{name}{found}: expected ({', '.join(expected)})")
    if missing := LORA_REQUEST_FIELDS - s.lora_request_fields:
        out.append(f"LoRARequest has no field(s) {sorted(missing)}")
    if not s.lora_request_is_struct:
        out.append("LoRARequest is not a msgspec.Struct (the in-place wrapper copies it with msgspec.structs.replace)")
    if missing := RESOLVER_NAMES - s.resolver_names:
        out.append(f"vllm.lora.resolver lacks {sorted(missing)} (the OpenAI server's resolver)")
    return out


def require_compatible(surface: VLLMSurface | None = None) -> VLLMSurface:
    """The runtime surface, or :class:`UnsupportedVLLM` naming every difference."""
    surface = surface or surface_from_runtime()
    found = problems(surface)
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
    if missing := REFIT_BASE_NAMES - r.base_names:
        out.append(f"{where} lacks {sorted(missing)}")
    ei = r.engine_init
    if ei is None:
        out.append(f"{where}.WeightTransferEngine.__init__ not found")
    elif ei.positional[: len(REFIT_ENGINE_INIT)] != REFIT_ENGINE_INIT or ei.required - set(REFIT_ENGINE_INIT):
        out.append(
            f"WeightTransferEngine.__init__{ei}: expected ({', '.join(REFIT_ENGINE_INIT)}), which the "
            "lora_ipc engine passes on"
        )
    if unknown := r.engine_abstract - REFIT_ENGINE_METHODS:
        out.append(f"WeightTransferEngine has abstract methods {sorted(unknown)} the lora_ipc engine does not define")
    if missing := REFIT_ENGINE_INHERITED - r.engine_methods:
        out.append(f"WeightTransferEngine lacks {sorted(missing)}, which the lora_ipc engine relies on")
    ti = r.trainer_init
    if ti is None:
        out.append(f"{where}.TrainerWeightTransferEngine.__init__ not found")
    else:
        if not_accepted := [k for k in REFIT_TRAINER_KWARGS if not ti.accepts(k)]:
            out.append(f"TrainerWeightTransferEngine.__init__{ti} does not accept {not_accepted}")
        if required := sorted(ti.required - set(REFIT_TRAINER_KWARGS) - {"config"}):
            out.append(
                f"TrainerWeightTransferEngine.__init__{ti} requires {required}, which the lora_ipc trainer "
                "engine does not pass"
            )
    if unknown := r.trainer_abstract - REFIT_TRAINER_METHODS:
        out.append(
            f"TrainerWeightTransferEngine has abstract methods {sorted(unknown)} the lora_ipc trainer engine "
            "does not define"
        )
    for factory in REFIT_FACTORIES:
        params = r.register_engine.get(factory)
        if params is None:
            out.append(f"vllm.distributed.weight_transfer.factory.{factory}.register_engine not found")
        elif len(params.positional) < 3 or params.required - set(params.positional[:3]):
            out.append(f"{factory}.register_engine{params}: expected (name, module_path, class_name)")
    if r.loader_read and (missing := REFIT_RELOAD - r.reload_names):
        out.append(f"vllm.model_executor.model_loader.reload lacks {sorted(missing)} (how an update is applied)")
    if r.loader_read and r.mtp_module and not r.mtp_check:
        out.append(f"vllm.model_executor.model_loader.mtp_validation.{REFIT_MTP} not found")
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


# ---- reading the body of _load_adapter (shared by both ways) ------------------------------------


def _is_self_attr(node: ast.AST, attr: str | None = None) -> TypeGuard[ast.Attribute]:
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and (attr is None or node.attr == attr)
    )


def read_load_adapter(fn: FunctionNode) -> LoadAdapterBody:
    kwargs: set[str] = set()
    found = False
    worker_attrs: set[str] = set()
    manager_attrs: set[str] = set()
    validations: list[str] = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "from_local_checkpoint":
                found = True
                kwargs.update(k.arg for k in node.keywords if k.arg)
            elif _is_self_attr(node.func.value, "_adapter_manager") and node.func.attr.startswith("_validate"):
                validations.append(node.func.attr)
        if isinstance(node, ast.Attribute):
            if _is_self_attr(node):
                worker_attrs.add(node.attr)
            elif _is_self_attr(node.value, "_adapter_manager"):
                manager_attrs.add(node.attr)
    manager_attrs -= set(validations)
    return LoadAdapterBody(
        frozenset(kwargs), found, frozenset(worker_attrs), frozenset(manager_attrs), tuple(dict.fromkeys(validations))
    )


def _self_assignments(fn: FunctionNode) -> frozenset[str]:
    names: set[str] = set()
    for node in ast.walk(fn):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names.update(t.attr for t in targets if _is_self_attr(t))
    return frozenset(names)


def _parse_function(fn) -> FunctionNode | None:
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
    except (OSError, TypeError):
        return None
    node = ast.parse(source).body[0]
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


# ---- the runtime way ------------------------------------------------------------------------------


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


def lora_model_class():
    """``LoRAModel`` wherever this vLLM defines it (``vllm.lora.lora_model``; ``vllm.lora.models`` before)."""
    import importlib

    for module in ("vllm.lora.lora_model", "vllm.lora.models"):
        try:
            return importlib.import_module(module).LoRAModel
        except (ImportError, AttributeError):
            continue
    return None


def _own_load_adapter(wm, worker) -> FunctionNode | None:
    """vLLM's own ``WorkerLoRAManager._load_adapter``, even where a framework replaced it before the plugin ran."""
    fn = inspect.unwrap(worker._load_adapter)
    if getattr(fn, "__module__", None) == wm.__name__:
        return _parse_function(fn)
    try:  # replaced (verl, SkyRL, ...): read vLLM's definition from its module instead
        tree = ast.parse(inspect.getsource(wm))
    except (OSError, TypeError, SyntaxError):
        return None
    cls = _top_level(tree).get("WorkerLoRAManager")
    return _method(cls, "_load_adapter") if isinstance(cls, ast.ClassDef) else None


def surface_from_runtime() -> VLLMSurface:
    import dataclasses

    import vllm
    from vllm.lora import worker_manager as wm

    s = VLLMSurface(where=str(Path(vllm.__file__).parent), version=getattr(vllm, "__version__", None))
    worker = getattr(wm, "WorkerLoRAManager", None)
    if worker is None:
        return s
    if callable(getattr(worker, "_load_adapter", None)):
        node = _own_load_adapter(wm, worker)
        replaced = getattr(inspect.unwrap(worker._load_adapter), "__module__", None) != wm.__name__
        s.load_adapter = (
            _params_from_ast(node, drop_first=True)
            if replaced and node is not None
            else params_of(worker._load_adapter, drop_first=True)
        )
        s.load_adapter_body = read_load_adapter(node) if node is not None else None
    init = _parse_function(worker.__init__)
    s.worker_init_attrs = _self_assignments(init) if init is not None else frozenset()
    s.list_adapters = callable(getattr(worker, "list_adapters", None))
    for cls in (worker, getattr(wm, "LRUCacheWorkerLoRAManager", None)):
        if cls is not None and "add_adapter" in cls.__dict__:
            s.add_adapter[cls.__name__] = params_of(cls.__dict__["add_adapter"], drop_first=True)
    lora_model = lora_model_class()
    if lora_model is not None and callable(getattr(lora_model, "from_lora_tensors", None)):
        s.from_lora_tensors = params_of(lora_model.from_lora_tensors, drop_first=False)  # bound classmethod
        s.lora_model_module = lora_model.__module__
    try:
        from vllm.lora.peft_helper import PEFTHelper

        s.peft_helper_methods = frozenset(m for m in PEFT_HELPER_METHODS if callable(getattr(PEFTHelper, m, None)))
        s.peft_helper_fields = (
            frozenset(f.name for f in dataclasses.fields(PEFTHelper))
            if dataclasses.is_dataclass(PEFTHelper)
            else frozenset()
        )
    except ImportError:  # left empty: problems() names it as missing
        pass
    try:
        from vllm.lora import utils

        s.utils = {
            n: params_of(getattr(utils, n), drop_first=False) for n in UTILS if callable(getattr(utils, n, None))
        }
    except ImportError:  # left empty: problems() names it as missing
        pass
    try:
        import msgspec
        from vllm.lora.request import LoRARequest

        s.lora_request_is_struct = issubclass(LoRARequest, msgspec.Struct)
        s.lora_request_fields = frozenset(getattr(LoRARequest, "__struct_fields__", ()))
    except ImportError:  # left empty: problems() names it as missing
        pass
    try:
        from vllm.lora import resolver

        s.resolver_names = frozenset(n for n in RESOLVER_NAMES if hasattr(resolver, n))
    except ImportError:  # left empty: problems() names it as missing
        pass
    s.refit = refit_surface_from_runtime()
    return s


def _abstract(cls) -> frozenset[str]:
    return frozenset(getattr(cls, "__abstractmethods__", ()))


def refit_surface_from_runtime(loader: bool = True) -> RefitSurface:
    """The weight-transfer surface of the imported vLLM (nothing of lora_ipc's refit backend is imported);
    ``loader=False`` leaves out the model loader's reload functions (importing them takes seconds)."""
    import importlib

    r = RefitSurface()
    try:
        factory = importlib.import_module("vllm.distributed.weight_transfer.factory")
        base = importlib.import_module("vllm.distributed.weight_transfer.base")
    except ImportError:
        return r
    r.present = True
    r.base_names = frozenset(n for n in REFIT_BASE_NAMES if hasattr(base, n))
    engine, trainer = getattr(base, "WeightTransferEngine", None), getattr(base, "TrainerWeightTransferEngine", None)
    if isinstance(engine, type):
        r.engine_init = params_of(engine.__init__, drop_first=True)  # type: ignore[misc]  # the class's own
        r.engine_methods = frozenset(n for n in dir(engine) if callable(getattr(engine, n, None)))
        r.engine_abstract = _abstract(engine)
    if isinstance(trainer, type):
        r.trainer_init = params_of(trainer.__init__, drop_first=True)  # type: ignore[misc]  # the class's own
        r.trainer_abstract = _abstract(trainer)
    for name in REFIT_FACTORIES:
        register = getattr(getattr(factory, name, None), "register_engine", None)
        if callable(register):
            r.register_engine[name] = params_of(register, drop_first=False)  # a bound classmethod
    if not loader:
        return r
    r.loader_read = True
    try:
        reload = importlib.import_module("vllm.model_executor.model_loader.reload")
        r.reload_names = frozenset(n for n in REFIT_RELOAD if callable(getattr(reload, n, None)))
    except ImportError:  # reported as missing by refit_problems
        pass
    try:
        mtp = importlib.import_module("vllm.model_executor.model_loader.mtp_validation")
    except ImportError:
        return r
    r.mtp_module = True
    r.mtp_check = callable(getattr(mtp, REFIT_MTP, None))
    return r


# ---- the source way (a vLLM that need not import) --------------------------------------------------


def _params_from_ast(fn: FunctionNode, drop_first: bool) -> Params:
    a = fn.args
    positional_nodes = a.posonlyargs + a.args
    defaults_start = len(positional_nodes) - len(a.defaults)
    required = {p.arg for i, p in enumerate(positional_nodes) if i < defaults_start}
    required |= {p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None}
    skip = positional_nodes[0].arg if drop_first and positional_nodes else None
    positional = tuple(p.arg for p in positional_nodes if p.arg != skip)
    names = positional + tuple(p.arg for p in a.kwonlyargs)
    return Params(names, positional, frozenset(required - {skip}), a.kwarg is not None)


def _decorators(fn: FunctionNode) -> set[str]:
    return {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in fn.decorator_list}


def _method(cls: ast.ClassDef, name: str) -> FunctionNode | None:
    return next(
        (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None
    )


def _method_params(cls: ast.ClassDef, name: str) -> Params | None:
    fn = _method(cls, name)
    if fn is None:
        return None
    return _params_from_ast(fn, drop_first="staticmethod" not in _decorators(fn))


def _top_level(tree: ast.Module) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    out[t.id] = node
    return out


def surface_from_source(root: str | Path, version: str | None = None) -> VLLMSurface:
    """The surface of the vLLM whose package directory (the one holding ``lora/``) is ``root``."""
    root = Path(root)
    s = VLLMSurface(where=str(root), version=version)
    modules: dict[str, dict[str, ast.AST]] = {}
    for path in sorted((root / "lora").glob("*.py")):
        try:
            modules[path.stem] = _top_level(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
    wm = modules.get("worker_manager", {})
    worker = wm.get("WorkerLoRAManager")
    if isinstance(worker, ast.ClassDef):
        s.load_adapter = _method_params(worker, "_load_adapter")
        fn = _method(worker, "_load_adapter")
        s.load_adapter_body = read_load_adapter(fn) if fn is not None else None
        init = _method(worker, "__init__")
        s.worker_init_attrs = _self_assignments(init) if init is not None else frozenset()
        s.list_adapters = _method(worker, "list_adapters") is not None
        for cls in (worker, wm.get("LRUCacheWorkerLoRAManager")):
            if isinstance(cls, ast.ClassDef) and (params := _method_params(cls, "add_adapter")) is not None:
                s.add_adapter[cls.name] = params
    for module in ("lora_model", "models"):
        cls = modules.get(module, {}).get("LoRAModel")
        if isinstance(cls, ast.ClassDef) and (params := _method_params(cls, "from_lora_tensors")) is not None:
            s.from_lora_tensors, s.lora_model_module = params, f"vllm.lora.{module}"
            break
    helper = modules.get("peft_helper", {}).get("PEFTHelper")
    if isinstance(helper, ast.ClassDef):
        s.peft_helper_methods = frozenset(m for m in PEFT_HELPER_METHODS if _method(helper, m) is not None)
        s.peft_helper_fields = frozenset(
            n.target.id for n in helper.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        )
    for name in UTILS:
        util = modules.get("utils", {}).get(name)
        if isinstance(util, ast.FunctionDef):
            s.utils[name] = _params_from_ast(util, drop_first=False)
    request = modules.get("request", {}).get("LoRARequest")
    if isinstance(request, ast.ClassDef):
        s.lora_request_is_struct = any(
            (getattr(b, "attr", None) or getattr(b, "id", None)) == "Struct" for b in request.bases
        )
        s.lora_request_fields = frozenset(
            n.target.id for n in request.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        )
    s.resolver_names = frozenset(modules.get("resolver", {}))
    s.refit = refit_surface_from_source(root)
    return s


def _parse_module(path: Path) -> dict[str, ast.AST] | None:
    try:
        return _top_level(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _ast_abstract(cls: ast.ClassDef) -> frozenset[str]:
    return frozenset(
        n.name
        for n in cls.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and "abstractmethod" in _decorators(n)
    )


def _exported(tree: dict[str, ast.AST], path: Path) -> frozenset[str]:
    """Top-level names of a module, plus what it imports (a package's ``__init__`` re-exports)."""
    names = set(tree)
    try:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom):
                names.update(a.asname or a.name for a in node.names)
    except (OSError, SyntaxError, UnicodeDecodeError):
        pass
    return frozenset(names)


def refit_surface_from_source(root: str | Path) -> RefitSurface:
    """The weight-transfer surface of the vLLM package directory ``root``, read with ``ast``."""
    root = Path(root)
    r = RefitSurface()
    wt = root / "distributed" / "weight_transfer"
    base, factory = _parse_module(wt / "base.py"), _parse_module(wt / "factory.py")
    if base is None or factory is None:
        return r
    r.present = True
    r.base_names = frozenset(n for n in REFIT_BASE_NAMES if n in _exported(base, wt / "base.py"))
    engine, trainer = base.get("WeightTransferEngine"), base.get("TrainerWeightTransferEngine")
    if isinstance(engine, ast.ClassDef):
        r.engine_init = _method_params(engine, "__init__")
        r.engine_methods = frozenset(
            n.name for n in engine.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        )
        r.engine_abstract = _ast_abstract(engine)
    if isinstance(trainer, ast.ClassDef):
        r.trainer_init = _method_params(trainer, "__init__")
        r.trainer_abstract = _ast_abstract(trainer)
    for name in REFIT_FACTORIES:
        cls = factory.get(name)
        if isinstance(cls, ast.ClassDef) and (params := _method_params(cls, "register_engine")) is not None:
            r.register_engine[name] = params
    loader = root / "model_executor" / "model_loader"
    r.loader_read = True
    reload = _parse_module(loader / "reload" / "__init__.py")
    if reload is not None:
        r.reload_names = REFIT_RELOAD & _exported(reload, loader / "reload" / "__init__.py")
    mtp = _parse_module(loader / "mtp_validation.py")
    r.mtp_module = mtp is not None
    r.mtp_check = mtp is not None and isinstance(mtp.get(REFIT_MTP), ast.FunctionDef)
    return r
