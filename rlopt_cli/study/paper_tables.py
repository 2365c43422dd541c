"""Markdown tables and one-line summaries for REPORT.md (formatting only; the numbers come from
paper_report / paper_analysis)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlopt_cli.study.paper_analysis import WeightUpdate
from rlopt_cli.study.paper_stats import fmt_ci


def fmt(mean: float, ci: float = math.nan, pct: bool = False) -> str:
    """mean ± 95% CI half-width at a precision the half-width supports (paper_stats.fmt_ci)."""
    return fmt_ci(mean, ci, pct)


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def grid_best_table(grid: Any) -> str:
    rows = [
        [
            r.objective,
            r.variant,
            f"{r.best_lr:g}",
            fmt(r.final_acc_mean, r.final_acc_ci95),
            fmt(r.best_acc_mean, r.best_acc_ci95),
            str(r.n_seeds),
            fmt(r.bitwise_frac, pct=True),
            fmt(r.atol_frac, pct=True),
        ]
        for r in grid.best.itertuples()
    ]
    return table(
        rows,
        [
            "objective",
            "optimizer",
            "best lr",
            "final acc (95% CI)",
            "best acc",
            "seeds",
            "changed bf16",
            "changed atol",
        ],
    )


def state_bytes_table(grid: Any) -> str:
    per = grid.runs.groupby("variant").state_bytes_per_param.mean()
    return table([[v, f"{b:.2f}"] for v, b in per.items()], ["optimizer", "state bytes / parameter"])


def probe_table(probes: dict[str, dict[str, Any]]) -> str:
    keys = ("step", "cos_m_prev_g", "history_ratio", "sqrt_v_std", "sqrt_v_mean", "grad_norm")
    rows = [[obj] + [f"{p.get(k, math.nan):.4g}" for k in keys] for obj, p in probes.items()]
    return table(rows, ["objective", *keys])


def ulp_table(best_updates: dict[str, list[WeightUpdate]]) -> str:
    rows = [
        [
            v,
            f"{u.median_step_ulp:.3g}",
            fmt(u.changed_bf16, pct=True),
            fmt(u.changed_fp32, pct=True),
            f"{u.update_l2:.3g}",
        ]
        for v, us in best_updates.items()
        for u in us[:1]
    ]
    return table(
        rows,
        ["optimizer (RL, best lr)", "median abs(dw)/ulp", "changed bf16", "changed fp32", "L2 norm of dw"],
    )


def scale_table(rows: list[dict[str, Any]]) -> str:
    out = [
        [
            r["optimizer"],
            f"{r['n_params']:,}",
            f"{r['lr']:g}",
            fmt(r["initial_accuracy"]),
            fmt(r["final_accuracy"]),
            fmt(r["changed_bf16"], pct=True),
            f"{r['median_step_ulp']:.3g}",
        ]
        for r in sorted(rows, key=lambda r: (r["n_params"], r["optimizer"]))
    ]
    return table(
        out,
        ["optimizer", "parameters", "lr", "acc before", "acc after", "changed bf16", "median abs(dw)/ulp"],
    )


def control_table(grid: Any, best_updates: dict[str, list[WeightUpdate]]) -> str:
    clip = grid.runs.groupby("variant").apply(lambda g: g.run_dir.tolist(), include_groups=False)
    rows = []
    for variant, dirs in clip.items():
        fracs = [
            json.loads((Path(d) / "summary.json").read_text()).get("clip_active_frac", math.nan) for d in dirs
        ]
        norm = best_updates.get(str(variant), [])
        rows.append(
            [str(variant), f"{sum(fracs) / len(fracs):.3f}", f"{norm[0].update_l2:.3g}" if norm else "n/a"]
        )
    return table(rows, ["optimizer", "steps with clipping active", "L2 norm of w_T - w_0 at best lr (RL)"])


def predict_table(best_updates: dict[str, list[WeightUpdate]], regime: list[dict[str, Any]]) -> str:
    rows = [
        [f"{v} (best lr)", fmt(u.changed_bf16, pct=True), fmt(u.predicted_bf16, pct=True)]
        for v, us in best_updates.items()
        for u in us[:1]
    ]
    rows += [
        [
            f"{r['optimizer']} lr {r['lr']:g} (paper regime)",
            fmt(r["changed_bf16"], pct=True),
            f"{fmt(r['predicted_bf16'], pct=True)} (median step {r['median_step_ulp']:.3g} ulp)",
        ]
        for r in regime
    ]
    return table(rows, ["run", "measured changed (bf16)", "predicted: mean min(1, abs(dw)/ulp)"])


def grid_n_params(grid: Any) -> int:
    return int(json.loads((Path(grid.runs.run_dir.iloc[0]) / "summary.json").read_text())["n_params"])


def memory_text(memory: dict[str, Any]) -> str:
    if not memory or "adamw" not in memory:
        return "not measured"
    a = memory["adamw"]
    return (
        f"one training step of a {memory['n_params'] / 1e6:.0f}M-parameter model: AdamW's peak RSS is "
        f"{a['above_sgd_mb']:.0f} MB above SGD's (its fp32 state: {a['expected_mb']:.0f} MB; ratio "
        f"{a['ratio']:.2f}); accounted state {a['state_bytes_per_param']:.2f} B/param vs SGD "
        f"{memory['sgd']['state_bytes_per_param']:.2f}"
    )


def memory_verdict(memory: dict[str, Any]) -> str:
    if not memory or "adamw" not in memory:
        return "not measured"
    return (
        "holds"
        if memory["adamw"]["ratio"] >= 0.9 and memory["sgd"]["state_bytes_per_param"] == 0
        else ("does not hold at this scale")
    )


def memory_table(memory: dict[str, Any]) -> str:
    rows = [
        [
            k,
            f"{v['state_bytes_per_param']:.2f}",
            f"{v['peak_rss_mb']:.0f}",
            f"{v['above_sgd_mb']:+.0f}",
            f"{v['expected_mb']:.0f}",
            "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}",
        ]
        for k, v in memory.items()
        if isinstance(v, dict)
    ]
    return (
        table(
            rows,
            [
                "optimizer",
                "state B/param",
                "peak RSS (MB)",
                "above SGD (MB)",
                "expected (MB)",
                "measured/expected",
            ],
        )
        if rows
        else ""
    )


def scale_text(rows: list[dict[str, Any]]) -> str:
    by_n: dict[int, dict[str, float]] = {}
    for r in rows:
        by_n.setdefault(int(r["n_params"]), {})[r["optimizer"]] = r["changed_bf16"]
    parts = [
        f"n={n:,}: AdamW/SGD {v['adamw'] / v['sgd']:.3g}x"
        for n, v in sorted(by_n.items())
        if v.get("sgd") and "adamw" in v
    ]
    return "; ".join(parts) or "n/a"
