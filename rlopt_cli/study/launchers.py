"""Launchers: run a list of cells (independent run configs) locally, on Ray, or as a SLURM job array.

Every launcher ships the same thing to a worker: the cell's config as a plain dict and the sweep folder, and
the worker calls `run_cell`, which rebuilds the RunConfig and calls `trainer.train`. Because `train` resumes a
partial run folder and skips a finished one, and every file it writes is renamed into place, killing a sweep
at any moment (Ctrl-C, kill -9, a preempted SLURM task) loses no finished run: rerunning it does the rest.

GPUs: with `[sweep.resources] num_gpus = k`, the local launcher gives every running cell k GPUs of its own,
through CUDA_VISIBLE_DEVICES set in the cell's process before CUDA starts there (`GpuPool`); Ray and SLURM
assign GPUs themselves.

Deliberate simplifications: a failed cell is reported and the others go on (no retries); the local launcher
counts a cell as running from the moment the pool hands it to a worker process; local cells get whole GPUs.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import functools
import importlib
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rlopt_cli.config.recipes import from_dict
from rlopt_cli.errors import RloptError
from rlopt_cli.runtime.cpu_kernels import VARIABLES, pin
from rlopt_cli.study.local_gpus import GpuPool, gpus_per_cell, visible_gpus
from rlopt_cli.study.sharded_cell import run_sharded

OnFinish = Callable[[str, "dict[str, Any] | None", "str | None"], None]
"""Called as on_finish(cell_name, summary or None, error line or None) when a cell ends."""
OnTick = Callable[[int], None]
"""Called with the number of cells running now, every poll."""


@dataclass(frozen=True)
class Job:
    """What a worker needs: a cell's name, its config as a plain dict (picklable) and where to run it."""

    name: str
    config: dict[str, Any]
    out_dir: str
    threads: int = 1
    gpus: str | None = None
    """CUDA_VISIBLE_DEVICES for the cell (local launcher with num_gpus > 0); None leaves the environment as is."""
    nproc: int = 1
    """Processes of the cell: > 1 runs it sharded, as torchrun ranks of `threads` threads each (sharded_cell.py)."""


