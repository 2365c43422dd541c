"""`rlopt paper --quick` end to end on a tiny budget, and the study's pure helpers against hand numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlopt_cli.cli import app
from rlopt_cli.errors import RloptError
from rlopt_cli.study import paper
from rlopt_cli.study.paper_analysis import at_matched_norm
from rlopt_cli.study.paper_stats import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
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
    split_seeds,
)
from rlopt_cli.study.report import mean_ci

REPO = Path(__file__).resolve().parents[1]


def test_central_learning_rates() -> None:
    assert paper.central([1e-3, 3e-3, 1e-2, 1e-1, 1.0]) == [1e-2, 1e-1]
    assert paper.central([1e-5, 3e-5, 1e-4, 1e-3]) == [3e-5, 1e-4]
    assert paper.central([1e-5, 1e-4, 1e-3]) == [1e-4, 1e-3]
    assert paper.central([0.1]) == [0.1]


def test_regime_learning_rates() -> None:
    # lr / sqrt(n) matched to 0.1 / sqrt(1.7e9): at 1.7e9 parameters it is the paper's 0.1 itself
    assert paper.regime_lrs(1_700_000_000)["sgd"] == pytest.approx(0.1)
    assert paper.regime_lrs(1_700_000)["sgd"] == pytest.approx(0.1 * math.sqrt(1e-3))
    assert paper.regime_lrs(1_000)["adamw"] == 1e-6


def test_welch_comparison() -> None:
    # means 0.5 and 0.55, sample variances 0.0016 -> se sqrt(2 * 0.0016 / 3) = 0.0327, df 4 -> t 2.776:
    # CI -0.05 +- 0.0907 = [-0.141, +0.041]
    c = compare_means([0.46, 0.50, 0.54], [0.51, 0.55, 0.59])
    assert c.diff == pytest.approx(-0.05)
    assert c.half == pytest.approx(2.776 * math.sqrt(2 * 0.0016 / 3), rel=1e-3)
    assert math.isnan(compare_means([0.5], [0.4]).low)
    same = compare_means([0.5, 0.5], [0.4, 0.4])  # no spread: a zero-width CI, not 1e-17 of rounding
    assert (same.low, same.high, same.half) == (pytest.approx(0.1), pytest.approx(0.1), 0.0)


def test_paired_comparison_uses_matching_keys_only() -> None:
    # differences -0.02, -0.04, -0.06 over the common keys (mean -0.04, sd 0.02): t_2 = 4.303,
    # half-width 4.303 * 0.02 / sqrt(3) = 0.0497; key 9 has no partner and is left out
    a = {0: 0.50, 1: 0.52, 2: 0.54, 9: 0.9}
    b = {0: 0.52, 1: 0.56, 2: 0.60}
    c = compare_paired(a, b)
    assert (c.n, c.diff) == (3, pytest.approx(-0.04))
    assert c.half == pytest.approx(4.303 * 0.02 / math.sqrt(3), rel=1e-3)
    # the same numbers unpaired are much wider: pairing removes the shared seed effect
    assert compare_means(list(a.values())[:3], list(b.values())).half > c.half
    assert math.isnan(compare_paired({0: 0.5}, {0: 0.4}).low)
    assert compare_paired({0: 0.5}, {1: 0.4}).n == 0


@pytest.mark.parametrize(
    ("low", "high", "not_below", "clearly_below"),
    [
        (-0.03, 0.02, HOLDS, FAILS),  # wholly above -0.05: SGD within 5 points (and so not clearly below)
        (-0.12, -0.07, FAILS, HOLDS),  # wholly below -0.05
        (-0.08, -0.01, INCONCLUSIVE, INCONCLUSIVE),  # straddles -0.05: not enough power at this margin
        (
            -0.086,
            -0.001,
            INCONCLUSIVE,
            INCONCLUSIVE,
        ),  # the README's old claim 1: below 0, but not below -0.05
        (math.nan, math.nan, INCONCLUSIVE, INCONCLUSIVE),  # one seed: no CI
    ],
)
def test_accuracy_rules_at_the_margin(low: float, high: float, not_below: str, clearly_below: str) -> None:
    c = Comparison((low + high) / 2, low, high, 8)
    assert rule_not_below(c, margin=0.05) == not_below
    assert rule_clearly_below(c, margin=0.05) == clearly_below


def test_boundary_and_sparsity_rules() -> None:
    assert rule_above(Comparison(0.3, 0.2, 0.4), 0.1) == HOLDS
    assert rule_above(Comparison(0.0, -0.1, 0.1), 0.1) == INCONCLUSIVE
    assert rule_above(Comparison(-0.2, -0.3, -0.1), 0.0) == FAILS
    # SGD's changed fraction (mean and CI) against 0.02%, and the AdamW/SGD ratio against 1000x
    assert rule_sparse(Comparison(1e-4, 0.5e-4, 1.5e-4), ratio=5000) == HOLDS
    assert rule_sparse(Comparison(1e-4, 0.5e-4, 1.5e-4), ratio=800) == FAILS
    assert rule_sparse(Comparison(0.088, 0.08, 0.09), ratio=10) == FAILS
    assert rule_sparse(Comparison(2e-4, 1e-4, 3e-4), ratio=5000) == INCONCLUSIVE


@pytest.mark.parametrize(
    ("a", "b", "start", "final"),
    [
        (HOLDS, HOLDS, HOLDS, HOLDS),
        (FAILS, FAILS, INCONCLUSIVE, FAILS),  # an undecided start point does not overturn two agreeing sets
        (HOLDS, HOLDS, FAILS, "inconclusive (flips with the start point)"),
        (HOLDS, FAILS, HOLDS, "inconclusive (seed sets disagree)"),
        (HOLDS, INCONCLUSIVE, HOLDS, "inconclusive (seed sets disagree)"),
        (INCONCLUSIVE, INCONCLUSIVE, HOLDS, "inconclusive (CI straddles the boundary)"),
    ],
)
def test_final_verdict_needs_both_seed_sets(a: str, b: str, start: str, final: str) -> None:
    assert final_verdict(a, b, start) == final


def test_seed_sets_are_disjoint_and_verdict_seeds_fresh() -> None:
    assert split_seeds(list(range(100, 116))) == (list(range(100, 108)), list(range(108, 116)))
    assert split_seeds([1, 2, 3]) == ([1, 2], [3])
    with pytest.raises(ValueError, match="disjoint"):
        split_seeds([1, 1])
    plan = paper.verdict_plan(quick=False)
    assert [(s.name, s.init_seed) for s in plan] == [("A", 0), ("B", 0), ("A'", 1)]
    assert not set(plan[0].seeds) & set(plan[1].seeds) and plan[2].seeds == plan[0].seeds
    assert [len(s.seeds) for s in paper.verdict_plan(quick=True)] == [2, 2, 2]
    paper.check_fresh([0, 1, 2], plan)
    with pytest.raises(RloptError, match="verdict seeds"):
        paper.check_fresh([0, 100], plan)


@pytest.mark.parametrize(
    ("mean", "half", "pct", "text"),
    [
        (0.5723, 0.0471, False, "0.572 ± 0.047"),
        (0.62, 3.4e-16, False, "0.62 ± 0"),  # rounding-level spread reads as none
        (0.62, 0.0, False, "0.62 ± 0"),
        (0.62, math.nan, False, "0.62"),
        (0.088, 0.0123, True, "8.8% ± 1.2%"),
        (0.877, 0.0004, True, "87.700% ± 0.040%"),  # 2 significant digits of the half-width
        (0.5, 0.31, False, "0.50 ± 0.31"),
        (1.464e-4, 1.6e-6, False, "0.000146 ± 1.6e-06"),
        (math.nan, 0.1, False, "n/a"),
    ],
)
def test_ci_formatting(mean: float, half: float, pct: bool, text: str) -> None:
    assert fmt_ci(mean, half, pct) == text


def test_interval_formatting() -> None:
    assert fmt_interval(Comparison(-0.0435, -0.086, -0.001)) == "-0.043 [-0.086, -0.001]"
    assert fmt_interval(Comparison(0.1, 0.1, 0.1)) == "+0.100 [+0.100, +0.100]"
    assert fmt_interval(Comparison(0.1, math.nan, math.nan)) == "+0.1 (no CI: one seed)"
    assert mean_ci([0.3, 0.3, 0.3]) == (pytest.approx(0.3), 0.0)


def test_matched_norm_interpolates_in_log_log() -> None:
    # (0.1, 1%) and (1.0, 10%): a power law with slope 1, so at 0.316 the fraction is 3.16%
    assert at_matched_norm([(0.1, 0.01), (1.0, 0.1)], math.sqrt(0.1)) == pytest.approx(math.sqrt(0.1) / 10)
    assert at_matched_norm([(0.1, 0.01), (1.0, 0.1)], 5.0) is None


@pytest.mark.slow
def test_paper_quick_writes_the_report_from_run_folders(
    tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    tiny = [o for o in tiny_overrides if not o.startswith(("train.eval_every", "train.checkpoint_every"))]
    sets = [
        x for o in [*tiny, "train.steps=2", "train.eval_every=2", "sft.batch_size=8"] for x in ("--set", o)
    ]
    args = ["paper", "--quick", "--out", str(tmp_path), "--widths", "32,64", "--probe-steps", "2", *sets]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    root = tmp_path / "paper"
    report = (root / "REPORT.md").read_text()
    for heading in (
        "## Verdicts",
        "## How the verdicts",
        "## 1-2.",
        "## 3.",
        "## 4.",
        "## 5.",
        "## 6.",
        "## 9.",
    ):
        assert heading in report
    for figure in (
        "fig_per_layer.png",
        "fig_probe.png",
        "fig_scale.png",
        "fig_ulp_ratio.png",
        "select/accuracy_vs_lr.png",
        "select/curves_best_lr.png",
        "select/update_fraction.png",
    ):
        assert (root / figure).stat().st_size > 1000, figure
    # quick: selection SGD/AdamW x 2 lrs x 2 objectives x 1 seed; verdict 2 objectives x SGD/AdamW x
    # (sets A, B and A' of 2 seeds each), AdamW with the probe; 2 widths x 2 optimizers; 2 regime runs
    assert len(list((root / "select").glob("*/summary.json"))) == 8
    assert len(list((root / "verdict").glob("*/summary.json"))) == 24
    assert len(list((root / "verdict").glob("*__adamw__*/probe/step-000002.json"))) == 12
    assert len(list((root / "scale").glob("*/summary.json"))) == 4
    assert len(list((root / "regime").glob("*/summary.json"))) == 2
    plan = json.loads((root / "verdict" / "plan.json").read_text())
    assert [(s["name"], s["init_seed"], s["seeds"]) for s in plan["sets"]] == [
        ("A", 0, [100, 101]),
        ("B", 0, [102, 103]),
        ("A'", 1, [100, 101]),
    ]
    assert len(list((root / "verdict").glob("*__init1/summary.json"))) == 8

    # every verdict is one of the three, with one per seed set beside it
    verdicts = json.loads((root / "verdicts.json").read_text())
    assert len(verdicts) == 13
    decided = {k: v for k, v in verdicts.items() if v["sets"]["A"]}  # 4, 7, 8 are measured once
    assert len(decided) == 10
    for v in decided.values():
        assert v["verdict"].split(" (")[0] in ("holds", "does not hold", "inconclusive")

    # numbers in the report are the run folders' numbers: sets A+B pooled (warm-up seed 0)
    def pooled(pattern: str, key: str) -> list[float]:
        paths = sorted((root / "verdict").glob(pattern))
        return [json.loads(p.read_text())[key] for p in paths if "__init0" in str(p)]

    sgd = pooled("grpo__sgd__*/summary.json", "sparsity/bitwise_frac")
    shown = verdicts["3b. RL: SGD changes fewer parameters than AdamW"]["rlopt"]
    assert f"SGD {fmt_ci(*mean_ci(sgd), pct=True)}" in shown
    cos = pooled("grpo__adamw__*/probe/step-000002.json", "cos_m_prev_g")
    momentum = next(v for k, v in verdicts.items() if k.startswith("5a."))
    assert f"RL {fmt_ci(*mean_ci(cos))}" in momentum["rlopt"]
    memory = json.loads((root / "memory.json").read_text())
    assert memory["adamw"]["state_bytes_per_param"] == pytest.approx(8, abs=0.01)
    assert memory["sgd"]["state_bytes_per_param"] == 0

    # rerunning resumes: every run is done, only the report is rewritten
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    assert "select: 8 of 8 runs done; running 0" in again.output
    assert "verdict: 24 of 24 runs done; running 0" in again.output


def _runs(rows: list[tuple[str, str, int, int, float, float]]) -> object:
    import pandas as pd

    cols = ["objective", "optimizer", "seed", "init_seed", "final_acc", "bitwise_frac"]
    df = pd.DataFrame(rows, columns=cols)
    df["lr"] = 1e-3
    df["run_dir"] = [f"/nowhere/{i}" for i in range(len(df))]
    return df


def test_claims_are_decided_per_seed_set_then_combined() -> None:
    from rlopt_cli.study import paper_verdicts as pv

    # set A: SGD - AdamW = -0.01, 0, -0.02, +0.01 (mean -0.005, sd 0.0129, t_3 3.182: CI [-0.026, +0.016],
    # above -0.05: holds); set B: -0.10 each but one -0.12 (CI wholly below -0.05: does not hold)
    a = [("grpo", "sgd", s, 0, acc, 0.1) for s, acc in zip(range(4), [0.60, 0.62, 0.58, 0.61], strict=True)]
    a += [
        ("grpo", "adamw", s, 0, acc, 0.9) for s, acc in zip(range(4), [0.61, 0.62, 0.60, 0.60], strict=True)
    ]
    b = [("grpo", "sgd", s, 0, acc, 0.1) for s, acc in zip(range(4, 8), [0.5, 0.5, 0.5, 0.48], strict=True)]
    b += [("grpo", "adamw", s, 0, 0.6, 0.9) for s in range(4, 8)]
    sets = {"A": _runs(a), "B": _runs(b), "A'": _runs(a), "A+B": _runs(a + b)}
    claim = pv.accuracy("grpo")
    result = claim(sets["A"])
    assert result.verdict == HOLDS and result.key == "-0.005 [-0.026, +0.016]"
    assert result.half == pytest.approx(3.182 * 0.012910 / 2, rel=1e-3)
    assert claim(sets["B"]).verdict == FAILS
    decision = pv.decide(claim, sets)
    assert decision.final == "inconclusive (seed sets disagree)"
    assert pv.decide(claim, {**sets, "B": sets["A"]}).final == HOLDS
    # sparsity: AdamW - SGD = 0.8 in every pair (a zero-width CI above 0)
    sparse = pv.sparse_qualitative("grpo")(sets["A"])
    assert sparse.verdict == HOLDS and "SGD 10% ± 0%" in sparse.text and "9x" in sparse.text
    assert pv.sparse_quantitative(sets["A"]).verdict == FAILS  # 10% changed, 9x: far from < 0.02%, > 1000x
    assert pv.accuracy("sft")(sets["A"]).verdict.startswith(INCONCLUSIVE)  # no SFT runs in the set
