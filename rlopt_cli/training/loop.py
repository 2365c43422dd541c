"""The one training loop: GRPO (or SFT) on a task, writing one run folder. Read `train()` top to bottom.

Each step: pick prompts, sample G completions each, score them with the task's verifier, turn rewards into
group-normalised advantages, then `num_iterations` policy updates on the clipped surrogate (+ k3 KL when
beta > 0), clip the gradient, step the optimizer, sync the rollout engine, log; evaluate and checkpoint when due.
SFT replaces the rollout and the surrogate with the NLL of the reference solutions; everything else is shared.
The two steps themselves are in training/steps.py; this module is the run around them.

Deliberate simplifications:
- one process and one device, or one run sharded over several processes with FSDP2 under torchrun
  (training/sharding.py: GRPO or SFT; hf rollouts or, for GRPO, a vLLM engine per rank; rank 0 writes the run
  folder); micro-batching gives gradient accumulation for big batches;
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

from rlopt_cli.algo.optimizers import build_optimizer, state_bytes
from rlopt_cli.algo.probe import write_probe
from rlopt_cli.config.recipes import to_dict, to_toml
from rlopt_cli.config.schema import RunConfig
from rlopt_cli.models.assets import resolve_model_path
from rlopt_cli.models.loading import (
    check_attention,
    check_chat_template,
    check_model_path,
    load_policy,
    parameter_count,
    uses_chat_template,
)
from rlopt_cli.rollout import make_backend
from rlopt_cli.runtime import cpu_kernels
from rlopt_cli.runtime.atomic_files import atomic_write_json
from rlopt_cli.runtime.devices import peak_memory_bytes, resolve_device
from rlopt_cli.runtime.distributed import World
from rlopt_cli.runtime.folder_lock import FolderLock, make_folder
from rlopt_cli.runtime.kill_points import kill_point
from rlopt_cli.tasks import Task, build_task
from rlopt_cli.training import sharded_checkpoint, sharding
from rlopt_cli.training.checkpoint import load_trainer_state, prune_checkpoints, save_checkpoint, step_dir
from rlopt_cli.training.evaluation import evaluate
from rlopt_cli.training.progress import progress_bar, progress_info
from rlopt_cli.training.reference import Reference, reference_dtype
from rlopt_cli.training.run_folder import claim_run, inspect_run, summarize, update_meta, write_meta
from rlopt_cli.training.steps import grpo_step, sft_step
from rlopt_cli.training.tracking import MetricsFile, NullSink, Sink, WandbSink, read_metrics
from rlopt_cli.training.trainer_state import is_dcp
from rlopt_cli.training.update_fraction import UpdateReference
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
    # sharded, a vLLM engine per rank starts from the gathered weights (after sharding: the whole model and the
    # engine's share of the device are never held at once); each generates alone, `sync_weights` gathers again
    backend = make_backend(cfg.rollout.backend, model, tokenizer, cfg)
    save = save_checkpoint
    if world.sharded:  # checkpoints go through DCP
        save = partial(sharded_checkpoint.save_checkpoint, world=world)
        if cfg.rollout.backend == "hf":  # the sampler's ranks vote on when every row has finished
            templated = uses_chat_template(tokenizer, cfg.task.chat_template)
            backend = sharding.ShardedHFBackend(model, tokenizer, templated, agree=world.all_true)
    save_dtype = getattr(torch, cfg.train.save_dtype)
    config_toml = to_toml(cfg)

    if state.resume_from is None:  # step 0: the starting weights are the sparsity reference
        save(run_dir, 0, model, tokenizer, None, config_toml, cfg.train.save_dtype)
        start_step = 0
    else:  # from step 0 this restores the starting weights and RNG, and the optimizer starts fresh as it did
        load = load_trainer_state
        if world.sharded or is_dcp(state.resume_from):  # DCP reshards to any number of processes
            load = sharded_checkpoint.load_trainer_state
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
                row = sft_step(model, optimizer, tokenizer, task, cfg, step, world)
            row["time/step_s"] = time.perf_counter() - t0
            if (probed := row.pop("probe", None)) is not None:
                row |= write_probe(run_dir, step, probed)
            row |= optimizer_metrics(optimizer, world)
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
    backend.close()  # a vLLM engine goes before the process group does


# ---------------------------------------------------------------------------------------------------------------
# small helpers the loop reads through


def quiet(message: str) -> None:
    """`say` on ranks other than 0."""


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


def optimizer_metrics(optimizer: Any, world: World = World()) -> dict[str, float]:
    held = state_bytes(optimizer)  # sharded: DTensor state counts at its global size, the whole run's
    row = {"optim/lr": optimizer.param_groups[0]["lr"], "optim/state_bytes": float(held.pop("total"))}
    row |= {f"optim/state_bytes/{k}": float(v) for k, v in held.items()}
    if world.sharded:  # what one device holds: the largest rank's shards (dim-0 shards may be uneven)
        row["optim/state_bytes_rank_max"] = float(world.max([state_bytes(optimizer, local=True)["total"]])[0])
    return row


def due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)
