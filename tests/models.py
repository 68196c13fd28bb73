"""Tiny local models and real PEFT adapters, built from configs (no hub access)."""

from __future__ import annotations

import torch

from lora_ipc.tiny import TARGET_MODULES, lora_config, tiny_llama, tiny_llama_config  # noqa: F401


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


# ---- tiny model families (tests/test_adapter_variety.py) --------------------------------------------

# vocabulary per family: Qwen3 gets a real-sized one (72k), so shipping a base embedding matrix shows
FAMILY_VOCAB = {"llama": 256, "qwen2": 256, "qwen3": 73_728, "mistral": 256, "gemma": 256, "phi3": 256}
FUSED = {"phi3"}  # one qkv_proj and one gate_up_proj per layer, as in the Hugging Face model


def family_config(family: str):
    """A tiny config of ``family``: hidden 128, 2 layers, 64-wide heads (vLLM's CPU attention needs 64);
    Qwen2 and Gemma tie their embeddings, as the real ones do."""
    import transformers

    vocab = FAMILY_VOCAB[family]
    common = dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        return tiny_llama_config(vocab)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=64, tie_word_embeddings=False)
    if family == "mistral":
        return transformers.MistralConfig(**common, head_dim=64, sliding_window=None, tie_word_embeddings=False)
    if family == "gemma":
        return transformers.GemmaConfig(**common, head_dim=64, tie_word_embeddings=True)
    if family == "phi3":
        return transformers.Phi3Config(**{**common, "num_key_value_heads": 2}, tie_word_embeddings=False)
    raise ValueError(family)


def family_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family))
    return model.to(dtype).eval()


def write_family_dir(family: str, path: str, seed: int = 0) -> str:
    """``family``'s tiny model in bfloat16 plus a tokenizer, saved the ordinary way, for vLLM to load."""
    import os

    from lora_ipc.tiny import write_tokenizer

    os.makedirs(path, exist_ok=True)
    family_model(family, seed, torch.bfloat16).save_pretrained(path)
    write_tokenizer(path, FAMILY_VOCAB[family])
    return path


def family_peft(family: str, config, seed: int = 0, dtype: torch.dtype = torch.float32, base_seed: int = 0):
    """A PeftModel of ``family``'s tiny model (weights as :func:`write_family_dir` saves them, before the
    bf16 cast) whose adapter weights are all random and large enough to change greedy tokens."""
    from peft import get_peft_model

    model = get_peft_model(family_model(family, base_seed), config, autocast_adapter_dtype=False)
    g = torch.Generator().manual_seed(3000 + seed)
    # the tiny Gemma (tied, embeddings scaled by sqrt(hidden)) repeats the prompt's last token: at 0.1 an
    # attention-only adapter leaves greedy tokens as they are
    scale = 0.3 if family == "gemma" else 0.1
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    return model.to(dtype)
