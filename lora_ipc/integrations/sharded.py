"""Sharded trainers: gather a sharded PeftModel's LoRA state on rank 0 and publish it.

    version = lora_ipc.integrations.sharded.publish_sharded("policy", model)   # on EVERY rank, after the step

FSDP2 (``fully_shard``) and anything else whose parameters are ``DTensor``s: each LoRA tensor is gathered
with ``DTensor.full_tensor()`` (a collective: every rank of the mesh must call, in the same order, which
``get_peft_model_state_dict``'s order gives), only the LoRA parameters, never the base model. Rank 0
publishes (``publish``: :func:`lora_ipc.ray.publish` by default, or e.g. ``AdapterExporter.publish``) and
returns the version; the other ranks return None. Plain tensors (replicated, or DDP) are taken as they are.

DeepSpeed ZeRO-3 keeps parameters partitioned outside DTensor; gather them with DeepSpeed's own context
on every rank and publish on rank 0 (see docs/guides/rl-frameworks.md)::

    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    with deepspeed.zero.GatheredParameters(lora, modifier_rank=None):
        if torch.distributed.get_rank() == 0:
            version = lora_ipc.ray.publish("policy", model)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..lora.peft import config_to_dict, unwrap_compiled, vllm_discards


def _full(tensor: torch.Tensor) -> torch.Tensor:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return tensor
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_lora_state(model: Any, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """(rank 0: the adapter's full tensors, as ``save_pretrained`` names them; other ranks: None, its LoRA config).

    Every rank must call it (the gathers are collectives). The tensors are new memory, detached from the model.
    The base embedding matrices PEFT's state dict carries for an ``embed_tokens`` / ``lm_head`` target are
    skipped before any gather (vLLM's loader discards them; gathering one would cost vocabulary × hidden
    elements per step); every rank skips the same names, so the collectives stay in step.
    """
    from peft import get_peft_model_state_dict

    model = unwrap_compiled(model)
    name = adapter_name or model.active_adapter
    state = get_peft_model_state_dict(model, adapter_name=name)
    rank = _rank()
    full: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if vllm_discards(key):
            continue
        gathered = _full(tensor.detach())
        if rank == 0:
            full[key] = gathered.clone() if gathered is tensor or gathered.data_ptr() == tensor.data_ptr() else gathered
    return (full if rank == 0 else None), config_to_dict(model.peft_config[name])


def publish_sharded(
    name: str, model: Any, *, publish: Callable[..., int] | None = None, adapter_name: str | None = None
) -> int | None:
    """Gather ``model``'s LoRA state (every rank calls) and publish it from rank 0; rank 0 gets the version."""
    tensors, config = gather_lora_state(model, adapter_name)
    if tensors is None:
        return None
    if publish is None:
        import lora_ipc.ray

        publish = lora_ipc.ray.publish
    return publish(name, tensors, config)
