"""Nothing a user does bricks a run: kill -9 at every phase of a real run, then rerun, and the run ends bitwise
equal to an uninterrupted one; one process owns a folder at a time; a sweep's workers die with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rlopt_cli.cli import app
from rlopt_cli.config.recipes import load_config
from rlopt_cli.runtime.folder_lock import owner_pid
from rlopt_cli.runtime.kill_points import ENV
from rlopt_cli.training import loop as trainer
from rlopt_cli.training.tracking import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
# AdamW, so the optimizer holds state that a resume must restore; checkpoints at 0, 2 and 4 (TINY)
ADAMW = ["optimizer.name='adamw'", "optimizer.lr=1e-3", "train.steps=4", "train.run_name=run"]


def quiet(message: str) -> None:
    pass


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "trainer_state.safetensors") | {
        f"export.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()
    }


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise the same checkpoints (master weights, optimizer state, RNG, exported weights) and metrics."""
    steps = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == steps
    for step in steps:
        x, y = tensors(a / "checkpoints" / step), tensors(b / "checkpoints" / step)
        assert x.keys() == y.keys()
        different = [k for k in x if not torch.equal(x[k], y[k])]
        assert not different, (step, different[:5])
    assert deterministic(read_metrics(a)) == deterministic(read_metrics(b))
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    for key in ("wall_time_s", "peak_mem_bytes"):
        sa.pop(key), sb.pop(key)
    assert sa == sb


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, shared by the kill tests (it also warms the embedded model's cache, which the killed
    runs then share); the cache is the one conftest's per-test fixture points RLOPT_CACHE at."""
    from tests.conftest import TINY

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RLOPT_CACHE", str(tmp_path_factory.getbasetemp() / "rlopt-cache"))
        out = tmp_path_factory.mktemp("straight")
        return trainer.train(load_config(None, [*TINY, *ADAMW]), out, quiet)


def train_command(out: Path, overrides: list[str]) -> list[str]:
    sets = [x for o in overrides for x in ("--set", o)]
    return [sys.executable, "-m", "rlopt_cli.cli", "train", "--out", str(out), *sets]


