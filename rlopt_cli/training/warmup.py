"""The embedded model's warm-up: a short SFT run (AdamW) from random init, so RL starts with headroom.

It is a stage of its own that the training loop runs before it loads the embedded model (loading never trains):
an ordinary rlopt run (same loop, same run folder), kept in the cache under a key made of everything
that determines it (model dims, init seed, warm-up settings, task), so every later run with that key reuses it.
Cache: $RLOPT_CACHE, default ~/.cache/rlopt.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlopt_cli.config.recipes import to_dict
from rlopt_cli.config.schema import LogConfig, OptimizerConfig, RunConfig, SFTConfig, TrainConfig
from rlopt_cli.runtime.cache import cache_dir
from rlopt_cli.training.checkpoint import resolve_checkpoint

TrainRun = Callable[[RunConfig, Path, Any], Path]
"""The training loop's `train(cfg, out_dir, say) -> run folder`, which runs the warm-up's SFT."""

# Bump when the warm-up's weights change, so stale caches are not reused. 2: the log-prob pass computes logits only
# for the completion positions (session 1), which moved the float sums; caches built before gave 0.505 eval
# accuracy, the current code 0.430 (300 steps end on the steep part of the learning curve).
WARMUP_FORMAT = 2


def warmup_config(cfg: RunConfig) -> RunConfig:
    """The SFT run that produces the warm model for `cfg`."""
    m = cfg.model
    return RunConfig(
        model=dataclasses.replace(m, warmup_steps=0),
        task=cfg.task,
        sft=SFTConfig(batch_size=m.warmup_batch_size),
        optimizer=OptimizerConfig(name="adamw", lr=m.warmup_lr),
        train=TrainConfig(
            objective="sft",
            steps=m.warmup_steps,
            seed=m.init_seed,
            eval_every=m.warmup_steps,
            checkpoint_every=m.warmup_steps,
            save_dtype=cfg.train.save_dtype,
            device=cfg.train.device,
            run_name="warmup",
            cpu_isa=cfg.train.cpu_isa,
        ),
        rollout=dataclasses.replace(cfg.rollout, backend="hf"),
        log=LogConfig(progress=cfg.log.progress),
    )


def warm_key(cfg: RunConfig) -> str:
    # Only what shapes the warm weights: not logging, rollout or probe settings, nor the device.
    full = to_dict(warmup_config(cfg))
    train = {k: v for k, v in full["train"].items() if k not in ("device", "run_name", "keep_checkpoints")}
    # Fields added later, at the value that is the old path, leave the key as it was: caches stay valid.
    if full["sft"].get("micro_batch_size") == 0:
        del full["sft"]["micro_batch_size"]
    if cfg.train.cpu_isa == "native":  # the CPU's own kernels shape the weights: one cache per kernel set
        import torch  # heavy: only here, where a run has loaded it anyway

        train["cpu_isa"] = f"native-{torch.backends.cpu.get_cpu_capability()}"
    shaping = {k: full[k] for k in ("model", "task", "sft", "optimizer")}
    blob = json.dumps({"format": WARMUP_FORMAT, **shaping, "train": train}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def needs_warm_up(cfg: RunConfig) -> bool:
    """Whether the run starts from a warm-up (an embedded model with model.warmup_steps > 0)."""
    return cfg.model.is_embedded and cfg.model.warmup_steps > 0


def warm_run_dir(cfg: RunConfig) -> Path:
    """The warm-up run's folder in the cache (it may not exist yet)."""
    return cache_dir() / "warm" / warm_key(cfg) / "warmup"


def warm_start(cfg: RunConfig, train: TrainRun, say: Any = print) -> Path | None:
    """The warm-up stage of a run: the checkpoint an embedded model starts from (trained now if the cache lacks
    it), or None where there is nothing to warm up (a model folder, or model.warmup_steps = 0)."""
    if not needs_warm_up(cfg):
        return None
    return ensure_warm_model(cfg, train, say)


def ensure_warm_model(cfg: RunConfig, train: TrainRun, say: Any = print) -> Path:
    """Path of the warm model's checkpoint, training it first with `train` (the training loop, handed in by its
    caller: the warm-up is a run of that loop) if the cache does not hold it."""
    run_dir = warm_run_dir(cfg)
    root = run_dir.parent
    if not (run_dir / "summary.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with (root / ".lock").open("w") as lock:  # parallel sweep workers wait for one warm-up
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (run_dir / "summary.json").is_file():
                say(f"warming up the embedded model: {cfg.model.warmup_steps} SFT steps (cached in {root})")
                train(warmup_config(cfg), root, say)
                summary = json.loads((run_dir / "summary.json").read_text())
                say(
                    f"warm-up done: eval accuracy {summary['final_accuracy']:.3f} "
                    f"in {summary['wall_time_s']:.1f} s"
                )
    return resolve_checkpoint(run_dir)
