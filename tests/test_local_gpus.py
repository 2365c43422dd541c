"""GPUs for local sweep cells (rlopt_cli/study/local_gpus.py): which GPUs there are, how many a cell gets, the
pool that gives each running cell its own, and a real local sweep whose cells record what they were given."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlopt_cli.errors import RloptError
from rlopt_cli.study.local_gpus import GpuPool, gpus_per_cell, visible_gpus

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("environ", "want"),
    [
        ({}, ["0", "1", "2"]),  # unset: every GPU torch counts
        ({"CUDA_VISIBLE_DEVICES": "3,5"}, ["3", "5"]),
        ({"CUDA_VISIBLE_DEVICES": " 4 , 6 "}, ["4", "6"]),
        ({"CUDA_VISIBLE_DEVICES": ""}, []),  # set empty: no GPU at all
        ({"CUDA_VISIBLE_DEVICES": "2,-1,3"}, ["2"]),  # CUDA stops at the first invalid entry
        ({"CUDA_VISIBLE_DEVICES": "GPU-8f1a,MIG-1c2d"}, ["GPU-8f1a", "MIG-1c2d"]),  # UUIDs kept as written
    ],
)
def test_visible_gpus(environ: dict[str, str], want: list[str]) -> None:
    assert visible_gpus(environ, lambda: 3) == want


def test_gpus_per_cell_and_its_errors() -> None:
    assert gpus_per_cell(2.0, 2, ["0", "1", "2", "3"]) == 2
    assert gpus_per_cell(1, 1, ["7"]) == 1
    cases = {
        (
            1.0,
            3,
            ("0", "1"),
        ): "3 cells at once x num_gpus = 1 need 3 GPUs, but this machine shows 2 (0, 1): set --workers 2",
        (
            4.0,
            1,
            ("0", "1"),
        ): "need 4 GPUs, but this machine shows 2 (0, 1): set [sweep.resources] num_gpus <= 2",
        (1.0, 1, ()): "shows 0 (none)",
        (0.5, 2, ("0",)): "num_gpus = 0.5: the local launcher gives each cell whole GPUs",
    }
    for (num_gpus, running, ids), message in cases.items():
        with pytest.raises(RloptError, match=re.escape(message)) as err:
            gpus_per_cell(num_gpus, running, list(ids))
        assert "\n" not in str(err.value)


def test_pool_gives_each_running_cell_its_own_gpus() -> None:
    pool = GpuPool(["0", "1", "2", "3"], per_cell=2)
    a, b = pool.take(), pool.take()
    assert (a, b) == ("0,1", "2,3") and not pool.ready()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # an exited (and reaped) process: its cell's GPUs are free at once
    pool.give_back(b, dead.pid)
    assert pool.ready() and pool.take() == "2,3"
    # a cell whose process is still alive (this one) keeps its GPUs until it exits, or until the grace period
    pool.give_back(a, os.getpid())
    assert not pool.ready()
    pool.grace_s = 0.0
    pool.reclaim()
    assert pool.take() == "0,1"
    none = GpuPool([], per_cell=0)  # num_gpus = 0: the environment is left as it is
    assert none.ready() and none.take() is None
    none.give_back(None, 123)
    assert none.ready()


SWEEP = """
[sweep]
name = "gpus"
base = "{base}"
launcher = "local"
workers = 2

[sweep.resources]
num_gpus = 1                # each cell: one GPU of its own

[model]
warmup_steps = 0

[task]
n_eval = 8

[grpo]
num_generations = 4
batch_size = 8

[train]
steps = 1
device = "cpu"              # this machine may have no GPU: the cells only record what they were given

[grid]
seeds = [0, 1, 2]

[grid.optimizers.sgd]
lr = [0.01]
"""


@pytest.mark.slow
def test_local_sweep_cells_see_their_own_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three cells, two workers, one GPU each out of the sweep's CUDA_VISIBLE_DEVICES=3,5: the two cells that
    start together see different GPUs, the third one of those again. Each cell's log line is written by the
    cell's own process, from the variable CUDA will read there."""
    from rlopt_cli.cli import app

    path = tmp_path / "gpus.toml"
    path.write_text(SWEEP.format(base=REPO / "recipes" / "default.toml"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    logs = sorted((tmp_path / "gpus" / "logs").glob("*.log"))  # seeds 0, 1, 2: the order they were started
    seen = [re.findall(r"GPUs: CUDA_VISIBLE_DEVICES=(\S+)", log.read_text()) for log in logs]
    assert [len(s) for s in seen] == [1, 1, 1]
    given = [s[0] for s in seen]
    assert sorted(given[:2]) == ["3", "5"] and given[2] in ("3", "5")

    too_many = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "x"), "--workers", "3"])
    assert too_many.exit_code != 0
    assert "3 cells at once x num_gpus = 1 need 3 GPUs, but this machine shows 2 (3, 5)" in too_many.output
