"""Sweeps: grid expansion, bad input, dry run, and the local/ray/slurm launchers end to end on tiny runs.

The end-to-end tests run recipes/sweep_smoke.toml (2 optimizers x 1 lr x 2 seeds, 3 GRPO steps on a
random-init model), with the sweep folder under tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlopt_cli.cli import app
from rlopt_cli.config.recipes import to_dict, to_toml
from rlopt_cli.errors import RloptError
from rlopt_cli.study.sweep import load_sweep, select

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "sweep_smoke.toml"
DEFAULT = REPO / "recipes" / "default.toml"
WIDE = {"COLUMNS": "200"}  # rich tables at full width, so run names are not cut


def write_sweep(tmp_path: Path, body: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'# rlopt sweep {name}\n[sweep]\nname = "t"\nbase = "{DEFAULT}"\n{body}')
    return path


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args), env=WIDE)


# ---------------------------------------------------------------------------------------------------------------
# expansion and validation


def test_lr_grid_expands_to_readable_unique_names() -> None:
    sweep = load_sweep(REPO / "recipes" / "lr_grid.toml")
    assert len(sweep.cells) == (4 + 3 + 3 + 3) * 2 * 3  # lrs per optimizer x objectives x seeds
    names = [c.name for c in sweep.cells]
    assert len(set(names)) == len(names)
    by_name = {c.name: c for c in sweep.cells}
    momentum = by_name["grpo__sgd_momentum__lr0.01__s2"].config
    assert (momentum.optimizer.name, momentum.optimizer.momentum, momentum.optimizer.lr) == ("sgd", 0.9, 0.01)
    assert momentum.train.run_name == "grpo__sgd_momentum__lr0.01__s2"
    assert momentum.log.wandb_group == "lr_grid" and not momentum.log.wandb and not momentum.log.progress
    assert by_name["sft__adamw__lr1e-05__s0"].config.train.objective == "sft"
    assert (
        by_name["sft__adamw__lr1e-05__s0"].config.optimizer.momentum is None
    )  # nothing leaks across variants
    assert {c.axes["variant"] for c in sweep.cells} == {"sgd", "sgd_momentum", "adamw", "rmsprop"}
    assert len(load_sweep(SMOKE).cells) == 4


@pytest.mark.parametrize("name", ["smollm2_arith_scan.toml", "smollm2_arith.toml"])
def test_real_model_sweeps_expand_to_the_chat_arithmetic_task(name: str) -> None:
    cells = load_sweep(REPO / "recipes" / "real" / name).cells
    assert {c.config.optimizer.name for c in cells} == {"sgd", "adamw"}
    for cell in cells:
        cfg = cell.config
        assert cfg.model.name_or_path == "asset:smollm2-135m-instruct"
        assert (cfg.task.prompt_style, cfg.task.chat_template, cfg.log.update_norm) == (
            "instruct",
            True,
            True,
        )
    # the scan chooses lrs on other problems than the study's
    assert cells[0].config.task.split_seed == (1 if "scan" in name else 0)


def test_list_fields_and_extra_axes_enter_the_names(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path,
        "[grid]\nseeds = [0]\ngrpo.beta = [0.0, 0.04]\n"
        "[grid.optimizers.adamw]\nlr = [1e-5]\nbetas = [[0.9, 0.95], [0.9, 0.999]]\n",
    )
    names = sorted(c.name for c in load_sweep(path).cells)
    assert names == [
        "grpo__adamw__lr1e-05__s0__betas0.9,0.95__beta0",
        "grpo__adamw__lr1e-05__s0__betas0.9,0.95__beta0.04",
        "grpo__adamw__lr1e-05__s0__betas0.9,0.999__beta0",
        "grpo__adamw__lr1e-05__s0__betas0.9,0.999__beta0.04",
    ]
    template = write_sweep(
        tmp_path,
        'run_name = "{variant}-{lr:g}-{seed}"\n[grid]\nseeds = [3]\n[grid.optimizers.sgd]\nlr = [0.5]\n',
        "t.toml",
    )
    assert [c.name for c in load_sweep(template).cells] == ["sgd-0.5-3"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[grid]\nseeds = [0]\n", "empty grid"),
        ("[grid]\nseeds = []\n[grid.optimizers.sgd]\nlr = [0.1]\n", "empty grid"),
        (
            "[grid]\nseeds = [0]\n[grid.optimizers.sgdd]\nlr = [0.1]\n",
            "unknown optimizer 'sgdd'.*did you mean",
        ),
        ("[grid]\nseeds = [0]\n[grid.optimizers.sgd]\nlr = [-0.1]\n", "not a positive number"),
        ("[grid]\nseeds = [0]\n[grid.optimizers.sgd]\nlr = ['fast']\n", "not a positive number"),
        ("[grid]\nseeds = [0]\n[grid.optimizers.sgd]\nmomentum = 0.9\n", "needs lr"),
        ("[grid]\nseeds = [0]\n[grid.optimizers.sgd]\nlr = [0.1]\nbetas = [0.9, 0.9]\n", "has no argument"),
        (
            "[grid]\nseeds = [0]\n[grid.optimizers.sgd]\nlr = [0.1]\nmomentun = 0.9\n",
            "unknown optimizer field",
        ),
        (
            '[grid]\nseeds = [0]\n"grpo.bta" = [0.1]\n[grid.optimizers.sgd]\nlr = [0.1]\n',
            "unknown config key",
        ),
        ('[grid]\nseeds = [0]\n"grpo.beta" = 0.1\n[grid.optimizers.sgd]\nlr = [0.1]\n', "must be a list"),
        ('[grid]\n"optimizer.lr" = [0.1]\n[grid.optimizers.sgd]\nlr = [0.1]\n', "belong in"),
        ("[trian]\nsteps = 3\n[grid.optimizers.sgd]\nlr = [0.1]\n", "unknown config section"),
        ("[grid.optimizers.sgd]\nlr = [0.1\n", "malformed TOML.*line"),
        ('launcher = "k8s"\n[grid.optimizers.sgd]\nlr = [0.1]\n', "launcher"),
    ],
)
def test_bad_sweep_files_are_one_line_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(RloptError, match=message) as err:
        load_sweep(write_sweep(tmp_path, body))
    assert "\n" not in str(err.value)


def test_only_selects_cells_and_rejects_unknown_axes() -> None:
    cells = load_sweep(REPO / "recipes" / "lr_grid.toml").cells
    picked = select(cells, ["variant=sgd", "lr=0.01", "seed=0", "seed=1"])
    assert sorted(c.name for c in picked) == [
        "grpo__sgd__lr0.01__s0",
        "grpo__sgd__lr0.01__s1",
        "sft__sgd__lr0.01__s0",
        "sft__sgd__lr0.01__s1",
    ]
    assert len(select(cells, ["train.objective=sft"])) == 39
    with pytest.raises(RloptError, match="not an axis"):
        select(cells, ["colour=red"])


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path) -> None:
    result = invoke("sweep", str(SMOKE), "--dry-run", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    for name in ("grpo__sgd__lr0.01__s0", "grpo__adamw__lr0.0001__s1"):
        assert name in result.output
    assert result.output.count(" new ") == 4
    assert not (tmp_path / "sweep_smoke").exists()


def test_changed_cell_and_foreign_folder_are_errors_before_running(tmp_path: Path) -> None:
    cell = load_sweep(SMOKE).cells[0]
    run_dir = tmp_path / "sweep_smoke" / cell.name
    run_dir.mkdir(parents=True)
    changed = to_dict(cell.config)
    changed["train"]["steps"] = 99
    from rlopt_cli.config.recipes import from_dict

    (run_dir / "config.toml").write_text(to_toml(from_dict(changed)))
    dry = invoke("sweep", str(SMOKE), "--dry-run", "--out", str(tmp_path))
    assert dry.exit_code == 2 and "changed" in dry.output
    result = invoke("sweep", str(SMOKE), "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "changed since it ran (train.steps: 99 -> 3)" in result.output
    assert not (tmp_path / "sweep_smoke" / "sweep.toml").exists()  # refused before claiming the folder

    (tmp_path / "sweep_smoke" / "sweep.toml").write_text('[sweep]\nname = "other"\n')
    result = invoke("sweep", str(SMOKE), "--out", str(tmp_path))
    assert result.exit_code == 2 and "holds another sweep ('other'" in result.output


def test_missing_extra_names_the_pip_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = invoke("sweep", str(SMOKE), "--launcher", "ray", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "pip install -e '.[ray]'" in result.output


def test_cli_import_stays_light() -> None:
    code = (
        "import sys, rlopt_cli.cli; "
        "print(sorted(m for m in ('torch', 'pandas', 'ray', 'matplotlib', 'submitit') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# end to end


def assert_finished(sweep_dir: Path, cells: int, steps: int = 3) -> None:
    summaries = sorted(sweep_dir.glob("*/summary.json"))
    assert len(summaries) == cells
    for path in summaries:
        rows = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(steps + 1))  # every step exactly once
        config = (path.parent / "config.toml").read_text()
        assert f'run_name = "{path.parent.name}"' in config and 'wandb_group = "sweep_smoke"' in config


@pytest.mark.slow
def test_local_launcher_runs_skips_finished_and_reports(tmp_path: Path) -> None:
    result = invoke("sweep", str(SMOKE), "--workers", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "sweep_smoke"
    assert_finished(sweep_dir, 4)
    for name in ("sweep.toml", "report.csv", "report.parquet", "report.md", "accuracy_vs_lr.png"):
        assert (sweep_dir / name).is_file()
    assert "best lr" in result.output
    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.jsonl")}

    again = invoke("sweep", str(SMOKE), "--out", str(tmp_path))
    assert again.exit_code == 0, again.output
    assert "4 of 4 cells done; running 0" in again.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained
    dry = invoke("sweep", str(SMOKE), "--dry-run", "--out", str(tmp_path))
    assert dry.output.count(" done ") == 4


@pytest.mark.slow
def test_forked_cells_train_what_fresh_interpreters_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local pool forks each cell from a server that imported torch and transformers in advance (~7 s a cell
    saved); a forked cell must run the pinned kernels and train the same weights, bit for bit, as a cell in a fresh
    interpreter."""
    import multiprocessing

    from rlopt_cli.study import launchers

    only = ["--only", "variant=sgd", "--only", "seed=0"]
    forked = invoke("sweep", str(SMOKE), *only, "--out", str(tmp_path / "forked"))
    assert forked.exit_code == 0, forked.output
    assert launchers._fork_server_isa == ["avx2"]  # the fork server did run these cells
    monkeypatch.setattr(
        launchers, "pool_context", lambda jobs: (multiprocessing.get_context("spawn"), os.getpid())
    )
    fresh = invoke("sweep", str(SMOKE), *only, "--out", str(tmp_path / "fresh"))
    assert fresh.exit_code == 0, fresh.output
    cell = Path("sweep_smoke") / "grpo__sgd__lr0.01__s0"
    runs = [tmp_path / "forked" / cell, tmp_path / "fresh" / cell]
    weights = [(r / "checkpoints" / "step-000003" / "model.safetensors").read_bytes() for r in runs]
    assert weights[0] == weights[1]
    kernels = [json.loads((r / "meta.json").read_text())["sessions"][0]["cpu_kernels"] for r in runs]
    assert kernels[0] == kernels[1] and kernels[0]["pinned"]


