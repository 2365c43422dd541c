"""GRPO math as pure functions: group advantages, per-token log-probs, the clipped surrogate with a k3 KL
penalty, and the four loss aggregations. Each tensor line carries its shape. Tested against hand-computed
numbers in tests/test_grpo.py.

Conventions follow TRL's GRPOTrainer (`_compute_loss`): advantages (r - mean) / (std + 1e-4) with the unbiased
std; per-token loss -min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) + beta * k3; aggregation:
- grpo:    mean over each sequence's tokens, then mean over sequences (length-biased, the original GRPO)
- bnpo:    token mean within each micro-batch, averaged over micro-batches
- dr_grpo: token sum / (num_sequences * max_completion_length), a constant normaliser (Dr. GRPO)
- dapo:    token sum / active tokens in the whole batch (TRL's default; verl's token-mean)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from rlopt_cli.models.loading import cache_argument, custom_attention_mask
from rlopt_cli.models.prompt_cache import SharedPrompt, cache_kept_under_checkpointing

ADV_EPS = 1e-4  # as TRL and nano-aha-moment: keeps groups with tiny reward spread from exploding


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str) -> torch.Tensor:
    """Rewards [B] ordered prompt-major (G consecutive completions per prompt) -> advantages [B]."""
    grouped = rewards.view(-1, num_generations)  # [B/G, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [B/G, G]
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + ADV_EPS)
    elif scale == "batch":
        centred = centred / (rewards.std() + ADV_EPS)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return centred.reshape(-1)  # [B]


def token_logprobs(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    group_size: int = 1,
    pack_max_tokens: int = 0,
) -> torch.Tensor:
    """log p(completion token | prefix) under `model`, batched: [N, L].

    With `group_size` G > 1 the rows come in groups of G consecutive rows that share one prompt (GRPO's layout),
    and each prompt is forwarded once per group, from N/G x P + N x L tokens instead of N x (P + L):
    - packed, when the group's P + G x (L-1) tokens fit `pack_max_tokens`: one forward per group over its prompt
      followed by its G completions, under a shared-prefix mask (`packed_group_logits`);
    - otherwise the prompt's KV cache, autograd graph included, is repeated over the group and the completions
      are forwarded on top of it (`shared_prompt_logits`).
    Every route gives the log-probs and gradients of one forward over every row's P + L tokens, with gradient
    checkpointing on or off (tested on tiny Llama, Qwen2 and Qwen3 models in tests/test_real_archs.py).
    """
    attention = torch.cat([prompt_mask, completion_mask], dim=1)  # [N, P+L]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [N, P+L]: left padding shifts positions
    if group_size > 1:
        check_groups(prompt_ids, group_size)
        packed_len = prompt_ids.shape[1] + group_size * (completion_ids.shape[1] - 1)
        logits = None
        if packed_len <= pack_max_tokens:
            logits = packed_group_logits(model, prompt_ids, prompt_mask, completion_ids, group_size)
        if logits is None:  # a long group, or attention that takes no custom mask (flash): share the cache
            logits = shared_prompt_logits(model, prompt_ids, completion_ids, attention, positions, group_size)
    else:
        # Only the last L+1 positions' logits: the prompt's would cost N x P x V for nothing (V is 150k for Qwen).
        out = model(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),  # [N, P+L]
            attention_mask=attention,
            position_ids=positions,
            use_cache=False,  # one pass: a cache would only hold references (and make checkpointing warn)
            logits_to_keep=completion_ids.shape[1] + 1,
        )
        logits = out.logits[:, :-1, :]  # [N, L, V] predicts each completion token
    logits = logits.float()
    if temperature != 1.0:  # score under the distribution the rollouts were sampled from
        logits = logits / temperature
    logps = torch.log_softmax(logits, dim=-1)  # [N, L, V]
    return logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # [N, L]


def check_groups(prompt_ids: torch.Tensor, group_size: int) -> None:
    if len(prompt_ids) % group_size or not torch.equal(
        prompt_ids, prompt_ids[::group_size].repeat_interleave(group_size, 0)
    ):
        raise ValueError(f"rows do not come in groups of {group_size} that share a prompt")


def shared_prompt_logits(
    model: Any,
    prompt_ids: torch.Tensor,
    completion_ids: torch.Tensor,
    attention: torch.Tensor,
    positions: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Logits [N, L, V] predicting each completion token, each group's prompt forwarded once.

    The prompt's keys/values, autograd graph included, go into our own caches (`rlopt_cli/prompt_cache.py`),
    which read the same on a checkpoint replay: so this route is exact with gradient checkpointing on too, and
    keeps checkpointing's memory saving in both passes (transformers' own cache is switched off there).
    """
    prompt_len = prompt_ids.shape[1]
    first = slice(None, None, group_size)  # one row per group
    shared = SharedPrompt(model)
    cache_arg = cache_argument(model)
    with cache_kept_under_checkpointing(model):
        out = model(
            input_ids=prompt_ids[first],  # [N/G, P]
            attention_mask=attention[first, :prompt_len],
            position_ids=positions[first, :prompt_len],
            use_cache=False,  # we pass our cache; True would only make checkpointing warn that it turns it off
            logits_to_keep=1,
            **{cache_arg: shared.prompt_cache},  # records each layer's prompt keys/values
        )
        logits = [out.logits.repeat_interleave(group_size, 0)]  # [N, 1, V]: predicts completion token 0
        if completion_ids.shape[1] > 1:
            prefix = shared.completion_cache(group_size, out.logits.requires_grad)  # [N, ...] keys/values
            rest = model(
                input_ids=completion_ids[:, :-1],  # [N, L-1]: each predicts the next completion token
                attention_mask=attention[:, :-1],  # [N, P+L-1]: the cached prompt and the completion so far
                position_ids=positions[:, prompt_len:-1],
                use_cache=False,
                **{cache_arg: prefix},
            )
            logits.append(rest.logits)  # [N, L-1, V]
    return torch.cat(logits, dim=1)


def packed_group_logits(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    group_size: int,
) -> torch.Tensor | None:
    """Logits [N, L, V] predicting each completion token: one forward per group over one sequence, its prompt
    then its G completions (minus each one's last token), where each completion attends to the prompt and to its
    own earlier tokens only, at the positions it had after the prompt.

    One forward instead of `shared_prompt_logits`' two, and no cache to repeat: fewer, larger kernels, which is
    what short completions are bound by. The mask is dense, [N/G, 1, S, S] with S = P + G x (L-1), and attention
    costs O(S^2) per group, so this is for groups that stay short (`grpo.pack_max_tokens`). None when the
    model's attention takes no custom mask (`models.custom_attention_mask`).
    """
    n, prompt_len = prompt_ids.shape
    groups, steps = n // group_size, completion_ids.shape[1] - 1  # steps: completion tokens that are inputs
    device = prompt_ids.device
    first = slice(None, None, group_size)  # one row per group
    real = prompt_mask[first].bool()  # [N/G, P] real (not left-padding) prompt tokens
    completions = completion_ids[:, :-1].reshape(groups, group_size * steps)  # [N/G, G(L-1)]
    ids = torch.cat([prompt_ids[first], completions], 1)  # [N/G, S]
    offsets = torch.arange(steps, device=device).repeat(group_size)  # [G(L-1)] index within its completion
    after_prompt = real.sum(-1, keepdim=True) + offsets  # [N/G, G(L-1)]
    positions = torch.cat([(real.cumsum(-1) - 1).clamp(min=0), after_prompt], 1)  # [N/G, S]
    # which part each position belongs to: -1 the prompt, g completion g
    completion_part = torch.arange(group_size, device=device).repeat_interleave(steps)  # [G(L-1)]
    segment = torch.cat([torch.full((prompt_len,), -1, device=device), completion_part])  # [S]
    index = torch.arange(len(segment), device=device)  # [S]
    causal = index[:, None] >= index[None, :]  # [S, S] query -> key
    own = (segment[None, :] == -1) | (segment[:, None] == segment[None, :])  # the prompt or its own part
    key_real = torch.cat([real, real.new_ones(completions.shape)], 1)  # [N/G, S]
    # A left-padding query sees no real key: let it see itself, so its softmax is finite (nobody reads it).
    itself = torch.eye(len(segment), dtype=torch.bool, device=device)  # [S, S]
    mask = custom_attention_mask(model, (causal & own & key_real[:, None, :]) | itself)  # [N/G, 1, S, S]
    if mask is None:
        return None
    last_prompt = torch.tensor([prompt_len - 1], device=device)  # predicts every completion's token 0
    keep = torch.cat([last_prompt, torch.arange(prompt_len, len(segment), device=device)])  # [1 + G(L-1)]
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep
    )
    logits = out.logits  # [N/G, 1 + G(L-1), V]
    vocab = logits.shape[-1]
    token0 = logits[:, :1].expand(groups, group_size, vocab).reshape(n, 1, vocab)  # [N, 1, V]
    return torch.cat([token0, logits[:, 1:].reshape(n, steps, vocab)], 1)  # [N, L, V]


