"""`rlopt demo`: the embedded default end to end: warm up, GRPO with SGD and with AdamW, compare.

Both runs start from the same warm model and differ only in the optimizer and its learning rate, each set to a
value measured to work at this size (README, "Choosing the demo's learning rates"). The table is read back
from the run folders' summary.json, as any report would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from rlopt_cli.commands._common import console, friendly_errors, pin_cpu_kernels, say

SGD_LR = 0.003
ADAMW_LR = 3e-5


@friendly_errors
def demo(
    steps: int = typer.Option(150, "--steps", help="GRPO steps per optimizer."),
    sgd_lr: float = typer.Option(SGD_LR, "--sgd-lr", help="SGD learning rate."),
    adamw_lr: float = typer.Option(ADAMW_LR, "--adamw-lr", help="AdamW learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of both runs."),
    out: Path = typer.Option(Path("results/demo"), "--out", "-o", help="Folder for the two run folders."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Dotted override applied to both runs."),
) -> None:
    """GRPO on the embedded task with SGD and AdamW from one warm model; prints the comparison."""
    from rlopt_cli.config.recipes import load_config

    started = time.perf_counter()
    configs = [
        load_config(
            None,
            overrides,
            {"optimizer.name": name, "optimizer.lr": lr, "train.steps": steps, "train.seed": seed},
        )
        for name, lr in (("sgd", sgd_lr), ("adamw", adamw_lr))
    ]
    pin_cpu_kernels(configs[0].train.cpu_isa)  # --set applies to both runs: one setting

    from rlopt_cli.training.loop import train

    runs = []
    for cfg in configs:
        run_dir = train(cfg, out, say)
        runs.append(json.loads((run_dir / "summary.json").read_text()))
    console().print(comparison_table(runs))
    say(f"demo wall time {time.perf_counter() - started:.0f} s; run folders in {out}/")


def comparison_table(summaries: list[dict]) -> object:
    from rich.table import Table

    table = Table(title="GRPO on the embedded task: SGD vs AdamW from the same warm model")
    for col in (
        "optimizer",
        "lr",
        "eval acc before",
        "eval acc after",
        "best",
        "optimizer state",
        "params changed (bf16)",
        "changed |Δ|>1e-5",
        "wall time",
    ):
        table.add_column(col, justify="right")
    for s in summaries:
        table.add_row(
            s["optimizer"],
            f"{s['lr']:g}",
            f"{s['initial_accuracy']:.3f}",
            f"{s['final_accuracy']:.3f}",
            f"{s['best_accuracy']:.3f}",
            f"{s['state_bytes_per_param']:.1f} B/param",
            f"{100 * s['sparsity/bitwise_frac']:.3f}%",
            f"{100 * s['sparsity/atol_frac']:.3f}%",
            f"{s['wall_time_s']:.1f} s",
        )
    return table