def run_cell(job: Job) -> dict[str, Any]:
    """Worker entry point (module level, so every launcher can pickle it by reference)."""
    if job.gpus is not None:
        show_gpus(job.gpus)
    cfg = from_dict(job.config)
    # Pin the CPU kernels before this worker's first torch import (Ray and SLURM workers start bare), so torch
    # and the training loop are imported here, after the pin, not at the top of the module.
    note = pin(cfg.train.cpu_isa)
    log = Path(job.out_dir) / "logs" / f"{job.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:  # workers write to a log file, so the sweep's live display stays readable
        with log.open("a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    if note:
        say(note)
    if job.gpus is not None:
        say(f"GPUs: CUDA_VISIBLE_DEVICES={job.gpus}")
    if job.nproc > 1:  # the ranks are processes of their own (torchrun); this one only waits for them
        say(f"{job.nproc} processes (torchrun), {job.threads} threads each")
        run_dir = run_sharded(cfg, job.nproc, job.threads, Path(job.out_dir), log)
    else:
        import torch  # heavy: imported on use

        from rlopt_cli.training.loop import train

        torch.set_num_threads(max(1, job.threads))  # N cells on N cores: one thread each, not N x N
        run_dir = train(cfg, job.out_dir, say)
    return json.loads((run_dir / "summary.json").read_text())


def show_gpus(gpus: str) -> None:
    """Make only `gpus` visible to this process. CUDA reads CUDA_VISIBLE_DEVICES once, when it starts in a
    process: the fork server imported torch but never started CUDA, so a forked cell still can; a process in
    which CUDA already runs would ignore the variable and share GPUs, so it is refused."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RloptError(
            "CUDA started in this worker before its GPUs were set; it would share GPUs: a bug in rlopt"
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus


def error_line(err: BaseException) -> str:
    """One line for a failed cell: the innermost message, without Ray's or submitit's wrapping."""
    text = str(err).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), type(err).__name__)[:300]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# local: a process pool


def die_with_parent(parent: int | None) -> None:
    """Pool initializer: the worker is killed when the sweep process dies, even by kill -9, so no orphan goes on
    training (and holding its run folder). Linux: the kernel's parent-death signal; elsewhere a watchdog thread.
    `parent` None: the worker's parent is a fork server. The server stays up while anyone holds its "alive" pipe,
    and every forked worker inherits a write end of it; closing ours leaves the sweep process the only holder, so
    the server exits when the sweep does, and its death signals the worker."""
    if parent is None:
        from multiprocessing import forkserver

        server: Any = (
            forkserver._forkserver
        )  # the stdlib keeps the inherited end here (private, unchanged 3.4-3.13)
        if server._forkserver_alive_fd is not None:
            os.close(server._forkserver_alive_fd)
            server._forkserver_alive_fd = None
        parent = os.getppid()
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    else:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


# What every cell imports before it trains: ~7 s of one core per process (torch 3 s, the training loop and
# transformers' generation and model modules the rest), often as long as a 100-step embedded run itself.
PRELOAD = (
    "rlopt_cli.training.loop",
    "transformers.generation.utils",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.llama.modeling_llama",
)
_fork_server_isa: list[str] = []  # the cpu_isa the fork server was started with (it lives as long as we do)


def pool_context(jobs: list[Job]) -> tuple[Any, int | None]:
    """The start method for the local pool, and the parent its workers must die with.

    A fork server that has imported PRELOAD (with the cells' kernels pinned first, since the libraries read their
    variables only in the process that runs kernels) forks each cell's process in milliseconds instead of ~7 s of
    imports. It runs no kernel, so no OpenMP pool or kernel choice is forked. When cells differ in train.cpu_isa,
    or the platform has no fork server: a fresh spawned interpreter each. A server started for another isa (an
    earlier sweep in this process) is stopped first: its libraries chose their kernels by the old variables."""
    isas = {str(job.config.get("train", {}).get("cpu_isa", "avx2")) for job in jobs}
    if len(isas) != 1 or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn"), os.getpid()
    from multiprocessing import forkserver

    isa = isas.pop()
    if _fork_server_isa and _fork_server_isa[0] != isa:
        stoppable: Any = forkserver._forkserver  # private too; no pool is using it: sweeps run one at a time
        stoppable._stop()
        _fork_server_isa.clear()
    ctx = multiprocessing.get_context("forkserver")
    if not _fork_server_isa:
        saved = {v: os.environ.get(v) for v in VARIABLES}
        pin(isa)  # into the environment the server starts with, then back: this process stays as it was
        ctx.set_forkserver_preload(list(PRELOAD))
        try:
            forkserver.ensure_running()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        _fork_server_isa.append(isa)
    return ctx, None


class CellFailed(Exception):
    """A local cell's error line, with the pid of the process that ran it (so its GPUs come back on its exit)."""

    def __init__(self, pid: int, line: str) -> None:
        super().__init__(pid, line)
        self.pid, self.line = pid, line


def run_local_cell(job: Job) -> tuple[int, dict[str, Any]]:
    """`run_cell` in a local pool worker; its pid comes back with the result or the error."""
    try:
        return os.getpid(), run_cell(job)
    except Exception as err:  # Ctrl-C and exits pass through: the sweep is stopping
        raise CellFailed(os.getpid(), error_line(err)) from None


def launch_local(jobs: list[Job], settings: Any, workers: int, on_finish: OnFinish, on_tick: OnTick) -> None:
    """Each cell in its own process, `workers` at a time, forked from a server that has done the imports
    (`pool_context`). One cell per process (max_tasks_per_child=1): peak memory is the process's high-water mark
    (ru_maxrss), which a reused worker would carry over from its previous cell. Workers die with the sweep
    process (`die_with_parent`). A cell is submitted only when a worker and its GPUs are free (`GpuPool`)."""
    one_each: dict[str, Any] = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    gpus = GpuPool([], 0)
    if settings.num_gpus:  # checked before any process starts
        if not one_each:  # a reused worker has started CUDA in its previous cell: it cannot change its GPUs
            raise RloptError("local cells get GPUs of their own on Python >= 3.11 only; use --launcher ray")
        available = visible_gpus(os.environ, torch_gpu_count)
        per_cell = gpus_per_cell(settings.num_gpus, min(workers, len(jobs)), available, settings.nproc)
        gpus = GpuPool(available, per_cell)
    ctx, parent = pool_context(jobs)
    queue = list(jobs)
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=die_with_parent, initargs=(parent,), **one_each
    ) as pool:
        futures: dict[cf.Future[Any], tuple[str, str | None]] = {}
        try:
            while queue or futures:
                while queue and len(futures) < workers and gpus.ready():
                    job = replace(queue.pop(0), gpus=gpus.take())
                    futures[pool.submit(run_local_cell, job)] = (job.name, job.gpus)
                finished, _ = cf.wait(futures, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    name, held = futures.pop(future)
                    gpus.give_back(held, _report_local(name, future, on_finish))
                gpus.reclaim()
                on_tick(sum(f.running() for f in futures))
        except BaseException:  # Ctrl-C: drop queued cells; running ones got the signal too and stop
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def torch_gpu_count() -> int:
    import torch  # heavy: imported on use; counting GPUs starts no CUDA context here (cells are not forked from us)

    return int(torch.cuda.device_count())


def _report_local(name: str, future: cf.Future[Any], on_finish: OnFinish) -> int | None:
    """Report a finished local cell; returns the pid of its process (None when the pool itself broke)."""
    try:
        pid, summary = future.result()
    except CellFailed as err:
        on_finish(name, None, err.line)
        return err.pid
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # a broken pool (a worker killed): its processes are gone
        on_finish(name, None, error_line(err))
        return None
    on_finish(name, summary, None)
    return int(pid)


def _report(name: str, result: Callable[[], Any], on_finish: OnFinish) -> None:
    try:
        on_finish(name, result(), None)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # a failed cell must not stop the others
        on_finish(name, None, error_line(err))


# ---------------------------------------------------------------------------------------------------------------
# ray: one task per cell


def import_extra(module: str, extra: str, launcher: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RloptError(
            f"the {launcher} launcher needs {module}, which is not installed: pip install -e '.[{extra}]'"
        ) from None


def launch_ray(jobs: list[Job], settings: Any, workers: int, on_finish: OnFinish, on_tick: OnTick) -> None:
    """Each cell a Ray task with the sweep's num_cpus/num_gpus, on RAY_ADDRESS's cluster or a local one.

    A sharded cell's task asks for nproc times both: Ray places a task on one node and makes all of its GPUs
    visible to it (CUDA_VISIBLE_DEVICES), so the torchrun ranks it starts share that node and its GPUs. (A
    placement group of nproc bundles would reserve the same, but the task, drawing on one bundle, would see
    only that bundle's GPUs.)"""
    ray = import_extra("ray", "ray", "ray")
    if not ray.is_initialized():  # a caller (or a test) may have started one with its own resources
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, include_dashboard=False)
    n = settings.nproc
    remote = ray.remote(run_cell).options(num_cpus=n * settings.num_cpus, num_gpus=n * settings.num_gpus)
    refs = {remote.remote(job): job.name for job in jobs}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in ready:
                _report(refs[ref], functools.partial(ray.get, ref), on_finish)
            on_tick(len(pending))  # Ray does not say which pending tasks hold resources; count them all
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# slurm: one submitit job array


def launch_slurm(jobs: list[Job], settings: Any, workers: int, on_finish: OnFinish, on_tick: OnTick) -> None:
    """One SLURM job array, one array task per cell; RLOPT_SLURM_CLUSTER=local runs it on this machine."""
    submitit = import_extra("submitit", "slurm", "slurm")
    cluster = os.environ.get("RLOPT_SLURM_CLUSTER") or settings.slurm_cluster or None
    folder = Path(jobs[0].out_dir) / ".submitit" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = slurm_parameters(settings, workers)
    executor.update_parameters(**params)
    array = executor.map_array(run_cell, jobs)
    names = {job.job_id: j.name for job, j in zip(array, jobs, strict=True)}
    pending = list(array)
    try:
        while pending:
            time.sleep(0.5)
            for job in [j for j in pending if j.done()]:
                pending.remove(job)
                _report(names[job.job_id], job.result, on_finish)
            on_tick(sum(j.state == "RUNNING" for j in pending))
    except BaseException:
        for job in pending:
            job.cancel(check=False)
        raise


def slurm_parameters(settings: Any, workers: int) -> dict[str, Any]:
    """submitit's parameters for one array task: one task on one node, with nproc x num_cpus cores and
    [sweep.slurm] gpus_per_node GPUs, or nproc x num_gpus when that is unset (torchrun's ranks share the node)."""
    gpus = settings.slurm_gpus_per_node or math.ceil(settings.nproc * settings.num_gpus)
    params: dict[str, Any] = {
        "timeout_min": settings.slurm_time_min,
        "gpus_per_node": gpus,
        "tasks_per_node": 1,  # torchrun starts the ranks inside the one task
        "cpus_per_task": max(1, math.ceil(settings.nproc * settings.num_cpus)),
        "slurm_array_parallelism": workers,
    }
    if settings.slurm_partition:
        params["slurm_partition"] = settings.slurm_partition
    return params


LAUNCHERS: dict[str, Callable[[list[Job], Any, int, OnFinish, OnTick], None]] = {
    "local": launch_local,
    "ray": launch_ray,
    "slurm": launch_slurm,
}


def launch(
    name: str, jobs: list[Job], settings: Any, workers: int, on_finish: OnFinish, on_tick: OnTick
) -> None:
    if name not in LAUNCHERS:
        raise RloptError(f"unknown launcher {name!r}; choose one of {', '.join(LAUNCHERS)}")
    if jobs:
        LAUNCHERS[name](jobs, settings, workers, on_finish, on_tick)
