"""One training step of each objective: `grpo_step` (sample, score, group advantages, `num_iterations` updates
on the clipped surrogate) and `sft_step` (the NLL of the reference solutions), with what both read: which
examples a step takes, its seeds, and the clip-then-step of the optimizer. `loop.py` calls one per step and
logs what it returns; a sharded run (`world`) takes this rank's share of the step and all-reduces every number
that spans the batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from rlopt_cli.algo import grpo, sft
from rlopt_cli.algo.probe import Probe
from rlopt_cli.config.schema import RunConfig
from rlopt_cli.models.loading import render_prompts, uses_chat_template
from rlopt_cli.rollout import Backend
from rlopt_cli.runtime.devices import autocast
from rlopt_cli.runtime.distributed import World
from rlopt_cli.tasks import Example, Task
from rlopt_cli.training import sharding
from rlopt_cli.training.reference import Reference
from rlopt_cli.training.update_fraction import step_norm, weights_before_step


def grpo_step(
    model: Any,
    ref_model: Reference | None,
    optimizer: Any,
    backend: Backend,
    tokenizer: Any,
    task: Task,
    cfg: RunConfig,
    step: int,
    world: World = World(),
) -> dict[str, Any]:
    """One step. Sharded (`world`), this rank samples and trains on its contiguous share of the step's prompts,
    and every number that spans the batch (advantages under batch scaling, the loss normalisers, the logged
    metrics) is taken over the gathered global batch, so the step is the one-process step."""
    g = cfg.grpo
    examples = pick_examples(task.train, g.prompts_per_step, step, cfg.train.seed)
    share = world.share(len(examples))  # this rank's prompts: all of them in one process
    examples = examples[share]
    prompts = render_prompts(
        tokenizer, [e.prompt for e in examples], cfg.task.chat_template, cfg.task.chat_template_kwargs
    )
    seeds: dict[str, Any] = {}
    if cfg.rollout.seed_scope == "prompt":  # each prompt's own draws, wherever it is sampled
        seeds["prompt_seeds"] = [prompt_seed(cfg.train.seed, step, i) for i in range(share.start, share.stop)]
    t_gen = time.perf_counter()
    rollout = backend.generate(
        prompts,
        g.num_generations,
        g.max_completion_length,
        g.temperature,
        seed=step_seed(cfg.train.seed, step),
        **seeds,
    )
    gen_s = time.perf_counter() - t_gen
    repeated = [e for e in examples for _ in range(g.num_generations)]
    device = rollout.completion_ids.device
    own_rows = slice(share.start * g.num_generations, share.stop * g.num_generations)  # this rank's rows
    local_rewards = torch.tensor(task.rewards(rollout.texts, repeated), dtype=torch.float32)  # [b]
    rewards = world.gather(local_rewards)  # [B]
    advantages = grpo.group_advantages(rewards, g.num_generations, g.scale_rewards)  # [B]
    advantages = advantages[own_rows].to(device)  # [b]
    if world.sharded:  # every rank forwards prompts of one width, so the log-prob passes agree on shapes
        rollout = sharding.pad_prompts(rollout, world, tokenizer.pad_token_id)
    mask = rollout.completion_mask  # [b, L]
    if g.mask_truncated_completions:
        mask = mask * (~rollout.truncated).unsqueeze(1)
    num_tokens = int(world.sum([float(mask.sum())])[0])
    # Rows that carry a gradient. With beta = 0, a group whose completions all scored alike has zero advantage:
    # its loss and gradient are exactly zero, so its forward/backward is skipped (its tokens still count in the
    # loss normalisers). Groups go whole, so the prompt forward is still shared within each group.
    carries = advantages.view(-1, g.num_generations).ne(0).any(1).repeat_interleave(g.num_generations)  # [b]
    if g.beta > 0 or not g.skip_zero_advantage:
        carries = torch.ones_like(carries)
    carried = carries.clone()  # [b] the same rows on any number of processes (a rank may forward more, below)
    # Fixed-size micro-batches, or whole groups packed under a token budget (grpo.micro_batch_tokens; one
    # process only, so every rank's micro-batches are the same consecutive row ranges).
    micro_rows = grpo.micro_batch_rows(
        rollout.prompt_mask, mask, carries, g.num_generations, g.micro_batch_size, g.micro_batch_tokens
    )
    micro_rows = [rows.to(device) for rows in micro_rows]  # [b_i] row indices
    if world.sharded and not (g.beta > 0 or not g.skip_zero_advantage):
        # FSDP's forwards are collective: ranks skip a micro-batch together, or forward it whole
        for rows in micro_rows:
            if not world.all_true(not bool(carries[rows].any())):
                carries[rows] = True
    batches = [rows[carries[rows]] for rows in micro_rows]  # [b] the rows that are forwarded
    # Whole groups per micro-batch: each prompt is forwarded once for its G completions (grpo.token_logprobs).
    whole_groups = all(len(rows) % g.num_generations == 0 for rows in micro_rows)
    group_size = g.num_generations if g.share_prompt_forward and whole_groups else 1
    columns = None
    if world.sharded:  # each micro-batch trimmed to columns all ranks agree on: same shapes, same route
        columns = [
            sharding.agreed_columns(rollout.prompt_mask[rows], mask[rows], world) for rows in micro_rows
        ]

    def logps_of(m: Any, rows: torch.Tensor, i: int) -> torch.Tensor:
        with autocast(cfg.train.precision, device):
            return grpo.token_logprobs(
                m,
                rollout.prompt_ids[rows],
                rollout.prompt_mask[rows],
                rollout.completion_ids[rows],
                mask[rows],
                g.temperature,
                group_size,
                g.pack_max_tokens,
                g.logprob_chunk_tokens,
                None if columns is None else columns[i],
            )  # [b, L]

    def frozen_logps(m: Any) -> list[torch.Tensor]:
        with torch.no_grad():
            return [logps_of(m, rows, i) if len(rows) else torch.empty(0) for i, rows in enumerate(batches)]

    # The sampling policy's log-probs are needed only when it differs from the current one.
    old_logps = frozen_logps(model) if g.num_iterations > 1 else None
    ref_logps = None
    if ref_model is not None:
        with ref_model.on_device() as ref:
            ref_logps = frozen_logps(ref)

    losses: list[float] = []
    kls: list[float] = []
    clips: list[float] = []
    gaps: list[
        torch.Tensor
    ] = []  # |trainer - sampler| log-prob of each sampled token (engines that report it)
    grad_norms: list[float] = []
    probed = None
    before = weights_before_step(model) if cfg.log.update_norm else None
    for iteration in range(g.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for i, rows in enumerate(batches):
            micro_tokens = int(mask[micro_rows[i]].sum())
            if len(rows) == 0:  # no row of this micro-batch carries a gradient: its loss is exactly 0
                for metric in (losses, kls, clips):
                    metric.append(0.0)
                continue
            logps = logps_of(model, rows, i)
            sampling = logps.detach() if old_logps is None else old_logps[i]  # [b, L] pi_old, the trainer's
            token = grpo.per_token_loss(
                logps,
                sampling,
                None if ref_logps is None else ref_logps[i],
                advantages[rows],
                g.epsilon,
                g.clip_high,
                g.beta,
            )
            token_loss = token.loss  # [b, L]
            if rollout.sampler_logps is not None:
                if iteration == 0:
                    kept = mask[rows].bool() & carried[rows].unsqueeze(1)  # [b_i, L]
                    gaps.append((sampling - rollout.sampler_logps[rows]).abs()[kept])
                if g.sampler_correction != "none":
                    token_loss = token_loss * grpo.sampler_weights(
                        sampling,
                        rollout.sampler_logps[rows],
                        mask[rows],
                        g.sampler_correction,
                        g.sampler_correction_max,
                    )
            loss = grpo.aggregate(
                token_loss,
                mask[rows],
                g.loss_type,
                num_sequences=g.batch_size,
                num_tokens=num_tokens,
                max_completion_length=g.max_completion_length,
                num_micro_batches=len(micro_rows) * world.size,
                micro_batch_tokens=micro_tokens,
            )
            loss.backward()
            losses.append(loss.item())
            kls.append(grpo.masked_mean(token.kl.detach(), mask[rows]))  # rows are skipped only when kl is 0
            clips.append(float((token.clipped & mask[rows].bool()).sum()) / max(1, micro_tokens))
        if not carries.any():  # as a full backward would: the optimizer steps on zero gradients
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        probe_now = iteration == 0 and step in cfg.probe.steps
        norm, stats = clip_and_step(model, optimizer, cfg.optimizer.max_grad_norm, probe_now)
        optimizer.zero_grad(set_to_none=True)  # now: else the gradients sit on the device through the rollout
        grad_norms.append(norm)
        probed = probed or stats
    backend.sync_weights(model)

    grouped = rewards.view(-1, g.num_generations)  # [B/G, G]
    measured = {} if before is None else {"train/update_norm": step_norm(model, before)}
    if rollout.sampler_logps is not None:  # over the rows that carried a gradient, on every rank
        measured |= sharding.gap_metrics(gaps, world)
    # sums over every rank's micro-batches (one process: these very sums)
    loss_sum, kl_sum, clip_sum, micro_count = world.sum([sum(losses), sum(kls), sum(clips), len(kls)])
    (forwarded,) = world.sum([float(carries.sum())])
    lengths = world.gather(rollout.completion_mask.sum(1))  # [B]
    truncated = world.gather(rollout.truncated.to(torch.uint8)).bool()  # [B]
    return measured | {
        "train/reward_mean": float(rewards.mean()),
        "train/reward_std": float(rewards.std()),
        "train/frac_reward_zero_std": float((grouped.std(dim=1) == 0).float().mean()),
        "train/loss": loss_sum / g.num_iterations,
        "train/kl": kl_sum / micro_count,
        "train/clip_frac": clip_sum / micro_count,
        "train/completion_len": float(lengths.float().mean()),
        "train/truncated_frac": float(truncated.float().mean()),
        "train/skipped_frac": 1.0 - forwarded / g.batch_size,
        "train/grad_norm": grad_norms[0],
        "train/clip_active": float(grad_norms[0] > cfg.optimizer.max_grad_norm > 0),
        "train/nonfinite_skipped": float(sum(not math.isfinite(n) for n in grad_norms)),
        "time/gen_s": gen_s,
        "probe": probed,
    }


def sft_step(
    model: Any, optimizer: Any, tokenizer: Any, task: Task, cfg: RunConfig, step: int, world: World = World()
) -> dict[str, Any]:
    """One step. Sharded (`world`), this rank trains on its contiguous share of the step's examples, each rank's
    summed NLL is divided by the whole step's token count (summed over ranks), and FSDP sums the gradients: the
    one-process loss and gradient, up to float summation order."""
    examples = pick_examples(task.train, cfg.sft.batch_size, step, cfg.train.seed)
    examples = examples[world.share(len(examples))]  # this rank's examples: all of them in one process
    prompts = render_prompts(
        tokenizer, [e.prompt for e in examples], cfg.task.chat_template, cfg.task.chat_template_kwargs
    )
    device = next(model.parameters()).device
    templated = uses_chat_template(tokenizer, cfg.task.chat_template)
    batch = sft.sft_batch(tokenizer, prompts, examples, device, templated)
    num_tokens = None  # one process: the batch's own count, the loss is its mean
    if world.sharded:
        num_tokens = int(world.sum([float(batch.completion_mask.sum())])[0])
    optimizer.zero_grad(set_to_none=True)
    loss = sft.sft_backward(model, batch, cfg.sft.micro_batch_size, cfg.train.precision, num_tokens)
    loss = world.sum([loss])[0]  # every rank's share of the global loss
    before = weights_before_step(model) if cfg.log.update_norm else None
    grad_norm, probed = clip_and_step(model, optimizer, cfg.optimizer.max_grad_norm, step in cfg.probe.steps)
    optimizer.zero_grad(set_to_none=True)
    measured = {} if before is None else {"train/update_norm": step_norm(model, before)}
    return measured | {
        "probe": probed,
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/clip_active": float(grad_norm > cfg.optimizer.max_grad_norm > 0),
        "train/nonfinite_skipped": float(not math.isfinite(grad_norm)),
    }


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def prompt_seed(seed: int, step: int, prompt: int) -> int:
    """Seed of the draws of the step's `prompt`-th prompt (its G samples are rows of one draw)."""
    return step_seed(seed, step) * 1_000_003 + prompt


def pick_examples(pool: Any, count: int, step: int, seed: int) -> list[Example]:
    """The step's examples: consecutive slices of one seeded permutation per epoch of the pool."""
    n = len(pool)
    first = (step - 1) * count
    picked: list[Example] = []
    for position in range(first, first + count):
        epoch, offset = divmod(position, n)
        if offset == 0 or not picked:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        picked.append(pool[perm[offset]])
    return picked


def clip_and_step(model: Any, optimizer: Any, max_norm: float, probe: bool = False) -> tuple[float, Any]:
    """Clip the global gradient norm (when max_norm > 0) and step, unless the norm is NaN/Inf. Returns the norm
    before clipping, and the probe's statistics when `probe` (it reads the clipped gradient and the moments
    around the step)."""
    norm = sharding.clip_grad_norm(model, max_norm if max_norm > 0 else math.inf)  # DTensor grads too
    if not math.isfinite(float(norm)):  # NaN/Inf would poison the weights and AdamW's moments: skip, as TRL
        return float(norm), None
    snapshot = Probe(model, optimizer) if probe else None
    optimizer.step()
    return float(norm), snapshot.after_step() if snapshot else None