class TokenLoss(NamedTuple):
    loss: torch.Tensor  # [N, L] per-token loss (surrogate + beta * kl)
    kl: torch.Tensor  # [N, L] k3 estimate of KL(policy || reference); zeros when beta = 0
    clipped: torch.Tensor  # [N, L] bool: the clip bound was active (the gradient is zero there)


def per_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    epsilon: float,
    epsilon_high: float,
    beta: float,
) -> TokenLoss:
    ratio = torch.exp(logps - old_logps)  # [N, L]
    adv = advantages.unsqueeze(1)  # [N, 1]
    unclipped = ratio * adv  # [N, L]
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv  # [N, L]
    loss = -torch.min(unclipped, clipped)  # [N, L]
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))  # [N, L]
    kl = torch.zeros_like(logps)
    if beta > 0 and ref_logps is not None:
        delta = ref_logps - logps  # [N, L]
        kl = torch.exp(delta) - delta - 1  # [N, L] k3: unbiased, always >= 0
        loss = loss + beta * kl
    return TokenLoss(loss, kl, is_clipped)


def aggregate(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
    num_micro_batches: int = 1,
    micro_batch_tokens: int | None = None,
) -> torch.Tensor:
    """Reduce a micro-batch's [N, L] token losses to the scalar whose gradient sums to the batch gradient.

    `num_sequences` and `num_tokens` count the whole batch (all micro-batches), so the micro-batch losses
    add up to exactly the loss of one big batch for grpo, dr_grpo and dapo. `micro_batch_tokens` counts the
    micro-batch's tokens when rows with zero loss were left out of `token_loss` (bnpo's normaliser).
    """
    mask = mask.to(token_loss.dtype)
    total = (token_loss * mask).sum()
    if loss_type == "grpo":
        per_seq = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
        return per_seq.sum() / num_sequences
    if loss_type == "bnpo":
        tokens = mask.sum().clamp(min=1) if micro_batch_tokens is None else max(micro_batch_tokens, 1)
        return total / tokens / num_micro_batches
    if loss_type == "dr_grpo":
        return total / (num_sequences * max_completion_length)
    if loss_type == "dapo":
        return total / max(num_tokens, 1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.to(values.dtype)
    return float((values * mask).sum() / mask.sum().clamp(min=1))
