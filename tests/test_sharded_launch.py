"""Sharded runs launched by others: sweep cells of several processes (`[sweep.resources] nproc`, on the local
launcher here and on Ray in test_sweep.py's Ray test), SLURM's resources for them, and one run over two torchrun
"machines" (--nnodes 2, as recipes/slurm/train_multinode.sbatch starts it), each against the one-process run
of the same config.

What must be equal, and how closely, is tests/test_sharded.py's: completions, rewards, lengths and eval accuracy
exactly; losses and gradient norms to fp32 summation order. Runs are 2 steps to keep CI short.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlopt_cli.cli import app
from rlopt_cli.config.recipes import load_config
from rlopt_cli.errors import RloptError
from rlopt_cli.study.launchers import slurm_parameters
from rlopt_cli.study.local_gpus import gpus_per_cell
from rlopt_cli.study.sweep import load_sweep, settings_from
from rlopt_cli.training import loop as trainer
from rlopt_cli.training.sharding import SHARED_WAIT_ENV
from tests.conftest import TINY
from tests.test_sharded import assert_same_run

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "recipes" / "default.toml"
WIDE = {"COLUMNS": "200"}
STEPS = 2
# test_sharded's SHARDED, 2 steps: SGD with momentum, 2 micro-batches in one process (one per rank), 2 iterations
SHARDED = [
    "rollout.seed_scope='prompt'",
    "grpo.micro_batch_size=4",
    "grpo.num_iterations=2",
    f"train.steps={STEPS}",
]


def quiet(message: str) -> None:
    pass


def sweep_file(tmp_path: Path, resources: str = "nproc = 2", overrides: list[str] | None = None) -> Path:
    """A sweep of 2 cells (seeds 0 and 1) of the tiny sharded run, as TOML sections built from the overrides."""
    sections: dict[str, dict[str, str]] = {}
    for item in [*TINY, *(SHARDED if overrides is None else overrides)]:  # a later value wins
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    body = "".join(
        f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) for s, values in sections.items()
    )
    path = tmp_path / "sharded.toml"
    path.write_text(
        f'[sweep]\nname = "sharded"\nbase = "{DEFAULT}"\nworkers = 1\n[sweep.resources]\n{resources}\n'
        f"{body}[grid]\nseeds = [0, 1]\n[grid.optimizers.sgd]\nlr = [0.01]\nmomentum = 0.9\n"
    )
    return path


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args), env=WIDE)


# ---------------------------------------------------------------------------------------------------------------
# bad input and resources


@pytest.mark.parametrize(
    ("resources", "overrides", "message"),
    [
        (
            "nproc = 2",
            [],
            "cell grpo__sgd__lr0.01__s0 cannot run on [sweep.resources] nproc = 2 processes: a "
            "sharded run needs rollout.seed_scope='prompt'",
        ),
        ("nproc = 3", SHARDED, "nproc = 3 processes: --nproc 3 must divide the prompts per step"),
        (  # 64 prompts per step, so only the cores are short
            "nproc = 64",
            [*SHARDED, "grpo.batch_size=256"],
            "nproc = 64 processes per cell, but this machine has",
        ),
        ("nproc = 2\nnum_gpus = 2", SHARDED, "each process of a sharded cell uses one GPU"),
        ("nproc = 0", SHARDED, "nproc = 0 must be >= 1"),
        ("nprocs = 2", SHARDED, "unknown key [sweep.resources] nprocs; did you mean: nproc?"),
    ],
)
def test_a_grid_that_cannot_run_sharded_is_refused_before_any_cell(
    tmp_path: Path, resources: str, overrides: list[str], message: str
) -> None:
    result = invoke("sweep", str(sweep_file(tmp_path, resources, overrides)), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_the_sharded_smoke_sweep_expands_to_cells_that_run_sharded() -> None:
    from rlopt_cli.study.sharded_cell import check_cells

    sweep = load_sweep(REPO / "recipes" / "sweep_sharded_smoke.toml")
    assert (sweep.settings.nproc, len(sweep.cells)) == (2, 2)
    check_cells(sweep.cells, sweep.settings, "local", cores=2)  # raises if a cell cannot run sharded


def test_a_sharded_cell_asks_for_nproc_times_its_resources() -> None:
    settings = settings_from({"name": "s", "resources": {"nproc": 4, "num_gpus": 1, "num_cpus": 3}})
    params = slurm_parameters(settings, workers=5)
    assert (params["gpus_per_node"], params["cpus_per_task"], params["tasks_per_node"]) == (4, 12, 1)
    assert params["slurm_array_parallelism"] == 5
    assert slurm_parameters(settings_from({"name": "s"}), 1)["gpus_per_node"] == 0
    assert gpus_per_cell(1, 2, [str(i) for i in range(8)], nproc=4) == 4
    with pytest.raises(
        RloptError, match=r"2 cells at once x num_gpus = 1 x nproc = 4 need 8 GPUs.*--workers 1"
    ):
        gpus_per_cell(1, 2, [str(i) for i in range(6)], nproc=4)
    with pytest.raises(RloptError, match="gpus_per_node = 2 but a cell's 4 processes need one GPU each"):
        settings_from({"name": "s", "resources": {"nproc": 4, "num_gpus": 1}, "slurm": {"gpus_per_node": 2}})


def test_over_several_machines_rank_is_global_and_gpus_are_counted_per_machine(
    monkeypatch: pytest.MonkeyPatch, tiny_overrides: list[str]
) -> None:
    from rlopt_cli.runtime.distributed import World
    from rlopt_cli.training.sharding import check_sharded

    for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    world = World.from_env()
    assert (world.rank, world.size, world.local_rank, world.local_size, world.lead) == (5, 8, 1, 4, False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # an older launcher: all ranks on this machine
    assert World.from_env().local_size == 8
    if torch.cuda.device_count() < 4:  # 8 ranks over 2 machines of 4 GPUs: 4 must be here, not 8
        cfg = load_config(None, [*tiny_overrides, *SHARDED, "grpo.batch_size=32", "train.device='cuda'"])
        with pytest.raises(RloptError, match="^4 processes on this host but it has [0-3] CUDA devices"):
            check_sharded(cfg, 8, per_host=4)


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_a_sharded_cell_on_the_local_launcher_equals_the_one_process_run(tmp_path: Path) -> None:
    """Cell s0 through the local pool as 2 torchrun ranks. (Cell s1 runs as a Ray task in
    test_sweep.py::test_ray_launcher_on_a_real_local_cluster, whose cluster is up already.)"""
    path = sweep_file(tmp_path)
    cell = next(c for c in load_sweep(path).cells if c.axes["seed"] == 0)
    one = trainer.train(cell.config, tmp_path / "one", quiet)

    local = invoke("sweep", str(path), "--only", "seed=0", "--out", str(tmp_path))
    assert local.exit_code == 0, local.output
    sweep_dir = tmp_path / "sharded"
    assert_same_run(one, sweep_dir / cell.name, STEPS)
    assert json.loads((sweep_dir / cell.name / "meta.json").read_text())["world_size"] == 2
    log = (sweep_dir / "logs" / f"{cell.name}.log").read_text()
    assert "2 processes (torchrun), 1 threads each" in log
    assert load_config(sweep_dir / "logs" / f"{cell.name}.toml", []) == cell.config  # the ranks' recipe


def ray_sharded_cell(tmp_path: Path) -> None:
    """Cell s1 as a Ray task on the running cluster (2 CPUs: exactly one 2-process cell's), equal to the cell
    run in one process."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = sweep_file(tmp_path)
    cell = next(c for c in load_sweep(path).cells if c.axes["seed"] == 1)
    one = trainer.train(cell.config, tmp_path / "one", quiet)
    remote = invoke("sweep", str(path), "--only", "seed=1", "--launcher", "ray", "--out", str(tmp_path))
    assert remote.exit_code == 0, remote.output
    assert_same_run(one, tmp_path / "sharded" / cell.name, STEPS)
    assert json.loads((tmp_path / "sharded" / cell.name / "meta.json").read_text())["world_size"] == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SRUN = """#!/bin/bash
# srun's stand-in: the job step's command once per node of the job, every node on this host; fails if one fails
while [[ $1 == -* ]]; do shift; done
pids=()
for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do
    extra=()
    if [[ $node == 1 ]]; then extra=($NODE1_ENV); fi  # what differs on the second machine
    env SLURM_NODEID=$node SLURM_PROCID=$node "${extra[@]}" "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def sbatch_on_two_machines(tmp: Path, args: list[str], node1_env: dict[str, str]) -> tuple[int, str]:
    """recipes/slurm/train_multinode.sbatch as SLURM runs it on a job of 2 nodes, both on this host: `scontrol`
    names this host as both nodes and `srun` starts the script's torchrun once per node (SLURM's own commands
    are not here). `node1_env` is set on node 1 only. Returns (exit code, both nodes' output)."""
    tools = tmp / "slurm-tools"
    tools.mkdir(parents=True)
    scripts = {
        "scontrol": "#!/bin/sh\nprintf '127.0.0.1\\n127.0.0.1\\n'\n",  # show hostnames: node 0, node 1
        "srun": SRUN,
        "python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',  # this interpreter, with its packages
    }
    for name, text in scripts.items():
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    job = {"SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "7"}
    env = dict(os.environ, PATH=f"{tools}:{os.environ['PATH']}", PYTHONPATH=str(REPO), **job)
    env |= {"GPUS_PER_NODE": "1", "RLOPT_RDZV_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env["NODE1_ENV"] = " ".join(f"{k}={v}" for k, v in node1_env.items())
    script = REPO / "recipes" / "slurm" / "train_multinode.sbatch"
    run = subprocess.run(
        ["bash", str(script), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    return run.returncode, run.stdout + run.stderr


@pytest.mark.slow
def test_two_machines_equal_one_process(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """The multi-node sbatch script on two "machines" of one process each: the second agent's rank is 1 with
    LOCAL_RANK 0. On one host the run folder and the warm-up cache are shared, and the run equals the
    one-process run; a machine with a cache of its own stops both in one line."""
    overrides = [*tiny_overrides, *SHARDED, "optimizer.momentum=0.9", "train.run_name=run"]
    one = trainer.train(load_config(None, overrides), tmp_path / "one", quiet)  # warms the shared cache
    sets = [a for o in overrides for a in ("--set", o)]

    code, output = sbatch_on_two_machines(tmp_path / "a", [*sets, "--out", str(tmp_path / "two")], {})
    assert code == 0, output[-5000:]
    assert_same_run(one, tmp_path / "two" / "run", STEPS)
    assert json.loads((tmp_path / "two" / "run" / "meta.json").read_text())["world_size"] == 2

    own_cache = {"RLOPT_CACHE": str(tmp_path / "machine-1-cache"), SHARED_WAIT_ENV: "1"}
    code, output = sbatch_on_two_machines(
        tmp_path / "b", [*sets, "--out", str(tmp_path / "apart")], own_cache
    )
    assert code != 0
    error = "error: 1 of 2 processes cannot see the warm-up cache ($RLOPT_CACHE), "
    assert output.count(error) == 2, output[-5000:]  # the same line from both ranks
    assert "needs it on a filesystem they all share" in output
    assert not (tmp_path / "machine-1-cache").exists()  # machine 1 trained no warm-up of its own
