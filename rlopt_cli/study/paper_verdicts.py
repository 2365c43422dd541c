"""The verdict stage's claims, each decided per seed set (A, B, and A' from the second start point) and then
combined by paper_stats.final_verdict. Reads only files: verdict/plan.json and the run folders under verdict/.

A claim is a function of one set's runs that returns a SetResult (verdict, the numbers behind it, and the CI
half-width it reached); `decide` applies it to A, B, A' and the pooled A+B (whose numbers head the report row).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlopt_cli.sparsity.compare import sparsity
from rlopt_cli.study.paper_analysis import WeightUpdate
from rlopt_cli.study.paper_stats import (
    COS_MARGIN,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    SPREAD_RATIO,
    Comparison,
    compare_means,
    compare_paired,
    final_verdict,
    fmt_ci,
    fmt_interval,
    rule_above,
    rule_clearly_below,
    rule_not_below,
    rule_sparse,
)
from rlopt_cli.study.report import load_runs, mean_ci

SETS = ("A", "B", "A'")
POOLED = "A+B"
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class SetResult:
    verdict: str
    text: str
    half: float = math.nan
    """The 95% CI half-width this set reached on the claim's quantity (NaN where no CI applies)."""
    key: str = ""
    """The number that decided it, short enough for a table cell (the CI of the difference, a ratio)."""


@dataclass(frozen=True)
class Decision:
    per_set: dict[str, SetResult]
    """A, B, A' and the pooled A+B."""
    final: str


def load_verdict_runs(verdict_dir: Path) -> dict[str, Any]:
    """Set name -> DataFrame of its finished runs (A, B, A', and A+B pooled), from plan.json and the folders."""
    import pandas as pd  # heavy: imported on use

    plan = json.loads((verdict_dir / PLAN_FILE).read_text())
    records, _ = load_runs(verdict_dir)
    for r in records:
        r["init_seed"] = int(r.pop("_config").get("model.init_seed", 0))
    runs = pd.DataFrame(records)
    if not runs.empty:  # only the plan's lrs: runs left over from an earlier selection are not read
        chosen = [
            plan["lrs"].get(o, {}).get(opt) for o, opt in zip(runs.objective, runs.optimizer, strict=True)
        ]
        runs = runs[[lr == c for lr, c in zip(runs.lr, chosen, strict=True)]]
    out: dict[str, Any] = {}
    for s in plan["sets"]:
        if runs.empty:
            out[s["name"]] = runs
            continue
        mask = (runs.init_seed == s["init_seed"]) & runs.seed.isin(s["seeds"])
        out[s["name"]] = runs[mask].reset_index(drop=True)
    out[POOLED] = pd.concat([out["A"], out["B"]], ignore_index=True)
    return out


def decide(claim: Callable[[Any], SetResult], sets: dict[str, Any]) -> Decision:
    per_set = {name: claim(runs) for name, runs in sets.items()}
    final = final_verdict(per_set["A"].verdict, per_set["B"].verdict, per_set["A'"].verdict)
    return Decision(per_set, final)


def _by_pair(runs: Any, objective: str, optimizer: str, column: str) -> dict[tuple[int, int], float]:
    rows = runs[(runs.objective == objective) & (runs.optimizer == optimizer)]
    return {(int(r.seed), int(r.init_seed)): float(getattr(r, column)) for r in rows.itertuples()}


def _lr(runs: Any, objective: str, optimizer: str) -> str:
    rows = runs[(runs.objective == objective) & (runs.optimizer == optimizer)]
    return f"{rows.lr.iloc[0]:g}" if len(rows) else "?"


def accuracy(objective: str) -> Callable[[Any], SetResult]:
    """Claim 1 (grpo: SGD within ACC_MARGIN of AdamW or above) or 2 (sft: SGD more than ACC_MARGIN below)."""
    rule = rule_not_below if objective == "grpo" else rule_clearly_below

    def claim(runs: Any) -> SetResult:
        sgd = _by_pair(runs, objective, "sgd", "final_acc")
        adamw = _by_pair(runs, objective, "adamw", "final_acc")
        if not sgd or not adamw:
            return SetResult(f"{INCONCLUSIVE} (missing runs)", "n/a")
        c = compare_paired(sgd, adamw)
        text = (
            f"SGD (lr {_lr(runs, objective, 'sgd')}) {fmt_ci(*mean_ci(list(sgd.values())))} vs AdamW "
            f"(lr {_lr(runs, objective, 'adamw')}) {fmt_ci(*mean_ci(list(adamw.values())))}; "
            f"paired diff {fmt_interval(c)} (n={c.n})"
        )
        return SetResult(rule(c), text, c.half, fmt_interval(c))

    return claim


