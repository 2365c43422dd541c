"""Generation backends behind one small interface.

A backend turns prompts into a `Rollout` (token ids, masks, decoded text) and follows the policy's weights:
`generate(prompts, n, max_new_tokens, temperature, seed)` and `sync_weights(model)`. `hf` samples with the
live transformers model (batched, KV cache, explicit seeded generator); `vllm` is an optional extra, imported
only when chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from rlopt_cli.errors import RloptError

if TYPE_CHECKING:
    import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, L] right-padded with pad after EOS
    completion_mask: torch.Tensor  # [N, L] 1 on generated tokens up to and including EOS
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without EOS
    texts: list[str]  # decoded completions, EOS and padding removed

    def normal_tensors(self) -> Rollout:
        """Copies of tensors made under `torch.inference_mode`, which autograd may not save for backward."""
        return Rollout(
            self.prompt_ids.clone(),
            self.prompt_mask.clone(),
            self.completion_ids.clone(),
            self.completion_mask.clone(),
            self.truncated.clone(),
            self.texts,
        )


class Backend(Protocol):
    def generate(
        self, prompts: list[str], n: int, max_new_tokens: int, temperature: float, seed: int
    ) -> Rollout: ...

    def sync_weights(self, model: Any) -> None: ...


BACKENDS = ("hf", "vllm")


def make_backend(name: str, model: Any, tokenizer: Any, cfg: Any) -> Backend:
    if name == "hf":
        from rlopt_cli.rollout.hf import HFBackend

        return HFBackend(model, tokenizer)
    if name == "vllm":
        from rlopt_cli.rollout.vllm import (
            VLLMBackend,
        )  # imports vllm itself, with a one-line error if missing

        return VLLMBackend(model, tokenizer, cfg)
    raise RloptError(f"unknown rollout backend {name!r}; choose one of {', '.join(BACKENDS)}")
