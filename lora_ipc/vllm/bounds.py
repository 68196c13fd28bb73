"""How many bytes one adapter fetch may copy inside a vLLM worker: derived from what the worker can use.

vLLM preallocates, per LoRA slot, stacked buffers for every LoRA-able module (``lora_a_stacked``,
``lora_b_stacked``, ``full_weight_stacked`` …, shaped ``(max_loras, …)``). An adapter this worker can
load holds at most one slot's worth of elements, times the tensor-parallel degree (the buffers hold
one rank's shard, a fetch brings the whole adapter), in a wire dtype of at most 8 bytes, plus the
layout's 256-byte alignment per tensor. A reply larger than that is refused before anything is
allocated. ``$LORA_IPC_MAX_FETCH_BYTES`` overrides the derived bound; where the buffers cannot be read
(another vLLM), the client's default applies.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import settings
from ..client import ENV_MAX_FETCH_BYTES

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


def fetch_bound(worker_manager: Any) -> int | None:
    """The most bytes one adapter fetch may copy in this worker, or None to use the client's default."""
    if settings.is_set(ENV_MAX_FETCH_BYTES):
        return None  # the operator's setting wins (the client reads it)
    try:
        manager = worker_manager._adapter_manager
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
    return max(MIN_BOUND, tp * elements * WIDEST_DTYPE_BYTES + tensors * ALIGN_SLACK)
