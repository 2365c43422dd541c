"""What every benchmark shares: the one-line verdict format, subprocess workers that report JSON, peak RSS.

A benchmark ends with one line per target, `name: measured, target, PASS|MISS`; `python -m benchmarks` collects
those lines (by `RESULT_LINE`) from every benchmark's output into the closing table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from rlopt_cli.runtime.devices import peak_rss_bytes  # noqa: F401 (VmHWM: a spawned worker's own peak)

REPO = Path(__file__).resolve().parent.parent
# A width-256, 4-layer embedded model (4.2M parameters), random init, no eval or checkpoints in between: big enough
# that a step's time is matmuls, not Python (bench_cpu_isa, bench_sharded)
WIDE_EMBEDDED = [
    "model.hidden_size=256",
    "model.intermediate_size=1024",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.warmup_steps=0",
    "task.n_eval=16",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "log.progress=false",
]
RESULT_LINE = re.compile(r"^(?P<name>[\w./-]+): (?P<measured>.+), (?P<target>.+), (?P<verdict>PASS|MISS)$")


def verdict(name: str, measured: str, target: str, ok: bool) -> str:
    """The final line of a benchmark target; printed and also returned for the caller's own table."""
    line = f"{name}: {measured}, {target}, {'PASS' if ok else 'MISS'}"
    print(line, flush=True)
    return line


def run_worker(module: str, args: list[str], threads: int = 0, timeout: float = 1200) -> dict[str, Any]:
    """Run `python -m module args` in a fresh process from the repository root; its last stdout line is JSON.

    A fresh process per measurement keeps imports, allocator state and peak RSS of one side from leaking into
    the other. `threads` > 0 sets OMP_NUM_THREADS (torch's intra-op threads) in the worker. On failure the
    worker's output tails are printed.
    """
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"worker {module} {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(lines[-1])


def emit(result: dict[str, Any]) -> None:
    """A worker's report: one JSON line, last on stdout."""
    print(json.dumps(result), flush=True)
