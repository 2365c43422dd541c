"""One run across several processes: who this process is (`World`), the collectives the loop needs, and the
`torchrun` launch that `rlopt train --nproc N` makes.

A process is a rank of a multi-process run when `torchrun` (torch.distributed.run) started it: its environment
holds WORLD_SIZE, RANK and LOCAL_RANK. Without them the run is one process, `World.single()`, and every method
below is the identity (no process group is created, nothing is communicated).

The process group is gloo on CPU (it has no bf16: CPU runs are fp32) and nccl on CUDA, one GPU per rank
(LOCAL_RANK). The collectives are on host tensors over gloo and on the device over nccl.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import IO, Any

import torch


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size`, on local device `local_rank`. Over several
    machines `rank` is global (rank 0 leads the whole run) and `local_rank` counts on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    """Ranks on this machine (torchrun's LOCAL_WORLD_SIZE): `size` on one machine, less over several."""

    @classmethod
    def single(cls) -> World:
        return cls()

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes in the environment; one process when it describes none."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        local = (int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", str(size))))
        return cls(int(os.environ["RANK"]), size, *local)

    @property
    def sharded(self) -> bool:
        return self.size > 1

    @property
    def lead(self) -> bool:
        """Rank 0 alone writes the run folder, the metrics, W&B and the progress bar."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device this rank computes on: its own GPU (LOCAL_RANK) on CUDA."""
        if device.type == "cuda" and self.sharded:
            return torch.device("cuda", self.local_rank)
        return device

    def init(self, device: torch.device) -> None:
        """Join the process group (gloo on CPU, nccl on CUDA); a no-op for one process or when joined."""
        import torch.distributed as dist

        if not self.sharded or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")

    def close(self) -> None:
        import torch.distributed as dist

        if self.sharded and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.sharded:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_true(self, flag: bool) -> bool:
        """True when `flag` is true on every rank (one MIN all-reduce)."""
        if not self.sharded:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over ranks, in float64 (counts and sums of a few hundred terms stay exact)."""
        if not self.sharded:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def max(self, values: list[int]) -> list[int]:
        if not self.sharded:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.long, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def max_float(self, values: list[float]) -> list[float]:
        """Elementwise max over ranks, in float64."""
        if not self.sharded:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's `local` (same shape on each) concatenated in rank order along dim 0: the global batch."""
        if not self.sharded:
            return local
        import torch.distributed as dist

        src = local.contiguous().to(self._comm_device())
        parts = [torch.empty_like(src) for _ in range(self.size)]
        dist.all_gather(parts, src)
        return torch.cat(parts).to(local.device)

    def share(self, count: int) -> slice:
        """This rank's contiguous share of `count` items (the caller checked that size divides count)."""
        per = count // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def launch(
    nproc: int, argv: list[str], env: dict[str, Any] | None = None, output: IO[str] | None = None
) -> int:
    """Run `rlopt <argv>` as `nproc` ranks under torchrun on this host; returns torchrun's exit code.
    `output`: where the ranks' and torchrun's stdout and stderr go (a sweep cell's log); None: this process's.

    `--standalone` gives the ranks a private rendezvous on a free local port, so runs never collide. A
    subprocess, not `torch.distributed.run.main` in this process: the ranks must not inherit this process's
    imports and threads, and a failing rank must not take the caller down with a traceback."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "rlopt_cli.cli",
        *argv,
    ]
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, said here so it does not warn
    arm = functools.partial(die_with, os.getpid()) if sys.platform.startswith("linux") else None
    run = subprocess.run(cmd, env=full_env, check=False, stdout=output, stderr=output, preexec_fn=arm)
    return run.returncode


def die_with(launcher: int) -> None:
    """In torchrun's process, before it starts (Linux): SIGTERM when its launcher dies, even by kill -9 (a sweep
    worker killed with its sweep), which torchrun passes on to its ranks, so no orphaned run trains on holding
    its folder's lock."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != launcher:  # it died before the signal was armed
        os._exit(1)
