"""Reports and plots from files only: numbers checked by hand on a fake folder of hand-written run files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlopt_cli.cli import app
from rlopt_cli.config.recipes import load_config, to_toml
from rlopt_cli.errors import RloptError
from rlopt_cli.study.report import build_report, mean_ci, t_quantile_975, variant_label, write_report

# (objective, optimizer, lr, seed, final accuracy, best accuracy)
RUNS = [
    ("grpo", "sgd", 0.01, 0, 0.5, 0.55),
    ("grpo", "sgd", 0.01, 1, 0.6, 0.65),
    ("grpo", "sgd", 0.01, 2, 0.7, 0.75),
    ("grpo", "sgd", 0.1, 0, 0.3, 0.5),
    ("grpo", "adamw", 1e-5, 0, 0.4, 0.4),
    ("grpo", "adamw", 1e-5, 1, 0.8, 0.8),
    ("sft", "sgd", 0.01, 0, 0.2, 0.2),
]


def fake_run(folder: Path, objective: str, opt: str, lr: float, seed: int, final: float, best: float) -> Path:
    name = f"{objective}__{opt}__lr{lr:g}__s{seed}"
    cfg = load_config(
        None,
        [f"train.objective={objective}", f"optimizer.name={opt}", f"optimizer.lr={lr}", f"train.seed={seed}"]
        + [f"train.run_name={name}", "train.steps=4"],
    )
    run = folder / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(cfg))
    summary = {
        "final_accuracy": final,
        "best_accuracy": best,
        "initial_accuracy": 0.1,
        "sparsity/bitwise_frac": 0.2 if opt == "sgd" else 0.9,
        "sparsity/atol_frac": 0.1,
        "state_bytes": 0 if opt == "sgd" else 800,
        "state_bytes_per_param": 0.0 if opt == "sgd" else 8.0,
        "peak_mem_bytes": 100 * 2**20,
        "wall_time_s": 10.0 + seed,
        "lr": lr,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [
        {
            "step": s,
            "train/reward_mean": final * s / 4,
            "eval/accuracy": final * s / 4,
            "sparsity/bitwise_frac": s,
        }
        for s in range(5)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "fake_sweep"
    for run in RUNS:
        fake_run(folder, *run)
    (folder / "unfinished").mkdir()  # a config without a summary: counted, left out
    (folder / "unfinished" / "config.toml").write_text(to_toml(load_config(None)))
    return folder


@pytest.mark.parametrize(("df", "t"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_tables(df: int, t: float) -> None:
    assert t_quantile_975(df) == pytest.approx(t, abs=1e-4)


def test_mean_ci_by_hand() -> None:
    mean, ci = mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert ci == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci([0.3])[1])  # one seed: no spread to estimate


def test_report_table_numbers(results: Path) -> None:
    report = build_report(results)
    assert report.unfinished == 1
    assert len(report.runs) == len(RUNS)
    t = report.table.set_index(["objective", "variant", "lr"])
    sgd = t.loc[("grpo", "sgd", 0.01)]
    assert sgd["n_seeds"] == 3
    assert sgd["final_acc_mean"] == pytest.approx(0.6)
    assert sgd["final_acc_ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert sgd["best_acc_mean"] == pytest.approx(0.65)
    assert sgd["wall_time_s"] == pytest.approx(11.0)
    assert sgd["peak_mem_mb"] == pytest.approx(100.0)
    adamw = t.loc[("grpo", "adamw", 1e-5)]
    # two seeds, 0.4 and 0.8: std = 0.2828, t_{0.975,1} = 12.706
    assert adamw["final_acc_ci95"] == pytest.approx(12.706205 * math.sqrt(0.08) / math.sqrt(2), rel=1e-5)
    assert adamw["state_bytes_per_param"] == 8.0
    assert math.isnan(t.loc[("grpo", "sgd", 0.1)]["final_acc_ci95"])

    best = report.best.set_index(["objective", "variant"])
    assert best.loc[("grpo", "sgd"), "best_lr"] == 0.01  # 0.6 beats 0.3
    assert best.loc[("grpo", "adamw"), "best_lr"] == 1e-5
    assert best.loc[("sft", "sgd"), "best_lr"] == 0.01
    assert len(best) == 3


def test_report_files_and_cli(results: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(results)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "best lr" in result.output
    for name in ("report.csv", "report.parquet", "report.md"):
        assert (results / name).is_file()
    import pandas as pd

    table = pd.read_parquet(results / "report.parquet")
    assert len(table) == 4
    assert pd.read_csv(results / "report.csv")["n_seeds"].tolist() == table["n_seeds"].tolist()
    assert "## Each optimizer at its best learning rate" in (results / "report.md").read_text()


def test_plots_hold_the_expected_series(results: Path) -> None:
    from rlopt_cli.study.plots import plot_report

    series = plot_report(build_report(results))
    for name in series:
        assert (results / name).stat().st_size > 1000
    xs, ys, errs = series["accuracy_vs_lr.png"]["grpo"]["sgd"]
    assert xs == [0.01, 0.1]
    assert ys == pytest.approx([0.6, 0.3])
    assert errs[1] == 0.0  # one seed: no bar
    steps, rewards = series["curves_best_lr.png"]["grpo train/reward_mean"]["sgd"]
    assert steps == [0, 1, 2, 3, 4]
    assert rewards[-1] == pytest.approx(0.6)  # mean over the 3 seeds at the best lr, not the 0.1 run
    assert series["curves_best_lr.png"]["sft train/loss"]["sgd"] == ([], [])  # SFT logs no reward
    lrs, fractions = series["update_fraction.png"]["vs lr"]["grpo sgd"]
    assert (lrs, fractions) == ([0.01, 0.1], pytest.approx([0.2, 0.2]))
    assert series["update_fraction.png"]["over steps"]["grpo adamw"][1] == [0, 1, 2, 3, 4]


def test_other_axes_split_rows(tmp_path: Path) -> None:
    folder = tmp_path / "betas"
    for seed, final in ((0, 0.5), (1, 0.7)):
        run = fake_run(folder, "grpo", "sgd", 0.01, seed, final, final)
        beta_run = run.with_name(run.name + "__beta0.04")
        run.rename(beta_run)
        (beta_run / "config.toml").write_text(
            to_toml(load_config(None, ["grpo.beta=0.04", f"train.seed={seed}", "train.steps=4"]))
        )
        fake_run(folder, "grpo", "sgd", 0.01, seed, final, final)
    report = build_report(folder)
    assert "grpo.beta" in report.axes
    assert sorted(report.table["grpo.beta"]) == [0.0, 0.04]
    assert report.table["n_seeds"].tolist() == [2, 2]


def test_variant_labels() -> None:
    assert variant_label({"optimizer": {"name": "sgd"}}) == "sgd"
    assert variant_label({"optimizer": {"name": "sgd", "momentum": 0.9}}) == "sgd+momentum0.9"
    assert variant_label({"optimizer": {"name": "sgd", "momentum": 0.0}}) == "sgd"
    assert variant_label({"optimizer": {"name": "adamw", "betas": [0.9, 0.95]}}) == "adamw+betas0.9,0.95"


def test_empty_folder_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(RloptError, match="no finished runs"):
        build_report(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "results folder not found" in result.output


def test_write_report_is_repeatable(results: Path) -> None:
    report = build_report(results)
    first = write_report(report)
    assert [p.name for p in first] == ["report.csv", "report.parquet", "report.md"]
    assert write_report(build_report(results)) == first  # the report's own files are not runs
