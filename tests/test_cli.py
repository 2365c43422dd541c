"""The CLI as a user meets it: fast help without torch, one-line errors with exit 2, train and eval end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlopt_cli.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_importing_the_cli_pulls_in_no_torch() -> None:
    code = (
        "import sys, rlopt_cli.cli\n"
        "print([m for m in ('torch', 'transformers', 'pandas', 'ray', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["demo"]])
def test_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer", "adan"], "unknown optimizer 'adan'; choose one of sgd, adamw, rmsprop"),
        (["--lr", "0"], "must be a positive number"),
        (["--lr", "-0.1"], "must be a positive number"),
        (["--set", "grpo.num_generation=4"], "did you mean: grpo.num_generations"),
        (["--set", "grpo.batch_size=12"], "not divisible by grpo.num_generations"),
        (["--recipe", "no/such.toml"], "recipe not found: no/such.toml"),
        (["--objective", "ppo"], "train.objective = 'ppo' is not one of grpo, sft"),
    ],
)
def test_train_bad_input(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--out", str(tmp_path), *args])
    assert message in one_line_error(result)
    assert not any(tmp_path.iterdir())  # nothing written for a bad command


def test_train_malformed_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[train]\nsteps = 3\nseed = [\n")
    assert "line 4" in one_line_error(runner.invoke(app, ["train", "--recipe", str(recipe)]))


def test_eval_bad_input(tmp_path: Path) -> None:
    assert "checkpoint not found" in one_line_error(runner.invoke(app, ["eval", str(tmp_path / "nope")]))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"not really")
    msg = one_line_error(runner.invoke(app, ["eval", str(empty)]))
    assert "no model.safetensors" in msg and "pytorch_model.bin" in msg
    assert "is a pickle" in one_line_error(runner.invoke(app, ["eval", str(empty / "pytorch_model.bin")]))


def test_a_changed_config_never_overwrites_a_run(tmp_path: Path, tiny_overrides: list[str]) -> None:
    sets = [x for o in tiny_overrides for x in ("--set", o)]
    first = runner.invoke(app, ["train", "--out", str(tmp_path), "--steps", "2", *sets])
    assert first.exit_code == 0, first.output
    sets_changed = [*sets, "--set", "grpo.epsilon=0.3"]
    again = runner.invoke(app, ["train", "--out", str(tmp_path), "--steps", "2", *sets_changed])
    assert "different config (grpo.epsilon: 0.2 -> 0.3)" in one_line_error(again)


@pytest.mark.slow
def test_train_then_eval(tmp_path: Path, tiny_overrides: list[str]) -> None:
    sets = [x for o in tiny_overrides for x in ("--set", o)]
    args = [
        "train",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--seed",
        "3",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    result = runner.invoke(app, [*args, *sets])
    assert result.exit_code == 0, result.output
    run = tmp_path / "arithmetic__grpo__adamw__lr0.001__s3"
    summary = json.loads((run / "summary.json").read_text())

    result = runner.invoke(app, ["eval", str(run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    # the run folder means its last checkpoint, evaluated on the task its rlopt.toml names
    assert report["checkpoint"].endswith("step-000002")
    assert report["n"] == 25  # single-digit addition: a quarter of the 100 problems is held out

    # step 0 holds the starting weights (bf16, as the warm model was stored): the same greedy accuracy
    result = runner.invoke(app, ["eval", str(run), "--step", "0", "--samples", "4", "--json"])
    report = json.loads(result.output)
    assert report["accuracy"] == summary["initial_accuracy"]
    assert report["samples"] == 4 and 0 <= report["sample_accuracy"] <= report["pass@4"] <= 1


@pytest.mark.slow
@pytest.mark.trajectory
def test_demo_compares_sgd_and_adamw(
    tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "220")  # rich wraps the table to the terminal width
    sets = [x for o in tiny_overrides for x in ("--set", o)]
    result = runner.invoke(app, ["demo", "--steps", "2", "--out", str(tmp_path), *sets])
    assert result.exit_code == 0, result.output
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == ["arithmetic__grpo__adamw__lr3e-05__s0", "arithmetic__grpo__sgd__lr0.003__s0"]
    table = result.output
    for word in ("optimizer", "sgd", "adamw", "0.0 B/param", "8.0 B/param", "params changed"):
        assert word in table