def _fractions(runs: Any, objective: str) -> tuple[dict[Any, float], dict[Any, float]]:
    return _by_pair(runs, objective, "sgd", "bitwise_frac"), _by_pair(
        runs, objective, "adamw", "bitwise_frac"
    )


def sparsity_text(sgd: dict[Any, float], adamw: dict[Any, float]) -> str:
    s, a = mean_ci(list(sgd.values())), mean_ci(list(adamw.values()))
    ratio = a[0] / s[0] if s[0] > 0 else math.inf
    return f"changed (bf16 bitwise): SGD {fmt_ci(*s, pct=True)} vs AdamW {fmt_ci(*a, pct=True)}, {ratio:.3g}x"


def sparse_quantitative(runs: Any) -> SetResult:
    """Claim 3a: SGD changes < 0.02% of the parameters in RL, > 1000x fewer than AdamW."""
    sgd, adamw = _fractions(runs, "grpo")
    if not sgd or not adamw:
        return SetResult(f"{INCONCLUSIVE} (missing runs)", "n/a")
    s_mean, s_half = mean_ci(list(sgd.values()))
    a_mean = sum(adamw.values()) / len(adamw)
    ratio = a_mean / s_mean if s_mean > 0 else math.inf
    c = Comparison(s_mean, s_mean - s_half, s_mean + s_half, len(sgd))
    return SetResult(
        rule_sparse(c, ratio),
        sparsity_text(sgd, adamw),
        s_half,
        f"SGD {fmt_ci(s_mean, s_half, pct=True)}, {ratio:.3g}x",
    )


def sparse_qualitative(objective: str) -> Callable[[Any], SetResult]:
    """Claims 3b/3c: SGD changes fewer parameters than AdamW (paired CI of AdamW - SGD above 0)."""

    def claim(runs: Any) -> SetResult:
        sgd, adamw = _fractions(runs, objective)
        if not sgd or not adamw:
            return SetResult(f"{INCONCLUSIVE} (missing runs)", "n/a")
        c = compare_paired(adamw, sgd)
        return SetResult(rule_above(c, 0.0), sparsity_text(sgd, adamw), c.half, fmt_interval(c, pct=True))

    return claim


def probe_of(run_dir: str) -> dict[str, Any]:
    """The last probe step's statistics of a run ({} when it has none)."""
    files = sorted((Path(run_dir) / "probe").glob("step-*.json"))
    return json.loads(files[-1].read_text()) if files else {}


def _probe_values(runs: Any, objective: str, key: str) -> list[float]:
    rows = runs[(runs.objective == objective) & (runs.optimizer == "adamw")]
    values = [probe_of(d).get(key, math.nan) for d in rows.run_dir]
    return [float(v) for v in values if not math.isnan(v)]


def momentum(runs: Any) -> SetResult:
    """Claim 5a: cos(m_{t-1}, g_t) of AdamW higher in SFT than in RL by more than COS_MARGIN (Welch CI)."""
    sft, rl = _probe_values(runs, "sft", "cos_m_prev_g"), _probe_values(runs, "grpo", "cos_m_prev_g")
    if not sft or not rl:
        return SetResult(f"{INCONCLUSIVE} (no probe)", "n/a")
    c = compare_means(sft, rl)
    text = (
        f"cos(m_(t-1), g_t): SFT {fmt_ci(*mean_ci(sft))} vs RL {fmt_ci(*mean_ci(rl))}; diff {fmt_interval(c)}"
    )
    return SetResult(rule_above(c, COS_MARGIN), text, c.half, fmt_interval(c))


def adaptivity(runs: Any) -> SetResult:
    """Claim 5b: std(sqrt v) of AdamW at least SPREAD_RATIO x larger in SFT than in RL (Welch CI of log10)."""
    sft, rl = _probe_values(runs, "sft", "sqrt_v_std"), _probe_values(runs, "grpo", "sqrt_v_std")
    sft, rl = [v for v in sft if v > 0], [v for v in rl if v > 0]
    if not sft or not rl:
        return SetResult(f"{INCONCLUSIVE} (no probe)", "n/a")
    c = compare_means([math.log10(v) for v in sft], [math.log10(v) for v in rl])
    ratio = 10**c.diff
    text = f"std sqrt(v): SFT {fmt_ci(*mean_ci(sft))} vs RL {fmt_ci(*mean_ci(rl))}; ratio {ratio:.3g}x" + (
        "" if math.isnan(c.low) else f" [{10**c.low:.3g}, {10**c.high:.3g}]"
    )
    return SetResult(rule_above(c, math.log10(SPREAD_RATIO)), text, c.half, f"{ratio:.3g}x")


