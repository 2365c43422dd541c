"""`rlopt train`: one GRPO (or SFT) run -> one run folder; `--nproc N` shards it over N processes (torchrun)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from rlopt_cli.commands._common import friendly_errors, pin_cpu_kernels, say


@friendly_errors
def train(
    recipe: Path | None = typer.Option(None, "--recipe", "-r", help="TOML recipe (see recipes/)."),
    optimizer: str | None = typer.Option(None, "--optimizer", help="sgd | adamw | rmsprop."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of prompts and sampling."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps."),
    objective: str | None = typer.Option(None, "--objective", help="grpo | sft."),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Dotted override, e.g. --set grpo.beta=0.04."
    ),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Folder that holds the run folders."),
    wandb: bool | None = typer.Option(None, "--wandb/--no-wandb", help="Log to W&B (offline without a key)."),
    nproc: int = typer.Option(
        1,
        "--nproc",
        help="Processes to shard the run over (FSDP2 under torchrun; GRPO needs rollout.seed_scope=prompt).",
    ),
) -> None:
    """Train one run (resumes if its folder holds an unfinished run with the same config)."""
    from rlopt_cli.config.recipes import load_config

    flags = {
        "optimizer.name": optimizer,
        "optimizer.lr": lr,
        "train.seed": seed,
        "train.steps": steps,
        "train.objective": objective,
        "log.wandb": wandb,
    }
    cfg = load_config(recipe, overrides, flags)
    pin_cpu_kernels(cfg.train.cpu_isa)  # before torch loads, here and (inherited) in the ranks
    if nproc != 1:  # this process launches the ranks, which run this same command without --nproc
        from rlopt_cli.errors import RloptError
        from rlopt_cli.runtime.distributed import launch
        from rlopt_cli.training.sharding import check_sharded

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RloptError("--nproc launches torchrun itself; under torchrun, drop --nproc")
        check_sharded(cfg, nproc)  # every one-line error before any process starts
        # What the ranks would otherwise all do at once: fetch an asset model, warm up the embedded model.
        from rlopt_cli.models.assets import resolve_model_path
        from rlopt_cli.training.loop import train as run_training
        from rlopt_cli.training.warmup import warm_start

        resolve_model_path(cfg.model.name_or_path, say)
        warm_start(cfg, run_training, say)
        values = [("--optimizer", optimizer), ("--lr", lr), ("--seed", seed), ("--steps", steps)]
        argv = ["train", *(["--recipe", str(recipe)] if recipe else [])]
        argv += [
            a for flag, v in [*values, ("--objective", objective)] if v is not None for a in (flag, str(v))
        ]
        argv += [a for o in overrides for a in ("--set", o)] + ["--out", str(out)]
        argv += [] if wandb is None else ["--wandb" if wandb else "--no-wandb"]
        code = launch(nproc, argv)
        if code:
            raise RloptError(
                f"a rank of the {nproc}-process run failed (torchrun exit {code}); see its error above"
            )
        return

    import json

    from rlopt_cli.training.loop import train as run_training

    run_dir = run_training(cfg, out, say)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 speaks for a sharded run
        return
    summary = json.loads((run_dir / "summary.json").read_text())
    say(
        f"{run_dir}: accuracy {summary['initial_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
        f"(best {summary['best_accuracy']:.3f}), changed {100 * summary['sparsity/bitwise_frac']:.3f}% of "
        f"parameters (bf16 bitwise), {summary['wall_time_s']:.1f} s"
    )
