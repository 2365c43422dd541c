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
from rlopt_cli.errors import RloptError

SGD_LR = 0.003
ADAMW_LR = 3e-5
# With --model (a fetched real model): lrs from the scan in recipes/real/smollm2_arith_scan.toml (README, "A real
# model on CPU: SGD vs AdamW"); the demo's few steps on CPU show that both optimizers learn, not which is best.
REAL_LRS = {"sgd": 0.01, "adamw": 1e-5}
# A real model on CPU costs seconds per step: fewer steps and eval problems, and the arithmetic task worded for a
# chat model ('Compute 47+38. Reply with just the result.', the last integer is the answer), the settings of
# recipes/real/smollm2_arith.toml.
REAL_OVERRIDES = {
    "task.prompt_style": "instruct",
    "task.chat_template": True,
    "task.n_eval": 100,
    "grpo.batch_size": 32,
    "grpo.micro_batch_size": 16,
    "grpo.max_completion_length": 16,
    "grpo.temperature": 0.7,
    "model.gradient_checkpointing": False,
    "train.eval_every": 0,
    "train.checkpoint_every": 0,
}
# --task gsm8k (with --model): GSM8K-style word problems with chain of thought, from `rlopt fetch gsm8k-symbolic`
# (train: reasoning-gym's generator; eval: the first 50 of 100 verbatim GSM8K test problems). Completions are
# 16x longer than the arithmetic ones, so each step costs about 10x more.
GSM8K_OVERRIDES = {
    "task.name": "gsm8k",
    "task.answer_mode": "flexible",
    "task.n_eval": 50,
    "grpo.max_completion_length": 256,
    "grpo.micro_batch_size": 8,
}
TASKS = ("arithmetic", "gsm8k")


@friendly_errors
def demo(
    steps: int | None = typer.Option(
        None, "--steps", help="GRPO steps per optimizer [150; with --model 12, or 4 for gsm8k]."
    ),
    sgd_lr: float | None = typer.Option(
        None, "--sgd-lr", help=f"SGD learning rate [{SGD_LR}; {REAL_LRS['sgd']:g} with --model]."
    ),
    adamw_lr: float | None = typer.Option(
        None, "--adamw-lr", help=f"AdamW learning rate [{ADAMW_LR}; {REAL_LRS['adamw']:g} with --model]."
    ),
    model: str | None = typer.Option(
        None, "--model", help="A fetchable real model (smollm2-135m-instruct) instead of the embedded one."
    ),
    task: str = typer.Option(
        "arithmetic", "--task", help="arithmetic, or gsm8k (with --model: fetched GSM8K-style problems)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of both runs."),
    out: Path = typer.Option(Path("results/demo"), "--out", "-o", help="Folder for the two run folders."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Dotted override applied to both runs."),
) -> None:
    """GRPO with SGD and with AdamW from one starting model; prints the comparison."""
    from rlopt_cli.config.recipes import load_config

    started = time.perf_counter()
    if task not in TASKS or (task == "gsm8k" and model is None):
        raise RloptError(
            f"--task {task} is not available here; choose arithmetic, or gsm8k with --model smollm2-135m-instruct"
        )
    base: dict[str, object] = {}
    if model is not None:
        from rlopt_cli.models.assets import fetch_model
        from rlopt_cli.runtime.cache import cache_dir

        base = {**REAL_OVERRIDES, "model.name_or_path": str(fetch_model(model, cache_dir(), say=say))}
        if task == "gsm8k":
            from rlopt_cli.tasks.assets import fetch_gsm8k_symbolic

            data = fetch_gsm8k_symbolic(cache_dir(), say=say)
            files = {"task.train_file": data / "train.jsonl", "task.eval_file": data / "eval.jsonl"}
            base = {**base, **GSM8K_OVERRIDES, **files}
    lrs = REAL_LRS if model is not None else {"sgd": SGD_LR, "adamw": ADAMW_LR}
    chosen = {"sgd": sgd_lr, "adamw": adamw_lr}
    default_steps = 150 if model is None else (12 if task == "arithmetic" else 4)
    flags = {"train.steps": steps or default_steps, "train.seed": seed}
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
    console().print(comparison_table(runs, task))
    say(f"demo wall time {time.perf_counter() - started:.0f} s; run folders in {out}/")


def comparison_table(summaries: list[dict], task: str = "arithmetic") -> object:
    from rich.table import Table

    table = Table(title=f"GRPO on the {task} task: SGD vs AdamW from the same starting model")
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
