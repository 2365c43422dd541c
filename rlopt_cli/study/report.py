"""Sweep reports from files only: every finished run's summary.json and config.toml under one folder.

One row per (objective, optimizer variant, lr, and any other config key that differs between runs), with the
mean and 95% confidence interval over seeds of the final and best eval accuracy, then the best lr of each
optimizer per objective and the comparison at those lrs (the paper's Table 2 shape).

CI: the half-width t_{0.975, n-1} * s / sqrt(n), with s the sample std (ddof=1); it is NaN for a single seed
(no spread to estimate), never 0. Deliberate simplifications: the best lr is chosen by mean final accuracy on
the same eval split the table reports (no separate validation split), ties going to the smaller lr; unfinished
runs (no summary.json) are left out and counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from rlopt_cli.config.optimizers import OPTIMIZERS
from rlopt_cli.config.recipes import from_dict, read_toml, to_dict
from rlopt_cli.errors import RloptError
from rlopt_cli.runtime.atomic_files import atomic_write_text
from rlopt_cli.study.sweep import SWEEP_FILE, expand

# Keys that differ between runs by design and so never split a table row.
NOT_AXES = ("train.seed", "train.run_name", "log.")
METRICS = {  # report column -> summary.json key
    "final_acc": "final_accuracy",
    "best_acc": "best_accuracy",
    "initial_acc": "initial_accuracy",
    "bitwise_frac": "sparsity/bitwise_frac",
    "atol_frac": "sparsity/atol_frac",
    "state_bytes": "state_bytes",
    "state_bytes_per_param": "state_bytes_per_param",
    "peak_mem_mb": "peak_mem_bytes",
    "wall_time_s": "wall_time_s",
}


@dataclass(frozen=True)
class Report:
    folder: Path
    runs: Any = field(hash=False)
    """pandas DataFrame: one row per finished run (objective, variant, lr, seed, metrics, run_dir)."""
    table: Any = field(hash=False)
    """pandas DataFrame: one row per objective x variant x lr (x other axes), mean and CI over seeds."""
    best: Any = field(hash=False)
    """pandas DataFrame: the row of each objective x variant with the highest mean final accuracy."""
    axes: list[str] = field(hash=False)
    """The grouping columns of `table`."""
    unfinished: int = 0


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: bisection on the exact two-sided Student-t CDF for integer df (Abramowitz-Stegun 26.7)."""

    def inside(t: float) -> float:  # P(|T| < t)
        theta = math.atan(t / math.sqrt(df))
        c2 = math.cos(theta) ** 2
        if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...))
            term, total = 1.0, 1.0 if df > 1 else 0.0
            for k in range(1, (df - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
        term, total = 1.0, 1.0  # even: sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...)
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total

    lo, hi = 0.0, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if inside(mid) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, 95% CI half-width) over seeds; the half-width is NaN for fewer than 2 values."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(clean)
    if n == 0:
        return math.nan, math.nan
    mean = sum(clean) / n
    if n < 2:
        return mean, math.nan
    if max(clean) == min(clean):  # no spread: exactly 0, not the 1e-17 left by rounding the mean
        return mean, 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in clean) / (n - 1))
    return mean, t_quantile_975(n - 1) * std / math.sqrt(n)


# ---------------------------------------------------------------------------------------------------------------
# reading run folders


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{s}.{k}": (tuple(v) if isinstance(v, list) else v)
        for s, vals in config.items()
        for k, v in vals.items()
    }


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The config with every field, so a run written before a new config field was added compares equal."""
    try:
        return to_dict(from_dict(config))
    except RloptError:  # written by another rlopt version: compare what is there
        return config


def variant_label(config: dict[str, Any]) -> str:
    """A name for a run's optimizer when no sweep file names it: 'sgd', 'sgd+momentum0.9', 'adamw+wd0.01'."""
    opt = config.get("optimizer", {})
    name = opt.get("name", "sgd")
    label = name
    for key, default in OPTIMIZERS[name].defaults.items():
        value = opt.get(key)
        if value is not None and (list(value) if isinstance(value, (list, tuple)) else value) != (
            list(default) if isinstance(default, tuple) else default
        ):
            label += f"+{key}{','.join(map(str, value)) if isinstance(value, list) else value}"
    if opt.get("weight_decay"):
        label += f"+wd{opt['weight_decay']}"
    return label


