"""How many bytes one adapter fetch may copy inside a vLLM worker: derived from what the worker can use.

vLLM preallocates, per LoRA slot, stacked buffers for every LoRA-able module (``lora_a_stacked``,
``lora_b_stacked``, ``full_weight_stacked`` …, shaped ``(max_loras, …)``). An adapter this worker can
load holds at most one slot's worth of elements, times the tensor-parallel degree (the buffers hold
one rank's shard, a fetch brings the whole adapter), in a wire dtype of at most 8 bytes, plus the
layout's 256-byte alignment per tensor. Embedding deltas (``lora_embedding_A``: rank × vocabulary) and
a classifier's full ``modules_to_save`` weight have stacked buffers of their own and are counted with
them; the base embedding matrices PEFT saves beside an embedding LoRA are discarded by vLLM and never
published (:func:`lora_ipc.lora.peft.vllm_discards`). An engine whose LoRA ``target_modules`` are restricted
leaves layers unwrapped that adapters may still carry (vLLM loads and ignores them): those count too, at
``max_lora_rank``. A reply larger than that is refused before anything is allocated.
``$LORA_IPC_MAX_FETCH_BYTES`` overrides the derived bound; where the buffers cannot be read (another
vLLM), the client's default applies.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import settings
from ..core.fetching.client import ENV_MAX_FETCH_BYTES
from .compat import runtime

WIDEST_DTYPE_BYTES = 8
MIN_BOUND = 64 << 20  # small models: room for alignment and config-sized extras
ALIGN_SLACK = 2 * 256  # per stacked tensor: an A and a B entry, each padded to 256 bytes


def _stacked_tensors(module: Any) -> list[torch.Tensor]:
    found = []
    for attr, value in vars(module).items():
        if not attr.endswith("_stacked"):
            continue
        items = value if isinstance(value, (tuple, list)) else (value,)
        found += [t for t in items if isinstance(t, torch.Tensor) and t.dim() >= 1]
    return found


def _unwrapped_elements(manager: Any) -> tuple[int, int]:
    """(elements, tensors) of one adapter's largest LoRA weights for the layers a deployment-time
    ``target_modules`` restriction left unwrapped: full sizes (an adapter is whole), every packed part's A."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    rank = int(manager.lora_config.max_lora_rank)
    supported = set(manager.supported_lora_modules)
    packed = manager.packed_modules_mapping or {}
    total = tensors = 0
    for name, module in manager.model.named_modules():
        suffix = name.rsplit(".", 1)[-1]
        if name in manager.modules or suffix not in supported:
            continue
        if isinstance(module, LinearBase):
            parts = max(1, len(packed.get(suffix, [suffix])))
            total += rank * (parts * int(module.input_size) + int(module.output_size))
            tensors += 2 * parts
        elif isinstance(module, VocabParallelEmbedding):
            total += rank * (int(module.org_vocab_size) + int(module.embedding_dim))
            tensors += 2
    return total, tensors


def fetch_bound(worker_manager: Any) -> int | None:
    """The most bytes one adapter fetch may copy in this worker, or None to use the client's default."""
    if settings.is_set(ENV_MAX_FETCH_BYTES):
        return None  # the operator's setting wins (the client reads it)
    try:
        manager = runtime.adapter_manager(worker_manager)
        elements = 0
        tensors = 0
        tp = 1
        for module in manager.modules.values():
            tp = max(tp, int(getattr(module, "tp_size", 1) or 1))
            for t in _stacked_tensors(module):
                elements += t.numel() // t.shape[0] if t.shape[0] else 0  # one slot of (slots, ...)
                tensors += 1
    except (AttributeError, TypeError, ValueError):
        return None
    if not elements:
        return None
    if getattr(getattr(manager, "lora_config", None), "target_modules", None) is not None:
        try:
            more_elements, more_tensors = _unwrapped_elements(manager)
        except (AttributeError, ImportError, TypeError, ValueError):
            return None  # cannot tell what the unwrapped layers may carry: the client's default
        elements += more_elements
        tensors += more_tensors
    return max(MIN_BOUND, tp * elements * WIDEST_DTYPE_BYTES + tensors * ALIGN_SLACK)
