"""Tiny random models of the real architectures, and a byte-level tokenizer with a chat template, for the tests.

Each model is its architecture's transformers class at toy size (width 64, 2 layers, 4 query heads over 2 KV
heads), so the real code paths run: GQA, tied embeddings, Qwen2's attention biases, Qwen3's q/k norms. The
tokenizer is byte-level BPE with no merges (every byte is a token, so any text encodes, as in Qwen's and
Llama's tokenizers) plus ChatML special tokens and a Qwen-style chat template. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "qwen2", "qwen3")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer() -> Any:
    """259 tokens: 256 bytes, then <|endoftext|> (pad), <|im_start|>, <|im_end|> (EOS, as in Qwen's chat models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: str, vocab_size: int, eos_token_id: int = 0, pad_token_id: int = 0) -> Any:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, as every real model here
        max_position_embeddings=1024,
        tie_word_embeddings=True,  # SmolLM2, Qwen2.5-0.5B and Qwen3-1.7B all tie lm_head to the embeddings
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":  # Qwen2.5: q/k/v biases
        return Qwen2Config(**common)
    if arch == "qwen3":  # q/k RMSNorm per head, explicit head_dim
        return Qwen3Config(**common, head_dim=16)
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")


def tiny_model(arch: str, vocab_size: int = 259, seed: int = 0) -> Any:
    """A random fp32 model of `arch` in train mode (no dropout in these configs), with sdpa attention."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), attn_implementation="sdpa")
    return model.float().train()


def save_tiny_model(folder: Path, arch: str, seed: int = 0) -> Path:
    """A local Hugging Face folder (config.json, model.safetensors, tokenizer files) that `rlopt` loads as a
    real model."""
    tok = byte_tokenizer()
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = tiny_config(arch, len(tok), tok.eos_token_id, tok.pad_token_id)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def reward_spread(monkeypatch: Any, group: int = 4) -> None:
    """A random model never answers right, so every group's rewards tie and GRPO has no gradient. Forced rewards
    (tests/conftest.py: the first completion of each group scores 1) give every group a spread by construction;
    eval keeps the real verifier."""
    from tests.conftest import first_of_each, force_rewards

    force_rewards(monkeypatch, first_of_each(group))
