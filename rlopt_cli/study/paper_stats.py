"""The paper study's statistics and verdict rules: pure functions of numbers, fixed before any run.

How a claim is decided (rlopt_cli/paper_report.py applies these to the verdict stage's run folders):
1. Each optimizer's learning rate is chosen on the selection stage's runs (their own seeds); the verdict stage
   reruns only the chosen lrs on fresh seeds, split into two disjoint seed sets A and B, and repeats set A's
   seeds from a second warm-up (start point A'). No number a verdict reads took part in choosing the lr.
2. Per seed set, a 95% CI of the quantity the claim is about (a paired difference when both optimizers ran
   the same seed and start point) is placed against the claim's boundary: wholly on the claim's side ->
   "holds", wholly on the other side -> "does not hold", straddling the boundary -> "inconclusive".
3. The final verdict is "holds" or "does not hold" only when sets A and B agree; a decisive verdict at the
   second start point that says the opposite makes it "inconclusive" too.

Margins (the boundary each rule uses), chosen from what the claims say, not from results:
- ACC_MARGIN = 0.05: "SGD matches AdamW" is read as "SGD is at most 5 accuracy points below AdamW" (the paper's
  own gaps are +2.6 and +0.2 points, with a standard error of about 2 points on its 500-problem evals);
  "SGD clearly below AdamW" in SFT as "more than 5 points below". The two claims share one boundary.
- COS_MARGIN = 0.1: "momentum matters more in SFT" needs cos(m_{t-1}, g_t) at least 0.1 higher in SFT than in
  RL (the paper: 0.997 vs -0.007).
- SPREAD_RATIO = 2: "adaptivity matters more in SFT" needs std(sqrt v) at least 2x larger in SFT (paper: 22x).
Deliberate simplification: Student-t CIs over seeds (normal errors, no multiple-comparison correction across
claims); per-problem noise enters through each run's accuracy on the fixed held-out eval split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlopt_cli.study.report import t_quantile_975

ACC_MARGIN = 0.05
COS_MARGIN = 0.1
SPREAD_RATIO = 2.0
SGD_SPARSE_MAX = 2e-4  # the paper's "< 0.02% of parameters changed"
SPARSITY_RATIO_MIN = 1000.0  # and "> 1000x fewer than AdamW"

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Comparison:
    diff: float
    """mean(a) - mean(b) (paired: the mean of the per-pair differences)."""
    low: float
    high: float
    """95% CI of the difference; NaN when a side has a single value (no spread to estimate)."""
    n: int = 0
    """Pairs (paired) or the smaller side's count (Welch)."""

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2


