"""`rlopt eval CKPT`: greedy accuracy (and pass@k) of a checkpoint or model folder on a task's eval split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from rlopt_cli.commands._common import friendly_errors, pin_cpu_kernels


@friendly_errors
def eval_checkpoint(
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint folder, run folder (its last checkpoint) or model folder."
    ),
    step: int | None = typer.Option(None, "--step", help="With a run folder: the checkpoint at this step."),
    samples: int = typer.Option(0, "--samples", "-k", help="Also sample k completions per problem: pass@k."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature for --samples."),
    limit: int = typer.Option(0, "--limit", help="Evaluate only the first N problems (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled completions."),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override the task or rollout, e.g. task.digits=3."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Evaluate a model on its task's eval split (the task comes from the checkpoint's rlopt.toml)."""
    from rlopt_cli.config.recipes import from_dict, parse_override, read_toml, set_dotted
    from rlopt_cli.errors import RloptError
    from rlopt_cli.training.checkpoint import resolve_checkpoint

    if samples < 0 or limit < 0:
        raise RloptError("--samples and --limit must be >= 0")
    if samples and not (0 < temperature < float("inf")):  # `not 0 < nan` is true: nan is refused too
        raise RloptError(f"--temperature {temperature} must be a finite number > 0 when sampling (--samples)")
    ckpt = resolve_checkpoint(checkpoint, step)
    data = read_toml(ckpt / "rlopt.toml") if (ckpt / "rlopt.toml").is_file() else {}
    # the run's attention kernel (model.attn_implementation); the weights are the checkpoint's
    attention = data.get("model", {}).get("attn_implementation")
    data = {k: v for k, v in data.items() if k in ("task", "rollout", "grpo", "train")}
    if attention:
        data["model"] = {"attn_implementation": attention}
    for item in overrides:
        set_dotted(data, *parse_override(item))
    cfg = from_dict(data)
    pin_cpu_kernels(cfg.train.cpu_isa)

    import torch

    from rlopt_cli.models.loading import load_pretrained
    from rlopt_cli.rollout import make_backend
    from rlopt_cli.runtime.devices import resolve_device
    from rlopt_cli.tasks import build_task
    from rlopt_cli.training.evaluation import evaluate

    device = resolve_device(cfg.train.device)
    model, tokenizer = load_pretrained(ckpt, device, cfg.model.attn_implementation)
    model.eval()
    task = build_task(cfg.task)
    backend = make_backend(cfg.rollout.backend, model, tokenizer, cfg)
    with torch.no_grad():
        result = evaluate(
            backend,
            tokenizer,
            task,
            cfg,
            samples=samples,
            temperature=temperature,
            seed=seed,
            examples=task.eval[:limit] if limit else None,
        )
    report: dict[str, Any] = {**result, "checkpoint": str(ckpt), "task": cfg.task.name}
    if as_json:
        typer.echo(json.dumps(report))
        return
    from rich.table import Table

    from rlopt_cli.commands._common import console

    table = Table(title=f"{ckpt} on {cfg.task.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console().print(table)
