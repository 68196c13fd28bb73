"""PeftModel -> (tensors, config), exactly what ``save_pretrained`` would write, through PEFT's own helpers."""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from typing import Any

import torch


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


def is_peft_model(obj: Any) -> bool:
    return hasattr(obj, "peft_config") and hasattr(obj, "active_adapter") and hasattr(obj, "base_model")


class PeftAdapterView:
    """A PeftModel adapter's state-dict names mapped to the model's live parameters, worked out once.

    ``get_peft_model_state_dict`` walks the whole model's state dict (about 15 ms for a 32-layer
    model), far more than the copy it feeds. Optimizer steps update parameters in place and
    ``model.to(...)`` swaps their data, so holding the Parameter objects stays correct; a new adapter
    config object (re-created adapter) builds a new view. Falls back to the helper every time when
    some entry is not a parameter of the model.
    """

    def __init__(self, model: Any, adapter_name: str):
        from peft import get_peft_model_state_dict

        self.config_obj = model.peft_config[adapter_name]
        self.config = config_to_dict(self.config_obj)
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        by_ptr = {p.data_ptr(): p for p in model.parameters()}
        self.params: dict[str, torch.nn.Parameter] | None = {}
        for name, tensor in state.items():
            param = by_ptr.get(tensor.data_ptr())
            if param is None or param.shape != tensor.shape or param.dtype != tensor.dtype:
                self.params = None
                break
            self.params[name] = param

    def tensors(self, model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
        if self.params is None:
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(model, adapter_name=adapter_name)
        return dict(self.params)


_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def peft_adapter_view(model: Any, adapter_name: str) -> PeftAdapterView:
    per_model = _views.setdefault(model, {})
    view = per_model.get(adapter_name)
    if view is None or view.config_obj is not model.peft_config.get(adapter_name):
        view = per_model[adapter_name] = PeftAdapterView(model, adapter_name)
    return view


def adapter_from(
    adapter: Any, peft_config: Any = None, adapter_name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config of a PeftModel's adapter, or of a ``dict[str, Tensor]`` with its LoRA config."""
    if is_peft_model(adapter):
        name = adapter_name or adapter.active_adapter
        view = peft_adapter_view(adapter, name)
        config = view.config if peft_config is None else config_to_dict(peft_config)
        return view.tensors(adapter, name), config
    if isinstance(adapter, Mapping):
        if peft_config is None:
            raise TypeError("publishing a dict of tensors needs its LoRA config (peft_config=)")
        return dict(adapter), config_to_dict(peft_config)
    raise TypeError(f"adapter must be a PeftModel or a dict[str, Tensor], got {type(adapter).__name__}")