def compare_means(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Welch 95% CI of mean(a) - mean(b) for independent samples (df floored: conservative)."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    n = min(len(a), len(b))
    if n < 2:
        return Comparison(ma - mb, math.nan, math.nan, n)
    va = _var(a) / len(a)
    vb = _var(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison(ma - mb, ma - mb, ma - mb, n)
    df = (va + vb) ** 2 / ((va**2) / (len(a) - 1) + (vb**2) / (len(b) - 1))
    half = t_quantile_975(max(1, int(df + 1e-9))) * se
    return Comparison(ma - mb, ma - mb - half, ma - mb + half, n)


def compare_paired(a: Mapping[Any, float], b: Mapping[Any, float]) -> Comparison:
    """Student-t 95% CI of the mean of a[k] - b[k] over the keys both hold (same seed and start point)."""
    diffs = [a[k] - b[k] for k in sorted(set(a) & set(b), key=repr)]
    if not diffs:
        return Comparison(math.nan, math.nan, math.nan, 0)
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return Comparison(mean, math.nan, math.nan, 1)
    half = t_quantile_975(len(diffs) - 1) * math.sqrt(_var(diffs) / len(diffs))
    return Comparison(mean, mean - half, mean + half, len(diffs))


def _var(xs: Sequence[float]) -> float:
    """Sample variance (ddof=1), exactly 0 when every value is equal (no 1e-33 from rounding the mean)."""
    if max(xs) == min(xs):
        return 0.0
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def side(c: Comparison, boundary: float) -> str:
    """Where the CI lies against `boundary`: 'above', 'below', 'straddles', or 'no CI' (one value)."""
    if math.isnan(c.low) or math.isnan(c.high):
        return "no CI"
    if c.low > boundary:
        return "above"
    if c.high < boundary:
        return "below"
    return "straddles"


def rule_not_below(c: Comparison, margin: float = ACC_MARGIN) -> str:
    """Claim 'a is within `margin` of b, or above it': the CI of a - b lies wholly above -margin."""
    return {"above": HOLDS, "below": FAILS}.get(side(c, -margin), INCONCLUSIVE)


def rule_clearly_below(c: Comparison, margin: float = ACC_MARGIN) -> str:
    """Claim 'a is more than `margin` below b': the CI of a - b lies wholly below -margin."""
    return {"below": HOLDS, "above": FAILS}.get(side(c, -margin), INCONCLUSIVE)


def rule_above(c: Comparison, boundary: float) -> str:
    """Claim 'the difference exceeds `boundary`': the CI lies wholly above it."""
    return {"above": HOLDS, "below": FAILS}.get(side(c, boundary), INCONCLUSIVE)


def rule_sparse(sgd: Comparison, ratio: float) -> str:
    """Claim 'SGD changes < 0.02% of parameters, > 1000x fewer than AdamW'. `sgd` is SGD's changed fraction
    as a CI (diff = mean), `ratio` AdamW's mean over SGD's: a ratio at or under 1000 refutes the claim."""
    where = side(sgd, SGD_SPARSE_MAX)
    if ratio <= SPARSITY_RATIO_MIN or where == "above":
        return FAILS
    return HOLDS if where == "below" else INCONCLUSIVE


def final_verdict(a: str, b: str, start: str | None = None) -> str:
    """'holds' / 'does not hold' only when seed sets A and B agree on it; a decisive opposite verdict at the
    second start point makes it inconclusive. The reason is appended to 'inconclusive'."""
    if a != b:
        return f"{INCONCLUSIVE} (seed sets disagree)"
    if a not in (HOLDS, FAILS):
        return f"{INCONCLUSIVE} (CI straddles the boundary)" if a == INCONCLUSIVE else a
    if start in (HOLDS, FAILS) and start != a:
        return f"{INCONCLUSIVE} (flips with the start point)"
    return a


def split_seeds(seeds: Sequence[int]) -> tuple[list[int], list[int]]:
    """Two disjoint seed sets: the first half and the second half (A gets the extra one of an odd count)."""
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeat a value; the two sets must be disjoint")
    half = (len(seeds) + 1) // 2
    return list(seeds[:half]), list(seeds[half:])


def fmt_ci(mean: float, half: float = math.nan, pct: bool = False) -> str:
    """'0.572 ± 0.047': the half-width to 2 significant digits and the mean to the same decimal place; a
    zero (or rounding-level) half-width reads '± 0'; NaN reads 'n/a' (mean) or is left out (half-width)."""
    scale, unit = (100.0, "%") if pct else (1.0, "")
    if math.isnan(mean):
        return "n/a"
    m = scale * mean
    if math.isnan(half):
        return f"{m:.4g}{unit}"
    h = scale * abs(half)
    if h <= 1e-12 * max(1.0, abs(m)):
        return f"{m:.4g}{unit} ± 0{unit}"
    decimals = max(0, 1 - math.floor(math.log10(h)))
    if decimals > 4:  # tiny quantities (std of sqrt v ~1e-4): significant digits, not a row of zeros
        return f"{m:.3g}{unit} ± {h:.2g}{unit}"
    return f"{m:.{decimals}f}{unit} ± {h:.{decimals}f}{unit}"


def fmt_interval(c: Comparison, pct: bool = False) -> str:
    """'-0.043 [-0.086, -0.001]' with the precision of fmt_ci; no interval for a single value."""
    scale, unit = (100.0, "%") if pct else (1.0, "")
    if math.isnan(c.diff):
        return "n/a"
    if math.isnan(c.low):
        return f"{scale * c.diff:+.3g}{unit} (no CI: one seed)"
    h = scale * c.half
    decimals = 3 if h <= 1e-12 else max(0, 1 - math.floor(math.log10(h)))
    lo, hi = scale * c.low, scale * c.high
    return f"{scale * c.diff:+.{decimals}f}{unit} [{lo:+.{decimals}f}, {hi:+.{decimals}f}]"
