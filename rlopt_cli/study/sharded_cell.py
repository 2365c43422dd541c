"""Sweep cells of several processes (`[sweep.resources] nproc = N`): every cell is a sharded run, FSDP2 under
torchrun on one machine, started by whichever worker (local process, Ray task, SLURM array task) got the cell.

The ranks are fresh interpreters, so they read the cell's resolved config from a file: the worker writes it to
<sweep>/logs/<cell>.toml and runs `rlopt train --recipe <that file> --out <sweep>` as N torchrun ranks
(`runtime.distributed.launch`), their output appended to the cell's log. Inside, the run is `rlopt train --nproc
N`'s: rank 0 warms up the embedded model and writes the run folder; the worker then reads its summary.json.

Resources: num_cpus and num_gpus are per process, so a cell holds N times each. The local launcher hands the
cell N x num_gpus GPUs (CUDA_VISIBLE_DEVICES), and N x cores / N threads; a Ray task asks for N x both (a task
runs on one node, so its ranks share a machine and see all of its GPUs); a SLURM array task asks for N x both on
its node.

Deliberate simplifications: a cell's ranks stay on one machine (a run over several machines is `rlopt train`
under srun: recipes/slurm/train_multinode.sbatch); every cell of a sweep has the same nproc.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from rlopt_cli.config.recipes import to_toml
from rlopt_cli.config.schema import RunConfig
from rlopt_cli.errors import RloptError
from rlopt_cli.runtime.atomic_files import atomic_write_text


def check_cells(cells: list[Any], settings: Any, launcher: str, cores: int) -> None:
    """One-line errors, before any cell starts, for a grid whose cells cannot run on `settings.nproc` processes
    (`sharding.check_sharded` on each cell), and for more processes per local CPU cell than this host's cores."""
    nproc = settings.nproc
    if nproc == 1:
        return
    # torch (for the CUDA count) is loaded only for a sharded sweep, after the sweep process pinned its kernels
    from rlopt_cli.training.sharding import check_sharded

    for cell in cells:
        cfg: RunConfig = cell.config
        if launcher != "local":  # the cell's GPUs are its node's: this host's CUDA count says nothing of them
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
        try:
            check_sharded(cfg, nproc)
        except RloptError as err:
            raise RloptError(
                f"cell {cell.name} cannot run on [sweep.resources] nproc = {nproc} processes: {err}"
            ) from None
    if launcher == "local" and not settings.num_gpus and nproc > cores:
        raise RloptError(
            f"[sweep.resources] nproc = {nproc} processes per cell, but this machine has {cores} cores: "
            f"set nproc <= {cores}"
        )


def run_sharded(cfg: RunConfig, nproc: int, threads: int, out_dir: Path, log: Path) -> Path:
    """Run the cell `cfg` as `nproc` torchrun ranks of `threads` threads each; returns its run folder."""
    from rlopt_cli.runtime.distributed import launch  # imports torch: not before the sweep pinned its kernels

    recipe = log.with_suffix(".toml")
    header = f"# cell {cfg.run_name}, as its {nproc} torchrun ranks read it (written by rlopt sweep)\n"
    atomic_write_text(recipe, header + to_toml(cfg))
    argv = ["train", "--recipe", str(recipe), "--out", str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads)))  # each rank's torch threads
    with log.open("a") as output:
        code = launch(nproc, argv, env=env, output=output)
    if code:
        why = last_error(log) or f"a rank failed (torchrun exit {code})"
        raise RloptError(f"{why}; see {log}")
    return out_dir / cfg.run_name


def last_error(log: Path) -> str:
    """The last `error: ...` line a rank wrote into the cell's log ('' when none did: a crash, a kill)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
    return lines[-1].removeprefix("error: ") if lines else ""
