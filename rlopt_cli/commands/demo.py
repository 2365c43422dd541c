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
# With --model (a fetched real model): the paper recipes' SGD rate and a common RL rate for AdamW. Not tuned at
# this size: the demo's few steps on CPU cannot show which rate is best, only that both optimizers run.
REAL_LRS = {"sgd": 0.1, "adamw": 1e-6}
# A real model on CPU costs seconds per step (README, "A real model on CPU"): fewer steps and eval problems, one
# micro-batch per group, the chat template, and room for "47 + 38 = 85" rather than the bare "85".
REAL_OVERRIDES = {
    "grpo.max_completion_length": 16,
    "grpo.micro_batch_size": 8,
    "model.gradient_checkpointing": True,
    "task.chat_template": True,
    "task.n_eval": 50,
    "train.eval_every": 0,
    "train.checkpoint_every": 0,
}


@friendly_errors
def demo(
    steps: int | None = typer.Option(
        None, "--steps", help="GRPO steps per optimizer [150; 10 with --model]."
    ),
    sgd_lr: float | None = typer.Option(
        None, "--sgd-lr", help=f"SGD learning rate [{SGD_LR}; 0.1 with --model]."
    ),
    adamw_lr: float | None = typer.Option(
        None, "--adamw-lr", help=f"AdamW learning rate [{ADAMW_LR}; 1e-6 with --model]."
    ),
    model: str | None = typer.Option(
        None, "--model", help="A fetchable real model (smollm2-135m-instruct) instead of the embedded one."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of both runs."),
    out: Path = typer.Option(Path("results/demo"), "--out", "-o", help="Folder for the two run folders."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Dotted override applied to both runs."),
) -> None:
    """GRPO on the arithmetic task with SGD and AdamW from one starting model; prints the comparison."""
    from rlopt_cli.config.recipes import load_config

    started = time.perf_counter()
    base: dict[str, object] = {}
    if model is not None:
        from rlopt_cli.models.assets import fetch_model
        from rlopt_cli.runtime.cache import cache_dir

        base = {**REAL_OVERRIDES, "model.name_or_path": str(fetch_model(model, cache_dir(), say=say))}
    lrs = REAL_LRS if model is not None else {"sgd": SGD_LR, "adamw": ADAMW_LR}
    chosen = {"sgd": sgd_lr, "adamw": adamw_lr}
    flags = {"train.steps": steps or (10 if model is not None else 150), "train.seed": seed}
    # the real model's settings go first, so the user's --set overrides them
    first = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in base.items()]
    configs = [
        load_config(
            None,
            [*first, *overrides],
            {**flags, "optimizer.name": name, "optimizer.lr": chosen[name] or lrs[name]},
        )
        for name in ("sgd", "adamw")
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

    table = Table(title="GRPO on the arithmetic task: SGD vs AdamW from the same starting model")
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
