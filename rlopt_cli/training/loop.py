"""The one training loop: GRPO (or SFT) on a task, writing one run folder. Read `train()` top to bottom.

Each step: pick prompts, sample G completions each, score them with the task's verifier, turn rewards into
group-normalised advantages, then `num_iterations` policy updates on the clipped surrogate (+ k3 KL when
beta > 0), clip the gradient, step the optimizer, sync the rollout engine, log; evaluate and checkpoint when due.
SFT replaces the rollout and the surrogate with the NLL of the reference solutions; everything else is shared.

Deliberate simplifications:
- one process and one device, or one run sharded over several processes with FSDP2 under torchrun
  (training/sharding.py: GRPO with hf rollouts; rank 0 writes the run folder); micro-batching gives gradient
  accumulation for big batches;
- a step is one generated batch: with num_iterations > 1 it holds that many optimizer updates;
- prompts are drawn epoch by epoch from a seeded permutation; every step's sampling has its own seeded
  generator, so a resumed run draws exactly what an uninterrupted one would;
- the learning rate is a pure function of the step (no scheduler object to checkpoint).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlopt_cli.algo import grpo, sft
from rlopt_cli.algo.optimizers import build_optimizer, state_bytes
from rlopt_cli.algo.probe import Probe, write_probe
from rlopt_cli.config.recipes import to_dict, to_toml
from rlopt_cli.config.schema import RunConfig
from rlopt_cli.models.assets import resolve_model_path
from rlopt_cli.models.loading import (
    check_attention,
    check_chat_template,
    check_model_path,
    load_policy,
    parameter_count,
    render_prompts,
    uses_chat_template,
)
from rlopt_cli.rollout import Backend, make_backend
from rlopt_cli.runtime import cpu_kernels
from rlopt_cli.runtime.atomic_files import atomic_write_json
from rlopt_cli.runtime.devices import autocast, peak_memory_bytes, resolve_device
from rlopt_cli.runtime.distributed import World
from rlopt_cli.runtime.folder_lock import FolderLock, make_folder
from rlopt_cli.runtime.kill_points import kill_point
from rlopt_cli.tasks import Example, Task, build_task
from rlopt_cli.training import sharding
from rlopt_cli.training.checkpoint import load_trainer_state, prune_checkpoints, save_checkpoint, step_dir
from rlopt_cli.training.evaluation import evaluate
from rlopt_cli.training.progress import progress_bar, progress_info
from rlopt_cli.training.reference import Reference, reference_dtype
from rlopt_cli.training.run_folder import claim_run, inspect_run, summarize, update_meta, write_meta
from rlopt_cli.training.tracking import MetricsFile, NullSink, Sink, WandbSink, read_metrics
from rlopt_cli.training.update_fraction import UpdateReference, step_norm, weights_before_step
from rlopt_cli.training.warmup import needs_warm_up, warm_run_dir, warm_start


def train(
    cfg: RunConfig, out_dir: str | Path = "results", say: Any = print, world: World | None = None
) -> Path:
    """Run (or resume, or skip if finished) one training run; returns its folder.

    Everything that can be checked is checked before the folder is touched (config, device, task files, model
    path, --out), then the folder is locked for this process and claimed; a kill at any moment after that
    resumes exactly, from the last complete checkpoint (step 0 included). `world`: this process's rank of a
    sharded run; None reads it from torchrun's environment (one process when there is none)."""
    world = World.from_env() if world is None else world
    if not world.lead:
        say = quiet
    model_path = resolve_model_path(cfg.model.name_or_path, say)
    if model_path != cfg.model.name_or_path:  # the folder is what the run reads and records
        cfg = replace(cfg, model=replace(cfg.model, name_or_path=model_path))
    run_dir = Path(out_dir) / cfg.run_name
    if inspect_run(run_dir, cfg).finished:
        say(f"{run_dir} already finished ({cfg.train.steps} steps); nothing to do")
        return run_dir
    sharding.check_sharded(cfg, world.size, world.local_size)
    device = world.device(resolve_device(cfg.train.device))
    check_attention(cfg.model.attn_implementation, device)
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg.task)
    if not cfg.model.is_embedded:
        check_model_path(cfg.model.name_or_path)
        check_chat_template(cfg.model.name_or_path, cfg.task.chat_template)
    world.init(device)
    if world.lead:
        make_folder(run_dir)
    try:
        with FolderLock(run_dir, "run") if world.lead else nullcontext():  # rank 0 holds it for the run
            # again, under the lock: another process may have finished it
            if inspect_run(run_dir, cfg).finished:
                say(f"{run_dir} already finished ({cfg.train.steps} steps); nothing to do")
            else:
                run_training(cfg, run_dir, device, task, say, world)
    finally:
        world.close()
    return run_dir


