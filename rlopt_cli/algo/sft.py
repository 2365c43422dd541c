"""SFT on a task's reference solutions, in the same [prompt | completion] layout GRPO uses.

The loss is the mean negative log-likelihood of the completion tokens (solution + EOS) only, never the prompt:
the same objective the paper contrasts RL with, and the one that warms up the embedded model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlopt_cli.algo.grpo import token_logprobs
from rlopt_cli.rollout import Rollout
from rlopt_cli.tasks import Example


def sft_batch(
    tokenizer: Any, prompts: list[str], examples: Sequence[Example], device: torch.device
) -> Rollout:
    """Left-padded prompts and right-padded reference completions ending in EOS."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    targets = [
        tokenizer(e.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for e in examples
    ]
    length = max(len(t) for t in targets)
    completion_ids = torch.full((len(targets), length), tokenizer.pad_token_id, dtype=torch.long)  # [N, L]
    completion_mask = torch.zeros((len(targets), length), dtype=torch.long)  # [N, L]
    for i, t in enumerate(targets):  # building the batch, not a hot loop over tokens
        completion_ids[i, : len(t)] = torch.tensor(t)
        completion_mask[i, : len(t)] = 1
    return Rollout(
        prompt_ids=enc.input_ids.to(device),
        prompt_mask=enc.attention_mask.to(device),
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        truncated=torch.zeros(len(targets), dtype=torch.bool, device=device),
        texts=[e.solution for e in examples],
    )


def sft_loss(model: Any, batch: Rollout) -> torch.Tensor:
    logps = token_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
    )  # [N, L]
    mask = batch.completion_mask.float()  # [N, L]
    return -(logps * mask).sum() / mask.sum()
