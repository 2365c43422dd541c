"""GRPO math as pure functions: group advantages, per-token log-probs, the clipped surrogate with a k3 KL
penalty, and the four loss aggregations. Each tensor line carries its shape. Tested against hand-computed
numbers in tests/test_grpo.py.

Log-probs come from the decoder's final hidden states through `lm_head.py`, which never holds a whole
micro-batch's logits when chunking is on.

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
from torch.utils.checkpoint import checkpoint

from rlopt_cli.algo.lm_head import output_head, token_logprobs_from_hidden
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
    chunk_tokens: int = 0,
    columns: tuple[int, int] | None = None,
) -> torch.Tensor:
    """log p(completion token | prefix) under `model`, batched: [N, L].

    With `group_size` G > 1 the rows come in groups of G consecutive rows that share one prompt (GRPO's layout),
    and each prompt is forwarded once per group, from N/G x P + N x L tokens instead of N x (P + L):
    - packed, when the group's P + G x (L-1) tokens fit `pack_max_tokens`: one forward per group over its prompt
      followed by its G completions, under a shared-prefix mask (`packed_group_hidden`);
    - otherwise the prompt's KV cache, autograd graph included, is repeated over the group and the completions
      are forwarded on top of it (`shared_prompt_hidden`).
    Every route forwards the decoder only and hands its final hidden states to `lm_head.token_logprobs_from_hidden`,
    which applies lm_head `chunk_tokens` positions at a time (0: all at once), so no route materialises the
    micro-batch's [tokens, vocab] logits. The batch is first trimmed to its own longest row (`trim`); columns
    past it score 0. Every route gives the log-probs and gradients of one plain forward over every row's P + L
    tokens, with gradient checkpointing on or off (tests/test_real_archs.py: tiny Llama, Qwen2 and Qwen3).
    `columns` overrides the trim's (first prompt column, completion columns): a sharded run agrees them over
    all ranks, so every rank forwards the same shapes (training/sharding.py).
    """
    full_length = completion_ids.shape[1]
    prompt_ids, prompt_mask, completion_ids, completion_mask = trim(
        prompt_ids, prompt_mask, completion_ids, completion_mask, columns
    )
    attention = torch.cat([prompt_mask, completion_mask], dim=1)  # [N, P+L]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [N, P+L]: left padding shifts positions
    decoder = model.get_decoder()
    if group_size > 1:
        check_groups(prompt_ids, group_size)
        packed_len = prompt_ids.shape[1] + group_size * (completion_ids.shape[1] - 1)
        hidden = None
        if packed_len <= pack_max_tokens:
            kept = packed_group_hidden(model, prompt_ids, prompt_mask, completion_ids, group_size)
            if kept is not None:
                logps = packed_logprobs(kept, completion_ids, output_head(model), temperature, chunk_tokens)
                return torch.nn.functional.pad(logps, (0, full_length - logps.shape[1]))  # [N, L] as given
        if hidden is None:  # a long group, or attention that takes no custom mask (flash): share the cache
            hidden = shared_prompt_hidden(model, prompt_ids, completion_ids, attention, positions, group_size)
    else:
        out = decoder(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),  # [N, P+L]
            attention_mask=attention,
            position_ids=positions,
            use_cache=False,  # one pass: a cache would only hold references (and make checkpointing warn)
        )
        # Only the L positions that predict a completion token go to lm_head: the prompt's would cost N x P x V.
        hidden = out.last_hidden_state[:, -completion_ids.shape[1] - 1 : -1]  # [N, L, H]
    logps = token_logprobs_from_hidden(hidden, completion_ids, output_head(model), temperature, chunk_tokens)
    return torch.nn.functional.pad(logps, (0, full_length - logps.shape[1]))  # [N, L] as given


def micro_batch_rows(
    prompt_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    carries: torch.Tensor,
    group_size: int,
    micro_batch_size: int = 0,
    budget_tokens: int = 0,
) -> list[torch.Tensor]:
    """The batch's micro-batches, as row indices [b] (CPU): `micro_batch_size` consecutive rows each (0: one
    micro-batch), or with `budget_tokens` > 0, whole groups packed under a token budget:
    - groups are taken widest first (prompt + completion, as `trim` leaves them), so each micro-batch holds groups
      of similar width and pads little, and added greedily while the micro-batch's padded size, rows x (longest
      prompt + longest completion), stays within the budget;
    - a group bigger than the budget on its own goes alone: a group is never split, so its prompt is forwarded
      once for its G completions (`token_logprobs` with group_size G);
    - only rows that are forwarded (`carries` [B] bool) count: groups that carry no gradient go together in one
      last micro-batch that the loop skips at no cost (or the only one, when nothing is forwarded).
    The loss normalisers of grpo, dr_grpo and dapo count the whole batch, so any partition gives the same summed
    loss and gradient, up to float summation order (bnpo's per-micro-batch mean would not: the config refuses
    it with a budget). prompt_mask [B, P], completion_mask [B, L] (the loss mask)."""
    rows = completion_mask.shape[0]
    if budget_tokens <= 0:
        micro = micro_batch_size or rows
        return [torch.arange(i, min(i + micro, rows)) for i in range(0, rows, micro)]
    prompt_mask, completion_mask = prompt_mask.cpu(), completion_mask.cpu()
    # real tokens' span: prompts are left-padded (counted from the right), completions right-padded
    prompt_extent = (prompt_mask.flip(1) * torch.arange(1, prompt_mask.shape[1] + 1)).amax(1)  # [B]
    completion_extent = (completion_mask * torch.arange(1, completion_mask.shape[1] + 1)).amax(1)  # [B]
    prompt_len = prompt_extent.view(-1, group_size).amax(1)  # [B/G]
    completion_len = completion_extent.clamp(min=1).view(-1, group_size).amax(1)  # [B/G]
    forwarded = carries.cpu().view(-1, group_size).any(1)  # [B/G]
    widest_first = torch.argsort(prompt_len + completion_len, descending=True, stable=True)  # [B/G]
    packs: list[list[int]] = []
    longest_prompt = longest_completion = 0  # of the open pack (packs[-1])
    for group in widest_first[forwarded[widest_first]].tolist():
        p_len = max(longest_prompt, int(prompt_len[group]))
        c_len = max(longest_completion, int(completion_len[group]))
        if not packs or (len(packs[-1]) + 1) * group_size * (p_len + c_len) > budget_tokens:
            packs.append([])
            p_len, c_len = int(prompt_len[group]), int(completion_len[group])
        packs[-1].append(group)
        longest_prompt, longest_completion = p_len, c_len
    idle = (~forwarded).nonzero().flatten().tolist()
    if idle or not packs:
        packs.append(idle)
    offsets = torch.arange(group_size)
    return [
        (torch.tensor(pack, dtype=torch.long)[:, None] * group_size + offsets).flatten() for pack in packs
    ]


def trim(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    columns: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The batch without the columns that are padding in every row: the prompts' shared left padding, the
    completions' shared right padding (at least one completion column stays). A micro-batch then costs its own
    longest row, not the longest of the whole rollout. The tokens kept keep their positions (counted from the
    first real token), and no real token ever attended to a padding column, so the numbers do not change."""
    first, last = trim_columns(prompt_mask, completion_mask) if columns is None else columns
    return prompt_ids[:, first:], prompt_mask[:, first:], completion_ids[:, :last], completion_mask[:, :last]