def sweep_variants(folder: Path) -> dict[str, str]:
    """run name -> variant, from the folder's resolved sweep.toml (the names the sweep file gave them)."""
    path = folder / SWEEP_FILE
    if not path.is_file():
        return {}
    try:
        return {c.name: c.axes["variant"] for c in expand(read_toml(path), str(path)).cells}
    except RloptError:  # an unreadable sweep file still leaves the runs readable
        return {}


def load_runs(folder: Path) -> tuple[list[dict[str, Any]], int]:
    """One record per finished run folder directly under `folder`, and the count of unfinished ones."""
    variants = sweep_variants(folder)
    records, unfinished = [], 0
    for config_path in sorted(folder.glob("*/config.toml")):
        run_dir = config_path.parent
        if not (run_dir / "summary.json").is_file():
            unfinished += 1
            continue
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (ValueError, OSError) as err:
            raise RloptError(
                f"{run_dir / 'summary.json'} is unreadable ({err}); delete it and rerun the run to rewrite it"
            ) from None
        if not isinstance(summary, dict):
            raise RloptError(f"{run_dir / 'summary.json'} is not a JSON object; delete it and rerun the run")
        config = _with_defaults(read_toml(config_path))
        record = {
            "objective": config.get("train", {}).get("objective", summary.get("objective")),
            "variant": variants.get(run_dir.name) or variant_label(config),
            "optimizer": config.get("optimizer", {}).get("name", summary.get("optimizer")),
            "lr": float(config.get("optimizer", {}).get("lr", summary.get("lr", math.nan))),
            "seed": config.get("train", {}).get("seed", summary.get("seed")),
            "run": run_dir.name,
            "run_dir": str(run_dir),
            **{col: summary.get(key, math.nan) for col, key in METRICS.items()},
            "_config": _flat(config),
        }
        record["peak_mem_mb"] = record["peak_mem_mb"] / 2**20
        records.append(record)
    return records, unfinished


def other_axes(records: list[dict[str, Any]]) -> list[str]:
    """Config keys, beyond objective/optimizer/lr, whose values differ between runs: they split rows too."""
    keys = sorted({k for r in records for k in r["_config"]})
    varying = []
    for key in keys:
        if key.startswith(NOT_AXES) or key.startswith("optimizer.") or key == "train.objective":
            continue
        if len({repr(r["_config"].get(key)) for r in records}) > 1:
            varying.append(key)
    return varying


# ---------------------------------------------------------------------------------------------------------------
# tables


def build_report(folder: str | Path) -> Report:
    import pandas as pd  # heavy: imported on use

    folder = Path(folder)
    if not folder.is_dir():
        raise RloptError(f"results folder not found: {folder}")
    records, unfinished = load_runs(folder)
    if not records:
        raise RloptError(
            f"no finished runs in {folder} ({unfinished} unfinished); point at a sweep folder such as "
            "results/lr_grid, whose run folders hold summary.json"
        )
    extra = other_axes(records)
    for record in records:
        for key in extra:
            record[key] = record["_config"].get(key)
        del record["_config"]
    runs = pd.DataFrame(records)
    axes = ["objective", "variant", "lr", *extra]
    table = aggregate(runs, axes)
    return Report(folder, runs, table, best_rows(table, axes), axes, unfinished)


