"""What every generation backend returns (`Rollout`) and offers (`Backend`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

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
    # [N, L] the engine's log-prob of each sampled token at the sampling temperature (0 past the mask), from
    # engines that compute their own (vllm); None where the trainer's model sampled (hf)
    sampler_logps: torch.Tensor | None = None

    def normal_tensors(self) -> Rollout:
        """Copies of tensors made under `torch.inference_mode`, which autograd may not save for backward."""
        return Rollout(
            self.prompt_ids.clone(),
            self.prompt_mask.clone(),
            self.completion_ids.clone(),
            self.completion_mask.clone(),
            self.truncated.clone(),
            self.texts,
            None if self.sampler_logps is None else self.sampler_logps.clone(),
        )


class Backend(Protocol):
    def generate(
        self,
        prompts: list[str],
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        prompt_seeds: list[int] | None = None,
    ) -> Rollout: ...

    def sync_weights(self, model: Any) -> None: ...

    def close(self) -> None: ...
