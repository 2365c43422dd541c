"""Generation backends behind one small interface.

A backend turns prompts into a `Rollout` (token ids, masks, decoded text) and follows the policy's weights:
`generate(prompts, n, max_new_tokens, temperature, seed, prompt_seeds=None)`, `sync_weights(model)`, and
`close()` at the end of a run. `hf` samples with the live transformers model (batched, KV cache, explicit seeded
generator); `vllm` is an optional extra, imported only when chosen.
"""

from __future__ import annotations

from typing import Any

from rlopt_cli.errors import RloptError
from rlopt_cli.models.loading import uses_chat_template
from rlopt_cli.rollout.base import Backend, Rollout
from rlopt_cli.rollout.hf import HFBackend
from rlopt_cli.rollout.vllm import VLLMBackend  # imports vllm itself only when an engine starts

__all__ = ["BACKENDS", "Backend", "Rollout", "make_backend"]

BACKENDS = ("hf", "vllm")


def make_backend(name: str, model: Any, tokenizer: Any, cfg: Any) -> Backend:
    """A backend for prompts rendered by `render_prompts(..., cfg.task.chat_template, ...)`."""
    if name == "hf":
        return HFBackend(model, tokenizer, uses_chat_template(tokenizer, cfg.task.chat_template))
    if name == "vllm":
        return VLLMBackend(model, tokenizer, cfg)
    raise RloptError(f"unknown rollout backend {name!r}; choose one of {', '.join(BACKENDS)}")
