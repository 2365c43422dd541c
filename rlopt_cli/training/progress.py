"""The training loop's rich progress bar: one line per run, with the latest reward, loss and eval accuracy."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rlopt_cli.config.schema import RunConfig


def progress_info(row: dict[str, float]) -> str:
    parts = [
        f"{k.split('/')[1]}={row[k]:.3f}"
        for k in ("train/reward_mean", "train/loss", "eval/accuracy")
        if k in row
    ]
    return " ".join(parts)


def progress_bar(cfg: RunConfig) -> Any:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not cfg.log.progress,
        transient=False,
    )
