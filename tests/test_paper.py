"""`rlopt paper --quick` end to end on a tiny budget, and the study's pure helpers against hand numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlopt_cli.cli import app
from rlopt_cli.study import paper
from rlopt_cli.study.paper_analysis import (
    at_matched_norm,
    compare_means,
    verdict_clearly_below,
    verdict_not_below,
)

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


def test_welch_comparison_and_verdicts() -> None:
    # means 0.5 and 0.55, sample variances 0.0016 -> se sqrt(2 * 0.0016 / 3) = 0.0327, df 4 -> t 2.776:
    # CI -0.05 +- 0.0907 = [-0.141, +0.041] reaches above 0: within noise
    c = compare_means([0.46, 0.50, 0.54], [0.51, 0.55, 0.59])
    assert c.diff == pytest.approx(-0.05)
    assert c.high - c.diff == pytest.approx(2.776 * math.sqrt(2 * 0.0016 / 3), rel=1e-3)
    assert verdict_not_below(c) == "holds"
    # spreads of 0.02: CI -0.05 +- 0.0453 = [-0.095, -0.005] lies below 0
    assert (
        verdict_not_below(compare_means([0.48, 0.50, 0.52], [0.53, 0.55, 0.57]))
        == "does not hold at this scale"
    )
    clear = compare_means([0.10, 0.11, 0.12], [0.50, 0.51, 0.52])
    assert (
        verdict_clearly_below(clear) == "holds" and verdict_not_below(clear) == "does not hold at this scale"
    )
    assert verdict_clearly_below(compare_means([0.6, 0.61], [0.5, 0.52])) == "does not hold at this scale"
    assert verdict_not_below(compare_means([0.5], [0.4])) == "inconclusive (one seed)"


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
    for heading in ("## Verdicts", "## 1-2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7.", "## 8.", "## 9."):
        assert heading in report
    for figure in (
        "fig_per_layer.png",
        "fig_probe.png",
        "fig_scale.png",
        "fig_ulp_ratio.png",
        "grid/accuracy_vs_lr.png",
        "grid/curves_best_lr.png",
        "grid/update_fraction.png",
    ):
        assert (root / figure).stat().st_size > 1000, figure
    # quick: 4 optimizers x 2 lrs x 2 objectives x 1 seed; 2 probe, 2 widths x 2 optimizers, 2 regime runs
    assert len(list((root / "grid").glob("*/summary.json"))) == 16
    assert len(list((root / "probe").glob("*/probe/step-000002.json"))) == 2
    assert len(list((root / "scale").glob("*/summary.json"))) == 4
    assert len(list((root / "regime").glob("*/summary.json"))) == 2

    # numbers in the report are the run folders' numbers
    verdicts = json.loads((root / "verdicts.json").read_text())
    assert len(verdicts) == 12
    sgd = [json.loads(p.read_text()) for p in (root / "grid").glob("grpo__sgd__*/summary.json")]
    shown = verdicts["3b. RL: SGD changes fewer parameters than AdamW"]["rlopt"]
    assert any(f"SGD {100 * s['sparsity/bitwise_frac']:.4g}%" in shown for s in sgd)
    probe = json.loads(next((root / "probe").glob("grpo__*/probe/step-000002.json")).read_text())
    assert f"RL {probe['cos_m_prev_g']:.3g}" in verdicts["5. Momentum/adaptivity matter less in RL"]["rlopt"]
    memory = json.loads((root / "memory.json").read_text())
    assert memory["adamw"]["state_bytes_per_param"] == pytest.approx(8, abs=0.01)
    assert memory["sgd"]["state_bytes_per_param"] == 0

    # rerunning resumes: every run is done, only the report is rewritten
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "grid: 16 of 16 runs done; running 0" in again.output