@pytest.mark.slow
def test_killed_sweep_resumes_the_partial_cell(tmp_path: Path) -> None:
    """kill -9 the whole sweep (main process and worker) after the cell's first checkpoint, then rerun."""
    path = tmp_path / "kill.toml"
    path.write_text(SMOKE.read_text().replace('base = "default.toml"', f'base = "{DEFAULT}"'))
    path.write_text(path.read_text().replace("steps = 3", "steps = 40"))
    args = ["sweep", str(path), "--only", "variant=sgd", "--only", "seed=0", "--out", str(tmp_path)]
    cell = tmp_path / "sweep_smoke" / "grpo__sgd__lr0.01__s0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlopt_cli.cli", *args],
        start_new_session=True,  # its own process group: the kill reaches the pool's worker too
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (cell / "checkpoints" / "step-000002").is_dir():
            assert time.time() < deadline and proc.poll() is None, (
                "the cell never reached its first checkpoint"
            )
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (cell / "summary.json").exists(), "the cell finished before the kill; raise train.steps"
    dry = invoke("sweep", *args[1:], "--dry-run")
    assert " partial " in dry.output

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert_finished(tmp_path / "sweep_smoke", 1, steps=40)
    log = (tmp_path / "sweep_smoke" / "logs" / f"{cell.name}.log").read_text()
    assert "resuming grpo__sgd__lr0.01__s0 from step" in log
    assert len(json.loads((cell / "meta.json").read_text())["sessions"]) == 2


@pytest.mark.slow
def test_ray_launcher_on_a_real_local_cluster(tmp_path: Path) -> None:
    """The smoke sweep's 4 cells as Ray tasks of 1 CPU each; then, on the same cluster, a sharded cell (nproc 2)
    as a task of 2 CPUs whose 2 torchrun ranks train what one process trains (test_sharded_launch.py)."""
    from tests.test_sharded_launch import ray_sharded_cell

    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = invoke("sweep", str(SMOKE), "--launcher", "ray", "--out", str(tmp_path))
        assert result.exit_code == 0, result.output
        assert_finished(tmp_path / "sweep_smoke", 4)
        ray_sharded_cell(tmp_path / "sharded")
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_slurm_launcher_with_submitits_local_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("submitit")
    monkeypatch.setenv("RLOPT_SLURM_CLUSTER", "local")
    only = ["--only", "seed=0", "--only", "variant=sgd"]  # one array task: submitit's local polling is slow
    result = invoke("sweep", str(SMOKE), "--launcher", "slurm", *only, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert_finished(tmp_path / "sweep_smoke", 1)
    assert list((tmp_path / "sweep_smoke" / ".submitit").iterdir())  # it went through submitit