def aggregate(runs: Any, axes: list[str]) -> Any:
    """Mean and 95% CI over seeds of every metric, one row per combination of `axes`."""
    import pandas as pd  # heavy: imported on use

    rows = []
    for key, group in runs.groupby(axes, sort=True, dropna=False):
        row = dict(zip(axes, key if isinstance(key, tuple) else (key,), strict=True))
        row["optimizer"] = group["optimizer"].iloc[0]
        row["n_seeds"] = len(group)
        for col in ("final_acc", "best_acc"):
            row[f"{col}_mean"], row[f"{col}_ci95"] = mean_ci(group[col].tolist())
        for col in ("initial_acc", "bitwise_frac", "atol_frac", "state_bytes", "state_bytes_per_param"):
            row[col] = group[col].mean()
        row["peak_mem_mb"] = group["peak_mem_mb"].mean()
        row["wall_time_s"] = group["wall_time_s"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def best_rows(table: Any, axes: list[str]) -> Any:
    """Each objective x variant (x other axes) at its best lr by mean final accuracy; ties: the smaller lr."""
    keys = [a for a in axes if a != "lr"]
    ordered = table.sort_values([*keys, "lr"], kind="stable")
    idx = ordered.groupby(keys, sort=True, dropna=False)["final_acc_mean"].idxmax()
    return table.loc[idx.dropna().tolist()].reset_index(drop=True).rename(columns={"lr": "best_lr"})


def markdown(df: Any, digits: int = 4) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which rlopt does not depend on)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_report(report: Report) -> list[Path]:
    """report.csv and report.parquet (the full table) and report.md (both tables) in the results folder."""
    folder = report.folder
    atomic_write_text(folder / "report.csv", report.table.to_csv(index=False))
    tmp = folder / ".report.parquet.tmp"
    report.table.to_parquet(tmp, index=False)
    tmp.replace(folder / "report.parquet")
    text = (
        f"# Sweep report: {folder.name}\n\n{len(report.runs)} finished runs"
        f" ({report.unfinished} unfinished, left out). Accuracy is greedy eval accuracy; *_ci95 is the 95% CI"
        " half-width over seeds, t_{0.975,n-1} * std / sqrt(n) (nan for one seed).\n\n"
        f"## Each optimizer at its best learning rate\n\n{markdown(report.best)}\n"
        f"## Every learning rate\n\n{markdown(report.table)}"
    )
    atomic_write_text(folder / "report.md", text)
    return [folder / "report.csv", folder / "report.parquet", folder / "report.md"]


def rich_table(df: Any, title: str) -> Any:
    table = Table(title=title)
    for col in df.columns:
        table.add_column(str(col), justify="right" if df[col].dtype.kind in "fiu" else "left")
    for row in df.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    return table


def _pm(mean: float, ci: float) -> str:
    return f"{mean:.3f}" if math.isnan(ci) else f"{mean:.3f}±{ci:.3f}"


def compact(df: Any, lr_column: str, extra: list[str]) -> Any:
    """The columns a terminal has room for, with short headers and mean±CI in one cell."""
    import pandas as pd  # heavy: imported on use

    return pd.DataFrame(
        {
            "objective": df["objective"],
            "optimizer": df["variant"],
            **{key.rsplit(".", 1)[1]: df[key].astype(str) for key in extra},
            "lr": df[lr_column].map(lambda v: f"{v:g}"),
            "n": df["n_seeds"],
            "final acc": [_pm(m, c) for m, c in zip(df["final_acc_mean"], df["final_acc_ci95"], strict=True)],
            "best acc": [_pm(m, c) for m, c in zip(df["best_acc_mean"], df["best_acc_ci95"], strict=True)],
            "changed (bitwise)": df["bitwise_frac"].map(lambda v: f"{v:.2%}"),
            "changed (atol)": df["atol_frac"].map(lambda v: f"{v:.2%}"),
            "state B/param": df["state_bytes_per_param"].map(lambda v: f"{v:g}"),
            "peak MB": df["peak_mem_mb"].map(lambda v: f"{v:.0f}"),
            "wall s": df["wall_time_s"].map(lambda v: f"{v:.1f}"),
        }
    )


def print_report(report: Report, console: Any) -> None:
    if not console.is_terminal:  # piped or logged: rich would squeeze the tables into 80 columns
        console.width = max(console.width, 160)
    extra = [a for a in report.axes if a not in ("objective", "variant", "lr")]
    name = report.folder.name
    console.print(rich_table(compact(report.table, "lr", extra), f"{name}: every learning rate"))
    console.print(
        rich_table(compact(report.best, "best_lr", extra), f"{name}: each optimizer at its best lr")
    )
