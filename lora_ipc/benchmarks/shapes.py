"""Llama-7B shapes: its LoRA (32 layers x 7 projections x (A, B) = 448 tensors) and its full layer weights."""

from __future__ import annotations

import torch

HIDDEN, INTERMEDIATE = 4096, 11008
PROJECTIONS = {  # name: (in_features, out_features)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}


def llama7b_lora(
    rank: int, layers: int = 32, dtype=torch.bfloat16, device="cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for i in range(layers):
        for proj, (fan_in, fan_out) in PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{i}.{proj}"
            # allocated one by one, as a trainer's parameters are
            out[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g).to(dtype).to(device)
            out[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g).to(dtype).to(device)
    return out


def lora_config(rank: int) -> dict:
    return {
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": [p.split(".")[-1] for p in PROJECTIONS],
        "peft_type": "LORA",
        "bias": "none",
    }


def llama7b_full_weights(layers: int, device: str = "cpu", scale: int = 1) -> dict[str, torch.Tensor]:
    """Llama-7B-shaped full weights (bf16, 7 matrices and a norm per layer), every dimension divided by
    ``scale`` (1: the real shapes)."""
    out = {}
    for i in range(layers):
        for proj, (fan_in, fan_out) in PROJECTIONS.items():
            out[f"model.layers.{i}.{proj}.weight"] = torch.randn(fan_out // scale, fan_in // scale, device=device).to(
                torch.bfloat16
            )
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(
            HIDDEN // scale, device=device, dtype=torch.bfloat16
        )
    return out