def run_training(
    cfg: RunConfig, run_dir: Path, device: torch.device, task: Task, say: Any, world: World = World()
) -> None:
    """The loop, in a locked run folder."""
    kernels, note = cpu_kernels.check(cfg.train.cpu_isa)
    if note and device.type == "cpu":
        say(note)
    # The embedded model's warm-up is a stage of its own: an SFT run of this same loop, cached, before loading.
    # A sharded run's rank 0 runs it in one process, then the other ranks find it in the cache.
    warm_up = partial(train, world=World.single())
    warm = warm_start(cfg, warm_up, say) if world.lead else None
    world.barrier()
    if needs_warm_up(cfg):  # ranks on other machines read rank 0's cache: it must be on a shared filesystem
        sharding.check_shared(world, warm_run_dir(cfg) / "summary.json", "the warm-up cache ($RLOPT_CACHE)")
    if not world.lead:
        warm = warm_start(cfg, warm_up, say)
    model, tokenizer = load_policy(cfg, device, warm)
    # only now: a model that fails to load claims nothing; rank 0 claims, the others read what it claimed
    state = claim_run(run_dir, cfg) if world.lead else None
    world.barrier()
    sharding.check_shared(world, run_dir / "config.toml", "the run folder (--out)")
    state = state or inspect_run(run_dir, cfg)
    kill_point("startup")
    ref_model = None
    if cfg.train.objective == "grpo" and cfg.grpo.beta > 0:  # a frozen copy of the whole starting policy
        ref_model = Reference(model, reference_dtype(cfg.grpo.ref_dtype, device), cfg.grpo.ref_offload)
    if world.sharded:  # the reference in the same units: its no-grad pass all-gathers as the policy's does
        model = sharding.shard_model(model, device)
        if ref_model is not None:
            ref_model.model = sharding.shard_model(ref_model.model, device)
    model.train()
    opt = cfg.optimizer
    optimizer = build_optimizer(model.parameters(), opt.name, opt.lr, opt.weight_decay, opt.extra_args)
    backend = make_backend(cfg.rollout.backend, model, tokenizer, cfg)
    save = save_checkpoint
    if world.sharded:  # the sampler's ranks vote on when every row has finished; checkpoints go through DCP
        templated = uses_chat_template(tokenizer, cfg.task.chat_template)
        backend = sharding.ShardedHFBackend(model, tokenizer, templated, agree=world.all_true)
        save = partial(sharding.save_checkpoint, world=world)
    save_dtype = getattr(torch, cfg.train.save_dtype)
    config_toml = to_toml(cfg)

    if state.resume_from is None:  # step 0: the starting weights are the sparsity reference
        save(run_dir, 0, model, tokenizer, None, config_toml, cfg.train.save_dtype)
        start_step = 0
    else:  # from step 0 this restores the starting weights and RNG, and the optimizer starts fresh as it did
        load = load_trainer_state
        if world.sharded or sharding.is_dcp(state.resume_from):  # DCP reshards to any number of processes
            load = sharding.load_trainer_state
        start_step = load(state.resume_from, model, optimizer)
        backend.sync_weights(model)
        say(f"resuming {run_dir.name} from step {start_step}")
    reference = UpdateReference.from_file(step_dir(run_dir, 0), model, save_dtype)
    weights = sharding.Gathered(model) if world.sharded else model  # what the sparsity counts compare
    # rows after the resumed checkpoint are redone; from step 0 that includes the initial eval
    metrics_file: Any = sharding.NullMetrics()
    if world.lead:
        metrics_file = MetricsFile(run_dir, start_step if start_step > 0 else -1)
    elapsed = (read_metrics(run_dir) or [{}])[-1].get("time/elapsed_s", 0.0)
    world.barrier()  # rank 0 has trimmed metrics.jsonl to the resumed step
    meta: dict[str, Any] = {}
    if world.lead:
        meta = write_meta(
            run_dir,
            cfg,
            str(device),
            n_params=parameter_count(model),
            torch_dtype="float32",
            save_dtype=cfg.train.save_dtype,
            kernels=kernels,
            **({"world_size": world.size} if world.sharded else {}),
        )
    sink: Sink = NullSink()
    if cfg.log.wandb and world.lead:
        sink = WandbSink(
            run_dir,
            cfg.run_name,
            to_dict(cfg),
            cfg.log.wandb_project,
            cfg.log.wandb_group,
            meta.get("wandb_id"),
            say,
        )
        update_meta(run_dir, wandb_id=sink.id)

    def run_eval() -> dict[str, float]:
        if world.sharded:
            accuracy = sharding.evaluate_split(backend, tokenizer, task, cfg, world)
        else:
            accuracy = evaluate(backend, tokenizer, task, cfg)["accuracy"]
        return {"eval/accuracy": accuracy, **reference.fractions(weights)}

    if start_step == 0:
        initial = run_eval()
        metrics_file.log(initial, 0)
        sink.log(initial, 0)
        kill_point("step-0")
    with progress_bar(cfg if world.lead else replace(cfg, log=replace(cfg.log, progress=False))) as progress:
        bar = progress.add_task(cfg.run_name, total=cfg.train.steps, completed=start_step, info="")
        for step in range(start_step + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            set_lr(optimizer, lr_at(step, cfg))
            if cfg.train.objective == "grpo":
                row = grpo_step(model, ref_model, optimizer, backend, tokenizer, task, cfg, step, world=world)
            else:
                row = sft_step(model, optimizer, tokenizer, task, cfg, step)
            row["time/step_s"] = time.perf_counter() - t0
            if (probed := row.pop("probe", None)) is not None:
                row |= write_probe(run_dir, step, probed)
            row |= optimizer_metrics(optimizer)
            if due(step, cfg.train.eval_every, cfg.train.steps):
                t_eval = time.perf_counter()
                row |= run_eval()
                row["time/eval_s"] = time.perf_counter() - t_eval
            elapsed += time.perf_counter() - t0
            row["time/elapsed_s"] = elapsed
            row["mem/peak_bytes"] = peak_memory_bytes(device)
            metrics_file.log(row, step)
            sink.log(row, step)
            kill_point(f"step-{step}")
            if due(step, cfg.train.checkpoint_every, cfg.train.steps):
                save(run_dir, step, model, tokenizer, optimizer, config_toml, cfg.train.save_dtype)
                if world.lead:
                    prune_checkpoints(run_dir, cfg.train.keep_checkpoints)  # only after the new one is whole
            progress.update(bar, completed=step, info=progress_info(row))

    metrics_file.close()
    ulp = reference.ulp_ratios(weights)
    if world.lead:
        summary = summarize(run_dir, cfg, parameter_count(model), optimizer, ulp)
        sink.finish(summary)
        update_meta(run_dir, finished=True)
        atomic_write_json(run_dir / "summary.json", summary)
    world.barrier()


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
                    gaps.append((sampling - rollout.sampler_logps[rows]).abs()[mask[rows].bool()])
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
    if gaps and (gap := torch.cat(gaps)).numel():  # over the rows that carried a gradient
        measured |= {
            "train/sampler_logp_gap": float(gap.mean()),
            "train/sampler_logp_gap_max": float(gap.max()),
        }
    # sums over every rank's micro-batches (one process: these very sums)
    loss_sum, kl_sum, clip_sum, micro_count = world.sum([sum(losses), sum(kls), sum(clips), len(kls)])
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
        "train/skipped_frac": 1.0 - float(carries.float().mean()),
        "train/grad_norm": grad_norms[0],
        "train/clip_active": float(grad_norms[0] > cfg.optimizer.max_grad_norm > 0),
        "train/nonfinite_skipped": float(sum(not math.isfinite(n) for n in grad_norms)),
        "time/gen_s": gen_s,
        "probe": probed,
    }


