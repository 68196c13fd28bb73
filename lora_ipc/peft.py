"""PeftModel -> (tensors, config), exactly what ``save_pretrained`` would write, through PEFT's own helpers."""

from __future__ import annotations

import json
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


def adapter_from(adapter: Any, peft_config: Any = None, adapter_name: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config of a PeftModel's adapter, or of a ``dict[str, Tensor]`` with its LoRA config."""
    if is_peft_model(adapter):
        from peft import get_peft_model_state_dict

        name = adapter_name or adapter.active_adapter
        tensors = get_peft_model_state_dict(adapter, adapter_name=name)
        config = config_to_dict(peft_config if peft_config is not None else adapter.peft_config[name])
        return {k: v.detach() for k, v in tensors.items()}, config
    if isinstance(adapter, Mapping):
        if peft_config is None:
            raise TypeError("publishing a dict of tensors needs its LoRA config (peft_config=)")
        return dict(adapter), config_to_dict(peft_config)
    raise TypeError(f"adapter must be a PeftModel or a dict[str, Tensor], got {type(adapter).__name__}")
