"""PeftModel -> (tensors, config): what ``save_pretrained`` would write, through PEFT's own helpers, less the
base matrices vLLM discards on load.

PEFT's state dict of an adapter that targets ``embed_tokens`` or ``lm_head`` carries the full base matrix
(``…embed_tokens.base_layer.weight``): vocabulary × hidden elements (about 1 GB for an 8B model in bf16)
that vLLM's loader skips (``vllm.lora.utils.is_base_embedding_weights``). They are never published
(:func:`vllm_discards`, the same rule, without importing vLLM). A ``torch.compile``d model is unwrapped
first: its state-dict names start with ``_orig_mod.``, which vLLM's name check would let through as layers
nobody has.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Mapping
from typing import Any

import torch

# vllm.lora.utils.is_base_embedding_weights: these names are skipped by vLLM's loader (both paths)
VLLM_DISCARDED_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
COMPILED_PREFIX = "_orig_mod."


def vllm_discards(name: str) -> bool:
    """True for a state-dict name vLLM's LoRA loader skips (a base embedding matrix); the rule of
    ``vllm.lora.utils.is_base_embedding_weights`` (tests/test_adapter_variety.py checks they agree)."""
    return name.endswith(VLLM_DISCARDED_SUFFIXES)


def _plain(value: Any) -> Any:
    """A JSON round trip, as PEFT's save_pretrained does (sets -> lists, enums -> values)."""

    def default(obj):
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        if hasattr(obj, "value"):
            return obj.value
        raise TypeError(f"cannot serialize {type(obj).__name__} in a LoRA config")

    return json.loads(json.dumps(value, default=default))


def config_to_dict(peft_config: Any) -> dict:
    if isinstance(peft_config, Mapping):
        return _plain(dict(peft_config))
    if hasattr(peft_config, "to_dict"):
        return _plain(peft_config.to_dict())
    raise TypeError(f"peft_config must be a dict or a peft LoraConfig, got {type(peft_config).__name__}")


def unwrap_compiled(obj: Any) -> Any:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``, maybe nested) wraps; ``obj`` otherwise.

    Reads the registered child ``_orig_mod`` itself: a PeftModel forwards unknown attributes to its base
    model, so ``getattr`` could find a compiled module further down."""
    while isinstance(obj, torch.nn.Module):
        inner = obj._modules.get("_orig_mod")
        if inner is None:
            break
        obj = inner
    return obj


def is_peft_model(obj: Any) -> bool:
    obj = unwrap_compiled(obj)
    return hasattr(obj, "peft_config") and hasattr(obj, "active_adapter") and hasattr(obj, "base_model")


def _strip_compiled(name: str) -> str:
    """A state-dict name without the ``_orig_mod.`` parts of compiled submodules (save_pretrained of the
    unwrapped model has none)."""
    if COMPILED_PREFIX not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def vllm_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` less the names vLLM discards, with compiled-wrapper name parts removed."""
    return {kept: state[name] for name, kept in _vllm_names(tuple(state))}


@functools.lru_cache(maxsize=16)
def _vllm_names(names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(state-dict name, the name vLLM loads it as) for each name kept: worked out once per set of names (a
    training loop publishes the same names every step)."""
    return tuple((name, _strip_compiled(name)) for name in names if not vllm_discards(name))


def _peft_state(model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return vllm_tensors(get_peft_model_state_dict(model, adapter_name=adapter_name))


def _owners(model: torch.nn.Module) -> dict[int, tuple[str, torch.nn.Module, str]]:
    """id(parameter) -> (qualified name, owning module, attribute), every path (tied ones too)."""
    found: dict[int, tuple[str, torch.nn.Module, str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None and id(param) not in found:
                found[id(param)] = (f"{mod_name}.{attr}" if mod_name else attr, module, attr)
    return found


class PeftAdapterView:
    """A PeftModel adapter's state-dict names mapped to the model's live parameters, worked out once and
    checked on every use.

    ``get_peft_model_state_dict`` walks the whole model's state dict (about 15 ms for a 32-layer
    model), far more than the copy it feeds. Optimizer steps update parameters in place and
    ``model.to(...)`` swaps their data, so holding the Parameter objects stays correct while they are
    the model's. Every use checks that they still are: each link from the model down to each parameter
    (``parent._modules[name] is child``, ``owner._parameters[attr] is param``) — a reload with
    ``assign=True`` (``set_peft_model_state_dict(..., low_cpu_mem_usage=True)``), a replaced module or a
    re-created adapter builds a new view. The config is re-read every time too. Falls back to the helper
    every time when some entry is not a parameter of the model.
    """

    def __init__(self, model: Any, adapter_name: str):
        self.config = config_to_dict(model.peft_config[adapter_name])
        state = _peft_state(model, adapter_name)
        by_ptr: dict[int, torch.nn.Parameter] = {}
        for p in model.parameters():
            by_ptr.setdefault(p.data_ptr(), p)
        owners = _owners(model)
        self.params: dict[str, torch.nn.Parameter] | None = {}
        links: dict[tuple[int, str], tuple[dict, Any]] = {}
        for name, tensor in state.items():
            param = by_ptr.get(tensor.data_ptr())
            owner = owners.get(id(param)) if param is not None else None
            if param is None or owner is None or param.shape != tensor.shape or param.dtype != tensor.dtype:
                self.params = None
                break
            self.params[name] = param
            path, module, attr = owner
            links[(id(module._parameters), attr)] = (module._parameters, param)
            parent: Any = model
            for part in path.split(".")[:-1]:
                child = parent._modules[part]
                links[(id(parent._modules), part)] = (parent._modules, child)
                parent = child
        # (dict, key, expected object): every link that must still hold for self.params to be the model's
        self.links = [(table, key, obj) for (_, key), (table, obj) in links.items()]

    def current(self, model: Any, adapter_name: str) -> bool:
        """Whether this view still names ``model``'s live parameters under an unchanged config."""
        if config_to_dict(model.peft_config.get(adapter_name, {})) != self.config:
            return False
        return all(table.get(key) is obj for table, key, obj in self.links)

    def tensors(self, model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
        if self.params is None:
            return _peft_state(model, adapter_name)
        return dict(self.params)


_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def peft_adapter_view(model: Any, adapter_name: str) -> PeftAdapterView:
    per_model = _views.setdefault(model, {})
    view = per_model.get(adapter_name)
    if view is None or not view.current(model, adapter_name):
        view = per_model[adapter_name] = PeftAdapterView(model, adapter_name)
    return view


def adapter_from(
    adapter: Any, peft_config: Any = None, adapter_name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config of a PeftModel's adapter (``torch.compile``d or not), or of a
    ``dict[str, Tensor]`` with its LoRA config; never the base matrices vLLM discards."""
    if is_peft_model(adapter):
        model = unwrap_compiled(adapter)
        name = adapter_name or model.active_adapter
        view = peft_adapter_view(model, name)
        config = view.config if peft_config is None else config_to_dict(peft_config)
        return view.tensors(model, name), config
    if isinstance(adapter, Mapping):
        if peft_config is None:
            raise TypeError("publishing a dict of tensors needs its LoRA config (peft_config=)")
        return vllm_tensors(adapter), config_to_dict(peft_config)
    raise TypeError(f"adapter must be a PeftModel or a dict[str, Tensor], got {type(adapter).__name__}")
