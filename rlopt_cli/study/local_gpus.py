"""GPUs for the local launcher's cells: which GPUs a sweep may hand out, how many each cell gets, and the pool
that gives every running cell its own and takes them back when the cell's process has exited.

A cell sees its GPUs through CUDA_VISIBLE_DEVICES, set in its process before CUDA starts there
(`launchers.show_gpus`). Pure bookkeeping: nothing here starts CUDA. Deliberate simplification: whole GPUs only
(fractions, several cells on one GPU, are Ray's job).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from rlopt_cli.errors import RloptError


def visible_gpus(environ: Mapping[str, str], count: Callable[[], int]) -> list[str]:
    """The GPUs a local sweep may hand out: the sweep process's CUDA_VISIBLE_DEVICES when set (indices, UUIDs
    or MIG names, as written; CUDA ignores everything from the first invalid entry, e.g. -1, so this does too),
    else 0..N-1 for the `count()` GPUs torch sees."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count())]
    ids: list[str] = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry or entry.startswith("-"):
            break
        ids.append(entry)
    return ids


def gpus_per_cell(num_gpus: float, running: int, available: list[str], nproc: int = 1) -> int:
    """Whole GPUs per local cell (num_gpus per process, `nproc` processes); a one-line error when `running`
    cells at once cannot each have their own."""
    if num_gpus != int(num_gpus):
        raise RloptError(
            f"[sweep.resources] num_gpus = {num_gpus:g}: the local launcher gives each cell whole GPUs; "
            "set an integer (fractions of a GPU are for --launcher ray)"
        )
    per_cell = int(num_gpus) * nproc
    need = per_cell * running
    if need > len(available):
        fits = len(available) // per_cell
        each = f"num_gpus = {int(num_gpus)}" + (f" x nproc = {nproc}" if nproc > 1 else "")
        what = "num_gpus" + (" x nproc" if nproc > 1 else "")
        fix = f"set --workers {fits}" if fits else f"set [sweep.resources] {what} <= {len(available)}"
        raise RloptError(
            f"{running} cells at once x {each} need {need} GPUs, but this machine shows "
            f"{len(available)} ({', '.join(available) or 'none'}): {fix}"
        )
    return per_cell


@dataclass
class GpuPool:
    """GPU ids handed out `per_cell` at a time to the running cells. A finished cell's GPUs come back once its
    process has exited (its CUDA memory is freed only then), or after `grace_s` if the process cannot be seen."""

    free: list[str]
    per_cell: int
    grace_s: float = 60.0
    draining: list[tuple[str, int | None, float]] = field(default_factory=list)

    def ready(self) -> bool:
        return len(self.free) >= self.per_cell

    def take(self) -> str | None:
        """CUDA_VISIBLE_DEVICES for the next cell; None when cells get no GPUs (num_gpus = 0)."""
        if not self.per_cell:
            return None
        ids, self.free = self.free[: self.per_cell], self.free[self.per_cell :]
        return ",".join(ids)

    def give_back(self, gpus: str | None, pid: int | None) -> None:
        if gpus is not None:
            self.draining.append((gpus, pid, time.monotonic()))
        self.reclaim()

    def reclaim(self) -> None:
        for entry in list(self.draining):
            gpus, pid, since = entry
            if pid is None or not alive(pid) or time.monotonic() - since > self.grace_s:
                self.draining.remove(entry)
                self.free += gpus.split(",")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds the number: ours is gone
        return False
    return True
