"""Tiny local models and real PEFT adapters, built from configs (no hub access)."""

from __future__ import annotations

import torch

from lora_ipc.tiny import TARGET_MODULES, lora_config, tiny_llama  # noqa: F401


def peft_model(
    seed: int = 0, dtype: torch.dtype = torch.float32, r: int = 8, base_seed: int = 0, vocab_size: int = 256
):
    """A PeftModel whose LoRA A and B are both random (non-zero), in ``dtype``."""
    from peft import get_peft_model

    base = tiny_llama(base_seed, dtype, vocab_size)
    torch.manual_seed(1000 + seed)
    model = get_peft_model(base, lora_config(r), autocast_adapter_dtype=False)
    return model.to(dtype)


def train_step(model, step: int, scale: float = 0.05) -> None:
    """Change every LoRA weight deterministically, as a trainer's update would."""
    g = torch.Generator().manual_seed(10_000 + step)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=g).to(param.dtype) * scale)


def random_adapter(
    seed: int, layers: int = 2, hidden: int = 128, r: int = 8, dtype=torch.bfloat16
) -> dict[str, torch.Tensor]:
    """q_proj/v_proj LoRA weights shaped for ``tiny_llama`` (q: 2 heads x 64, v: 1 kv head x 64)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        for m, out_features in (("q_proj", hidden), ("v_proj", 64)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{m}"
            out[f"{prefix}.lora_A.weight"] = (torch.randn(r, hidden, generator=g) * 0.2).to(dtype)
            out[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, r, generator=g) * 0.2).to(dtype)
    return out


RANDOM_ADAPTER_CONFIG = {
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "peft_type": "LORA",
    "bias": "none",
}


def constant_adapter(value: int) -> dict[str, torch.Tensor]:
    """random_adapter's names and shapes, every element equal to ``value`` (float32: exact below 2**24)."""
    return {k: torch.full(v.shape, float(value)) for k, v in random_adapter(0).items()}


def perturb_weights(model, step: int, scale: float = 0.02) -> None:
    """Change every weight of ``model`` in place, deterministically per ``step`` (a full-weight training step)."""
    g = torch.Generator().manual_seed(20_000 + step)
    with torch.no_grad():
        for param in model.parameters():
            param.add_((torch.randn(param.shape, generator=g) * scale).to(param.dtype))
