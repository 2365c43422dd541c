"""`rlopt train`: one GRPO (or SFT) run -> one run folder."""

from __future__ import annotations

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
    pin_cpu_kernels(cfg.train.cpu_isa)

    import json

    from rlopt_cli.training.loop import train as run_training

    run_dir = run_training(cfg, out, say)
    summary = json.loads((run_dir / "summary.json").read_text())
    say(
        f"{run_dir}: accuracy {summary['initial_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
        f"(best {summary['best_accuracy']:.3f}), changed {100 * summary['sparsity/bitwise_frac']:.3f}% of "
        f"parameters (bf16 bitwise), {summary['wall_time_s']:.1f} s"
    )