@pytest.mark.parametrize(
    "phase",
    # start-up (folder claimed, nothing trained); inside the step-0 save; after step 0 (saved, evaluated); after
    # step 1, before the first periodic checkpoint; inside the step-2 save; after step 3 (its row logged, its
    # update past the last checkpoint)
    ["startup", "checkpoint-0", "step-0", "step-1", "checkpoint-2", "step-3"],
)
def test_a_run_killed_at_any_phase_resumes_bitwise_equal(
    tmp_path: Path, tiny_overrides: list[str], reference: Path, phase: str
) -> None:
    overrides = [*tiny_overrides, *ADAMW]
    out = tmp_path / "killed"
    killed = subprocess.run(
        train_command(out, overrides),
        cwd=REPO,
        env={**os.environ, ENV: phase},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]  # it got to the phase and died there
    run = out / "run"
    assert (run / "config.toml").is_file() and not (run / "summary.json").exists()

    said: list[str] = []
    resumed = trainer.train(load_config(None, overrides), out, said.append)
    assert_same_run(reference, resumed)
    if phase not in ("startup", "checkpoint-0"):  # with no complete checkpoint it starts over, as it should
        assert any(m.startswith("resuming run from step") for m in said), said


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that owns `folder` (as a running train or sweep would) until it is killed."""
    code = (
        "import sys, time; from pathlib import Path; from rlopt_cli.runtime.folder_lock import FolderLock\n"
        "lock = FolderLock(Path(sys.argv[1]), 'test').__enter__(); print('held', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_one_owner_per_run_folder_and_sweep_folder(tmp_path: Path, tiny_overrides: list[str]) -> None:
    sets = [x for o in [*tiny_overrides, "train.steps=1", "train.run_name=run"] for x in ("--set", o)]
    run = tmp_path / "run"
    owner = hold_lock(run)
    try:
        result = runner.invoke(app, ["train", "--out", str(tmp_path), *sets])
        assert result.exit_code == 3, result.output
        assert f"in use by another rlopt process (pid {owner.pid})" in result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the second process wrote nothing

        sweep = tmp_path / "s.toml"
        sweep.write_text('[sweep]\nname = "s"\n[grid]\nseeds = [0]\n[grid.optimizers.sgd]\nlr = [0.01]\n')
        sweep_owner = hold_lock(tmp_path / "sweeps" / "s")
        try:
            result = runner.invoke(app, ["sweep", str(sweep), "--out", str(tmp_path / "sweeps")])
            assert result.exit_code == 3, result.output
            assert f"(pid {sweep_owner.pid})" in result.output and "Traceback" not in result.output
            assert sorted(p.name for p in (tmp_path / "sweeps" / "s").iterdir()) == [".lock"]
        finally:
            sweep_owner.kill()
            sweep_owner.wait()
    finally:
        owner.kill()  # kill -9: the OS drops its lock
        owner.wait()
    result = runner.invoke(app, ["train", "--out", str(tmp_path), *sets])
    assert result.exit_code == 0, result.output
    assert (run / "summary.json").is_file()


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sweep_workers_die_with_a_killed_sweep(tmp_path: Path, tiny_overrides: list[str]) -> None:
    import tomli_w

    from rlopt_cli.config.recipes import parse_override

    data: dict = {"sweep": {"name": "s"}, "grid": {"seeds": [0], "optimizers": {"sgd": {"lr": [0.01]}}}}
    for item in tiny_overrides:
        key, value = parse_override(item)
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    data["train"]["steps"] = 1000  # long enough that the cell is still training when its sweep is killed
    sweep = tmp_path / "s.toml"
    sweep.write_text(tomli_w.dumps(data))
    cell = tmp_path / "s" / "grpo__sgd__lr0.01__s0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlopt_cli.cli", "sweep", str(sweep), "--out", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = None
    try:
        deadline = time.time() + 120
        while worker is None or worker == proc.pid or not (cell / "checkpoints" / "step-000000").is_dir():
            assert time.time() < deadline and proc.poll() is None, "the cell never started training"
            time.sleep(0.05)
            worker = owner_pid(cell)
    finally:
        proc.kill()  # kill -9 of the sweep process only, not its process group
        proc.wait()
    deadline = time.time() + 30
    try:
        while not gone(worker):
            assert time.time() < deadline, f"worker {worker} outlived its sweep"
            time.sleep(0.1)
    finally:
        if not gone(worker):  # leave no orphan behind when the test fails
            os.kill(worker, signal.SIGKILL)
    assert not (cell / "summary.json").exists()
    from rlopt_cli.errors import EnvironmentFailure
    from rlopt_cli.runtime.folder_lock import FolderLock

    # both folders come free (a killed process's main thread can show as a zombie while its other threads, which
    # share the lock's file, are still exiting: hence the retries)
    while True:
        try:
            with FolderLock(cell, "run"), FolderLock(tmp_path / "s", "sweep"):
                break
        except EnvironmentFailure:
            assert time.time() < deadline, "the killed sweep's folders stayed locked"
            time.sleep(0.1)


@pytest.mark.parametrize(
    ("wanted", "rank", "killed"),
    [
        ("shard-4", None, True),  # one process: no RANK
        ("shard-4", "1", True),  # unqualified: every rank that reaches the point
        ("shard-4@rank1", "1", True),
        ("shard-4@rank1", "0", False),  # the other ranks live on
        ("shard-4@rank0", None, True),  # one process is rank 0
        ("shard-2@rank1", "1", False),
        ("shard-4@1", "1", False),
    ],
)
def test_a_kill_point_qualified_by_rank_kills_that_rank_only(
    wanted: str, rank: str | None, killed: bool
) -> None:
    env = (
        {k: v for k, v in os.environ.items() if k != "RANK"}
        | {ENV: wanted}
        | ({"RANK": rank} if rank else {})
    )
    code = "from rlopt_cli.runtime.kill_points import kill_point; kill_point('shard-4')"
    done = subprocess.run([sys.executable, "-c", code], env=env | {"PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == (-signal.SIGKILL if killed else 0)
