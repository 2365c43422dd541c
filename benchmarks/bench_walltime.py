"""Wall time of `rlopt demo` (and, with --tests, of the test suite) against the issue's targets.

The demo runs in a subprocess with an empty temporary RLOPT_CACHE and output folder, so the time includes the
embedded model's warm-up (the first `make demo` on a fresh machine pays it too), the SGD run and the AdamW run.
`--quick` passes `--steps 10` to the demo and only smoke-tests the timing; the verdict then says so.
`--tests` also runs `pytest -q` (off by default and in --quick: it takes minutes and the runner calls it).

Run: `python -m benchmarks.bench_walltime [--quick] [--tests]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, verdict

DEMO_TARGET_S = 180.0
TESTS_TARGET_S = 1800.0


def timed(cmd: list[str], env: dict[str, str], label: str) -> tuple[float, int]:
    """Run a command, passing its output through; returns (seconds, exit code)."""
    print(f"$ {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    seconds = time.perf_counter() - started
    print(f"{label}: {seconds:.1f} s, exit code {code}", flush=True)
    return seconds, code


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Demo with --steps 10; never the tests.")
    p.add_argument("--tests", action="store_true", help="Also time `pytest -q` (minutes).")
    args = p.parse_args(argv)
    rlopt = Path(sys.executable).with_name("rlopt")
    lines = []
    with tempfile.TemporaryDirectory(prefix="rlopt-bench-demo-") as tmp:
        env = os.environ | {"RLOPT_CACHE": str(Path(tmp) / "cache")}
        cmd = [str(rlopt), "demo", "--out", str(Path(tmp) / "out")] + (
            ["--steps", "10"] if args.quick else []
        )
        seconds, code = timed(cmd, env, "rlopt demo (warm-up included, empty cache)")
    name = "demo_walltime_quick" if args.quick else "demo_walltime"
    what = f"{seconds:.0f} s" + (" (--steps 10)" if args.quick else "") + ("" if code == 0 else " (FAILED)")
    lines.append(verdict(name, what, f"<= {DEMO_TARGET_S:.0f} s", code == 0 and seconds <= DEMO_TARGET_S))
    if args.tests and not args.quick:
        seconds, code = timed([sys.executable, "-m", "pytest", "-q"], dict(os.environ), "pytest -q")
        what = f"{seconds:.0f} s" + ("" if code == 0 else " (tests FAILED)")
        lines.append(
            verdict(
                "tests_walltime", what, f"< {TESTS_TARGET_S:.0f} s", code == 0 and seconds < TESTS_TARGET_S
            )
        )
    return lines


if __name__ == "__main__":
    main()