def trim_columns(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> tuple[int, int]:
    """`trim`'s cut: (first prompt column with a real token, completion columns up to the last real one)."""
    real_prompt = prompt_mask.bool().any(0)  # [P]
    first = int(real_prompt.nonzero()[0]) if real_prompt.any() else 0
    real_completion = completion_mask.bool().any(0)  # [L]
    last = int(real_completion.nonzero()[-1]) + 1 if real_completion.any() else 1
    return first, last


def check_groups(prompt_ids: torch.Tensor, group_size: int) -> None:
    if len(prompt_ids) % group_size or not torch.equal(
        prompt_ids, prompt_ids[::group_size].repeat_interleave(group_size, 0)
    ):
        raise ValueError(f"rows do not come in groups of {group_size} that share a prompt")


def shared_prompt_hidden(
    model: Any,
    prompt_ids: torch.Tensor,
    completion_ids: torch.Tensor,
    attention: torch.Tensor,
    positions: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Final hidden states [N, L, H] predicting each completion token, each group's prompt forwarded once.

    The prompt's keys/values, autograd graph included, go into our own caches (`rlopt_cli/prompt_cache.py`),
    which read the same on a checkpoint replay: so this route is exact with gradient checkpointing on too, and
    keeps checkpointing's memory saving in both passes (transformers' own cache is switched off there).
    """
    prompt_len = prompt_ids.shape[1]
    first = slice(None, None, group_size)  # one row per group
    shared = SharedPrompt(model)
    decoder = model.get_decoder()
    cache_arg = cache_argument(decoder)
    with cache_kept_under_checkpointing(model):
        out = decoder(
            input_ids=prompt_ids[first],  # [N/G, P]
            attention_mask=attention[first, :prompt_len],
            position_ids=positions[first, :prompt_len],
            use_cache=False,  # we pass our cache; True would only make checkpointing warn that it turns it off
            **{cache_arg: shared.prompt_cache},  # records each layer's prompt keys/values
        )
        last = out.last_hidden_state[:, -1:]  # [N/G, 1, H]: predicts completion token 0
        hidden = [last.repeat_interleave(group_size, 0)]  # [N, 1, H]
        if completion_ids.shape[1] > 1:
            prefix = shared.completion_cache(group_size, last.requires_grad)  # [N, ...] keys/values
            rest = decoder(
                input_ids=completion_ids[:, :-1],  # [N, L-1]: each predicts the next completion token
                attention_mask=attention[:, :-1],  # [N, P+L-1]: the cached prompt and the completion so far
                position_ids=positions[:, prompt_len:-1],
                use_cache=False,
                **{cache_arg: prefix},
            )
            hidden.append(rest.last_hidden_state)  # [N, L-1, H]
    return torch.cat(hidden, dim=1)


def packed_group_hidden(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    group_size: int,
) -> torch.Tensor | None:
    """Final hidden states [N/G, 1 + G(L-1), H] of the positions that predict completion tokens (the prompt's
    last, shared by the group, then each completion's own): one forward per group over one sequence,
    its prompt then its G completions (minus each one's last token), where each completion attends to the prompt
    and to its own earlier tokens only, at the positions it had after the prompt.

    One forward instead of `shared_prompt_hidden`'s two, and no cache to repeat: fewer, larger kernels, which is
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
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    # the prompt's last position predicts every completion's token 0, then each completion's own positions
    return out.last_hidden_state[:, prompt_len - 1 :]  # [N/G, 1 + G(L-1), H]


def packed_logprobs(
    kept: torch.Tensor, completion_ids: torch.Tensor, head: Any, temperature: float, chunk_tokens: int
) -> torch.Tensor:
    """Log-probs [N, L] from each group's packed states kept [N/G, 1 + G(L-1), H] (`packed_group_hidden`).

    lm_head runs once per kept position and the token-0 logits are shared by the group's G completions, as in
    one forward with `logits_to_keep`: the same arithmetic, bit for bit, as before chunking existed, so runs on
    the embedded model reproduce. Groups go `chunk_tokens` kept positions at a time (at least one whole group),
    each chunk checkpointed when gradients are on; packed groups are short by construction
    (`grpo.pack_max_tokens`), so a chunk's logits stay small."""
    groups, kept_len, _ = kept.shape
    n, length = completion_ids.shape
    group_size = n // groups
    per_chunk = groups if chunk_tokens <= 0 else max(1, chunk_tokens // kept_len)
    needs_graph = torch.is_grad_enabled() and (kept.requires_grad or head.weight.requires_grad)
    parts = []
    for start in range(0, groups, per_chunk):
        h = kept[start : start + per_chunk]  # [g, K, H]
        ids = completion_ids[start * group_size : (start + per_chunk) * group_size]  # [g*G, L]
        if needs_graph and chunk_tokens > 0:  # backward replays this chunk's logits
            part = checkpoint(
                packed_chunk_logprobs,
                h,
                ids,
                head,
                temperature,
                use_reentrant=False,
                preserve_rng_state=False,
            )
        else:
            part = packed_chunk_logprobs(h, ids, head, temperature)
        parts.append(part)
    return torch.cat(parts)  # [N, L]


def packed_chunk_logprobs(h: torch.Tensor, ids: torch.Tensor, head: Any, temperature: float) -> torch.Tensor:
    """h [g, 1 + G(L-1), H], ids [g*G, L] -> log-probs [g*G, L] in fp32."""
    groups, n, length = h.shape[0], ids.shape[0], ids.shape[1]
    logits = head(h)  # [g, 1 + G(L-1), V]
    vocab = logits.shape[-1]
    group_size = n // groups
    token0 = logits[:, :1].expand(groups, group_size, vocab).reshape(n, 1, vocab)  # [g*G, 1, V]
    logits = torch.cat([token0, logits[:, 1:].reshape(n, length - 1, vocab)], 1).float()  # [g*G, L, V]
    if temperature != 1.0:  # score under the distribution the rollouts were sampled from
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [g*G, L]


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


def sampler_weights(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str, bound: float
) -> torch.Tensor:
    """Per-token weights [N, L] that correct the loss for sampling from the engine's numbers, not the trainer's.

    The ratio is pi_trainer / pi_sampler of each sampled token (the trainer's log-probs before the update, so
    detached), or one ratio per completion, the product over its tokens. truncate: ratios above `bound` are
    capped (truncated importance sampling); mask: tokens (completions) whose ratio exceeds `bound` weigh 0, as
    TRL's *_mask modes with no lower bound. Weights past the mask do not matter: their loss is masked."""
    live = mask.bool()  # [N, L]
    diff = (trainer_logps.detach() - sampler_logps).masked_fill(~live, 0.0)  # [N, L]
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True).expand_as(diff)  # [N, L]: each row's log-ratio on every token
    ratio = torch.exp(diff)  # [N, L]
    if mode.endswith("truncate"):
        return ratio.clamp(max=bound)
    if mode.endswith("mask"):
        return ratio.masked_fill(ratio > bound, 0.0)
    raise ValueError(f"unknown sampler correction {mode!r}")


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
