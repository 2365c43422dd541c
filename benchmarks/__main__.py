"""`python -m benchmarks [--quick]` (`make bench`): run every benchmark, then print the collected verdicts.

Each benchmark runs as its own `python -m benchmarks.<name>` process; its output streams through, and its
`name: measured, target, PASS|MISS` lines are collected into the closing table. A benchmark that crashes gets a
MISS line and makes the exit code 1; a missed target does not (it is a finding, not a failure).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

from benchmarks.common import REPO, RESULT_LINE

# run in this order: the fast, most-watched ones first; sparsity is written by its own module when present
BENCHMARKS = [
    "bench_grpo_vs_trl",
    "bench_optimizer_memory",
    "bench_memory_plan",
    "bench_sparsity",
    "bench_walltime",
    "bench_cpu_isa",
    "bench_sharded",
]


def run_one(name: str, args: list[str]) -> tuple[list[str], int, float]:
    """Stream one benchmark's output; returns its verdict lines, exit code and seconds."""
    print(f"\n=== {name} {' '.join(args)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        if RESULT_LINE.match(line.rstrip("\n")):
            lines.append(line.rstrip("\n"))
    code = proc.wait()
    return lines, code, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Smoke mode of every benchmark (minutes, not tens).")
    p.add_argument("--no-tests", action="store_true", help="Do not time the test suite (full mode times it).")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="Run only these benchmarks.")
    args = p.parse_args(argv)
    table: list[str] = []
    crashed = False
    for name in args.only or BENCHMARKS:
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"\n=== {name}: not present, skipped", flush=True)
            continue
        bench_args = ["--quick"] if args.quick else []
        if name == "bench_walltime" and not (args.quick or args.no_tests):
            bench_args.append("--tests")
        lines, code, seconds = run_one(name, bench_args)
        print(f"=== {name}: {seconds:.0f} s, exit code {code}", flush=True)
        if code != 0:
            crashed = True
            lines.append(f"{name}: crashed (exit code {code}), runs to completion, MISS")
        table += lines
    print("\n=== results (ratios measured side by side in the same run; see benchmarks/README.md)")
    print("\n".join(table))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