def sft_step(
    model: Any, optimizer: Any, tokenizer: Any, task: Task, cfg: RunConfig, step: int
) -> dict[str, Any]:
    examples = pick_examples(task.train, cfg.sft.batch_size, step, cfg.train.seed)
    prompts = render_prompts(
        tokenizer, [e.prompt for e in examples], cfg.task.chat_template, cfg.task.chat_template_kwargs
    )
    device = next(model.parameters()).device
    templated = uses_chat_template(tokenizer, cfg.task.chat_template)
    batch = sft.sft_batch(tokenizer, prompts, examples, device, templated)
    optimizer.zero_grad(set_to_none=True)
    loss = sft.sft_backward(model, batch, cfg.sft.micro_batch_size, cfg.train.precision)
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


# ---------------------------------------------------------------------------------------------------------------
# small helpers the loop reads through


def quiet(message: str) -> None:
    """`say` on ranks other than 0."""


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


def lr_at(step: int, cfg: RunConfig) -> float:
    opt = cfg.optimizer
    if step <= opt.warmup_steps:
        return opt.lr * step / opt.warmup_steps
    if opt.schedule == "cosine":
        progress = (step - opt.warmup_steps) / max(1, cfg.train.steps - opt.warmup_steps)
        return opt.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return opt.lr


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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


def optimizer_metrics(optimizer: Any) -> dict[str, float]:
    held = state_bytes(optimizer)  # sharded: DTensor state counts at its global size, the whole run's
    row = {"optim/lr": optimizer.param_groups[0]["lr"], "optim/state_bytes": float(held.pop("total"))}
    row |= {f"optim/state_bytes/{k}": float(v) for k, v in held.items()}
    return row


def due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)