def rl_updates(runs: Any, updates: dict[str, WeightUpdate]) -> dict[str, list[WeightUpdate]]:
    """optimizer -> the weight updates of the set's RL runs."""
    out: dict[str, list[WeightUpdate]] = {}
    for r in runs[runs.objective == "grpo"].itertuples():
        if r.run_dir in updates:
            out.setdefault(str(r.optimizer), []).append(updates[r.run_dir])
    return out


def fp32(updates: dict[str, WeightUpdate]) -> Callable[[Any], SetResult]:
    """Claim 6: in fp32 storage > 90% of the parameters change in every RL run of the set."""

    def claim(runs: Any) -> SetResult:
        by_opt = rl_updates(runs, updates)
        if not by_opt:
            return SetResult(f"{INCONCLUSIVE} (missing runs)", "n/a")
        text = ", ".join(
            f"{v}: fp32 {fmt_ci(*mean_ci([u.changed_fp32 for u in us]), pct=True)} vs bf16 "
            f"{fmt_ci(*mean_ci([u.changed_bf16 for u in us]), pct=True)}"
            for v, us in by_opt.items()
        )
        low = min(u.changed_fp32 for us in by_opt.values() for u in us)
        return SetResult(HOLDS if low > 0.9 else FAILS, text, key=f"min fp32 {100 * low:.3g}%")

    return claim


def predicted(updates: dict[str, WeightUpdate]) -> Callable[[Any], SetResult]:
    """Claim 9: the mean of min(1, |dw|/ulp) predicts the bf16 changed fraction within 2x, each optimizer."""

    def claim(runs: Any) -> SetResult:
        by_opt = rl_updates(runs, updates)
        if not by_opt:
            return SetResult(f"{INCONCLUSIVE} (missing runs)", "n/a")
        means = {
            v: (sum(u.changed_bf16 for u in us) / len(us), sum(u.predicted_bf16 for u in us) / len(us))
            for v, us in by_opt.items()
        }
        text = ", ".join(
            f"{v}: measured {100 * m:.3g}% vs predicted {100 * p:.3g}%" for v, (m, p) in means.items()
        )
        ok = all(m > 0 and 0.5 <= p / m <= 2 for m, p in means.values())
        key = ", ".join(f"{v} {p / m:.2f}x" if m > 0 else f"{v} n/a" for v, (m, p) in means.items())
        return SetResult(HOLDS if ok else FAILS, text, key=f"predicted/measured: {key}")

    return claim


def first_runs(runs: Any, objective: str = "grpo") -> dict[str, str]:
    """optimizer -> run folder of its lowest seed in the set (for the per-run measurements: rank, layers)."""
    out = {}
    for opt in ("sgd", "adamw"):
        rows = runs[(runs.objective == objective) & (runs.optimizer == opt)].sort_values("seed")
        if len(rows):
            out[opt] = str(rows.run_dir.iloc[0])
    return out


def rank(cache: dict[str, tuple[float, float]]) -> Callable[[Any], SetResult]:
    """Claim 3d: the effective rank of dW lower for SGD than AdamW (RL, the set's lowest seed: one run each)."""

    def claim(runs: Any) -> SetResult:
        first = first_runs(runs)
        if len(first) < 2:
            return SetResult(f"{INCONCLUSIVE} (missing runs)", "n/a")
        ranks = {v: effective_rank(d, cache) for v, d in first.items()}
        text = ", ".join(f"{v}: {m:.3g} ({p:.3g}% of full rank)" for v, (m, p) in ranks.items())
        key = f"SGD {ranks['sgd'][0]:.3g} vs AdamW {ranks['adamw'][0]:.3g}"
        return SetResult(HOLDS if ranks["sgd"][0] < ranks["adamw"][0] else FAILS, text, key=key)

    return claim


def effective_rank(run_dir: str, cache: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """(mean effective rank of dW over matrices, as % of full rank) of one run, computed once per folder."""
    if run_dir not in cache:
        run = Path(run_dir)
        summary = sparsity(
            run / "checkpoints" / "step-000000", run, dtype="bfloat16", rank=True
        ).rank_summary()
        cache[run_dir] = (summary["mean"], summary["mean_pct"])
    return cache[run_dir]


def power_rows(decisions: dict[str, Decision], margins: dict[str, str]) -> list[list[str]]:
    """One row per claim with a CI: the half-width reached per set and pooled, against the rule's boundary."""
    rows = []
    for claim, margin in margins.items():
        d = decisions[claim]
        halves = [d.per_set[s].half for s in (*SETS, POOLED)]
        rows.append([claim, margin, *("n/a" if math.isnan(h) else f"{h:.3g}" for h in halves)])
    return rows
