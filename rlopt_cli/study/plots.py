"""Sweep figures (matplotlib, Agg, PNG) drawn from a Report and the runs' metrics.jsonl: files only.

- accuracy_vs_lr.png: mean final eval accuracy vs lr (log x, 95% CI bars), a line per optimizer variant,
  a panel per objective;
- curves_best_lr.png: reward (GRPO; SFT has none, so its train loss) and eval accuracy over steps, each
  optimizer at its best lr, averaged over seeds; a row of panels per objective;
- update_fraction.png: the fraction of parameters changed (bf16 bitwise) vs lr, and over steps at the best lr.

Every function returns the series it drew ({panel: {line: (x, y[, err])}}) so tests check data, not pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rlopt_cli.study.report import Report
from rlopt_cli.training.tracking import read_metrics

Series = dict[str, dict[str, tuple[list[float], ...]]]


def _figure(rows: int, cols: int) -> tuple[Any, Any]:
    import matplotlib  # heavy: imported on use

    matplotlib.use("Agg")  # no display on servers and in workers
    import matplotlib.pyplot as plt  # heavy: imported on use

    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt  # heavy: imported on use

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def accuracy_vs_lr(report: Report, path: Path) -> Series:
    objectives = sorted(report.table["objective"].unique())
    fig, axes = _figure(1, len(objectives))
    series: Series = {}
    for ax, objective in zip(axes[0], objectives, strict=True):
        series[objective] = {}
        rows = report.table[report.table["objective"] == objective]
        for variant, group in rows.groupby("variant", sort=True):
            group = group.sort_values("lr")
            xs, ys = group["lr"].tolist(), group["final_acc_mean"].tolist()
            errs = [0.0 if math.isnan(e) else e for e in group["final_acc_ci95"]]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=str(variant))
            series[objective][str(variant)] = (xs, ys, errs)
        ax.set(xscale="log", xlabel="learning rate", ylabel="final eval accuracy", title=objective)
        ax.legend(fontsize=8)
    _save(fig, path)
    return series


def _mean_curve(run_dirs: list[str], key: str) -> tuple[list[float], list[float]]:
    """Mean over seeds of `key` at each step that every seed logged it."""
    by_step: dict[int, list[float]] = {}
    for run_dir in run_dirs:
        for row in read_metrics(Path(run_dir)):
            if key in row:
                by_step.setdefault(int(row["step"]), []).append(float(row[key]))
    steps = sorted(s for s, v in by_step.items() if len(v) == len(run_dirs))
    return [float(s) for s in steps], [sum(by_step[s]) / len(by_step[s]) for s in steps]


def _best_runs(report: Report) -> dict[tuple[str, str], list[str]]:
    """(objective, variant) -> run folders at that variant's best lr (all seeds)."""
    out: dict[tuple[str, str], list[str]] = {}
    for row in report.best.itertuples(index=False):
        runs = report.runs
        match = runs[
            (runs.objective == row.objective) & (runs.variant == row.variant) & (runs.lr == row.best_lr)
        ]
        out.setdefault((row.objective, row.variant), []).extend(match["run_dir"].tolist())
    return out


def curves_at_best_lr(report: Report, path: Path) -> Series:
    best = _best_runs(report)
    objectives = sorted({o for o, _ in best})
    fig, axes = _figure(len(objectives), 2)
    series: Series = {}
    for row_axes, objective in zip(axes, objectives, strict=True):
        reward_key = "train/reward_mean" if objective == "grpo" else "train/loss"
        for ax, key in zip(row_axes, (reward_key, "eval/accuracy"), strict=True):
            panel = series.setdefault(f"{objective} {key}", {})
            for (obj, variant), run_dirs in sorted(best.items()):
                if obj == objective:
                    steps, values = _mean_curve(run_dirs, key)
                    ax.plot(steps, values, marker="." if key == "eval/accuracy" else None, label=variant)
                    panel[variant] = (steps, values)
            ax.set(xlabel="step", ylabel=key, title=f"{objective}: {key} at each best lr")
            ax.legend(fontsize=8)
    _save(fig, path)
    return series


def update_fraction(report: Report, path: Path) -> Series:
    fig, axes = _figure(1, 2)
    series: Series = {"vs lr": {}, "over steps": {}}
    for (objective, variant), group in report.table.groupby(["objective", "variant"], sort=True):
        group = group.sort_values("lr")
        label = f"{objective} {variant}"
        xs, ys = group["lr"].tolist(), group["bitwise_frac"].tolist()
        axes[0][0].plot(xs, ys, marker="o", label=label)
        series["vs lr"][label] = (xs, ys)
    for (objective, variant), run_dirs in sorted(_best_runs(report).items()):
        label = f"{objective} {variant}"
        steps, values = _mean_curve(run_dirs, "sparsity/bitwise_frac")
        axes[0][1].plot(steps, values, marker=".", label=label)
        series["over steps"][label] = (steps, values)
    axes[0][0].set(xscale="log", xlabel="learning rate", ylabel="fraction changed (bf16 bitwise)")
    axes[0][1].set(xlabel="step", ylabel="fraction changed (bf16 bitwise)", title="at each best lr")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    _save(fig, path)
    return series


def plot_report(report: Report) -> dict[str, Series]:
    """All three figures in the results folder; returns {file name: series drawn}."""
    folder = report.folder
    return {
        "accuracy_vs_lr.png": accuracy_vs_lr(report, folder / "accuracy_vs_lr.png"),
        "curves_best_lr.png": curves_at_best_lr(report, folder / "curves_best_lr.png"),
        "update_fraction.png": update_fraction(report, folder / "update_fraction.png"),
    }
