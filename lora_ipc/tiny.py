"""A tiny local Llama (and its tokenizer) built from a config, for the demo, tests and benchmarks.

head_dim is 64 because vLLM's CPU attention rejects 16. Nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 256


def tiny_llama_config(vocab_size: int = VOCAB, hidden: int = 128, layers: int = 2, intermediate: int | None = None):
    """A Llama config with 64-wide heads (``hidden // 64`` of them); the MLP is ``intermediate`` wide
    (default ``2 * hidden``)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        head_dim=64,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = VOCAB, hidden: int = 128, layers: int = 2
):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(tiny_llama_config(vocab_size, hidden, layers))  # transformers types .to oddly
    return model.to(dtype).eval()


def tiny_engine_kwargs(model_dir: str, lora_rank: int | None = 16, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a vLLM engine (``LLM(...)``, ``EngineArgs(...)``) over a tiny model directory:
    bfloat16, 128 tokens of context, eager, seeded; with LoRA (rank up to ``lora_rank``, 2 adapters on the
    device, 4 on the CPU) unless ``lora_rank`` is None. ``overrides`` replace or add arguments."""
    kwargs: dict[str, Any] = dict(
        model=model_dir,
        tokenizer=model_dir,
        dtype="bfloat16",
        max_model_len=128,
        max_num_seqs=8,
        enforce_eager=True,
        seed=0,
    )
    if lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=2, max_cpu_loras=4)
    kwargs.update(overrides)
    return kwargs


def write_tokenizer(path: str, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer over "w4".."w<vocab-1>", saved as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(path)


def write_model_dir(path: str, hidden: int = 128, layers: int = 2, seed: int = 0) -> str:
    """A bfloat16 tiny Llama plus tokenizer, saved the ordinary way, for vLLM to load."""
    os.makedirs(path, exist_ok=True)
    tiny_llama(seed, torch.bfloat16, VOCAB, hidden, layers).save_pretrained(path)
    write_tokenizer(path)
    return path


def lora_config(r: int = 8, alpha: int | None = None, random_init: bool = True):
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha or 2 * r,
        target_modules=TARGET_MODULES,
        lora_dropout=0.0,
        init_lora_weights=not random_init,
        bias="none",
        task_type="CAUSAL_LM",
    )
