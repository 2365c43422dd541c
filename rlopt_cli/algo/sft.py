"""SFT on a task's reference solutions, in the same [prompt | completion] layout GRPO uses.

The loss is the mean negative log-likelihood of the completion tokens (solution + EOS) only, never the prompt:
the same objective the paper contrasts RL with, and the one that warms up the embedded model. `sft_backward`
accumulates it over micro-batches (`sft.micro_batch_size`), each normalised by the whole batch's token count, so
the gradient is the whole batch's up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlopt_cli.algo.grpo import token_logprobs
from rlopt_cli.models.loading import encode_prompts
from rlopt_cli.rollout import Rollout
from rlopt_cli.runtime.devices import autocast
from rlopt_cli.tasks import Example


def sft_batch(
    tokenizer: Any,
    prompts: list[str],
    examples: Sequence[Example],
    device: torch.device,
    templated: bool = False,
) -> Rollout:
    """Left-padded prompts and right-padded reference completions ending in EOS. `templated`: the prompts went
    through the chat template, which wrote the special tokens itself (`encode_prompts`)."""
    enc = encode_prompts(tokenizer, prompts, templated)
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


def sft_loss(model: Any, batch: Rollout, num_tokens: int | None = None) -> torch.Tensor:
    """Summed NLL of the batch's completion tokens over `num_tokens` (None: this batch's own count, the mean)."""
    logps = token_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
    )  # [N, L]
    mask = batch.completion_mask.float()  # [N, L]
    return -(logps * mask).sum() / (mask.sum() if num_tokens is None else num_tokens)


def sft_backward(
    model: Any, batch: Rollout, micro_batch_size: int, precision: str, num_tokens: int | None = None
) -> float:
    """Backward the batch's summed NLL over `num_tokens` into the gradients, `micro_batch_size` rows per pass
    (0 = all at once, the original path, untouched); returns the loss. `num_tokens`: the token count of the
    whole step, summed over the ranks of a sharded run (each rank's loss is then its share of the global mean);
    None = this batch's own count, its mean NLL. Every micro-batch's summed NLL is divided by that same count,
    so the passes add up to the whole batch's loss and gradient (each micro-batch's own mean, averaged, would
    weight a token of a short micro-batch more)."""
    device = batch.prompt_ids.device
    if not micro_batch_size:
        with autocast(precision, device):
            loss = sft_loss(model, batch, num_tokens)
        loss.backward()
        return loss.item()
    num_tokens = int(batch.completion_mask.sum()) if num_tokens is None else num_tokens
    total = 0.0
    for start in range(0, len(batch.texts), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        micro = Rollout(
            batch.prompt_ids[rows],
            batch.prompt_mask[rows],
            batch.completion_ids[rows],
            batch.completion_mask[rows],
            batch.truncated[rows],
            batch.texts[rows],
        )  # token_logprobs trims it to its own longest prompt and completion
        with autocast(precision, device):
            loss = sft_loss(model, micro, num_tokens)
        loss.backward()
        total += loss.item()
    return total
