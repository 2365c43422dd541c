"""What sharding a run over 2 processes (FSDP2 under torchrun, gloo on CPU) does to a GRPO step, side by side.

The same run (a 4-layer, width-256 embedded model, ~4.2M parameters, `rollout.seed_scope = "prompt"`) as one
process and as `rlopt train --nproc 2`, each process on one intra-op thread (OMP_NUM_THREADS=1), so the two
processes have twice the cores of the one. Measured: the median `time/step_s` over the steps after the first
two (rank 0's clock), and the ratio 2-process / 1-process, every row forwarded on both sides. The completions
are the same on both sides by construction (checked here: the logged rewards and lengths agree), so the ratio
compares the same work.

On CPU the collectives are gloo over loopback and every forward all-gathers every block (FSDP2 keeps no
unsharded copy between forwards, and sampling forwards once per token), so a small model is communication
bound: this benchmark measures that cost, it does not promise a speed-up. Run: `python -m benchmarks.bench_sharded
[--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, WIDE_EMBEDDED, verdict

MAX_RATIO = 1.5  # 2 processes may cost at most half again the one-process step on CPU (a finding if missed)
BIG = [
    *WIDE_EMBEDDED,
    "rollout.seed_scope='prompt'",
    # a random model scores 0 everywhere: one process would skip every group's forward/backward, which a
    # sharded run cannot (its forwards are collective), so both sides forward every row
    "grpo.skip_zero_advantage=false",
]


def run(nproc: int, steps: int, tmp: Path) -> list[dict]:
    env = os.environ | {"RLOPT_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [a for o in [*BIG, f"train.steps={steps}", f"train.run_name=n{nproc}"] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "rlopt_cli.cli", "train", "--nproc", str(nproc), "--out", str(tmp), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"--nproc {nproc} failed with exit code {proc.returncode}")
    return [json.loads(line) for line in (tmp / f"n{nproc}" / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="6 steps instead of 20")
    args = p.parse_args(argv)
    steps = 6 if args.quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        one, two = run(1, steps, Path(tmp)), run(2, steps, Path(tmp))
    same = all(
        a[k] == b[k]
        for a, b in zip(one[1:], two[1:], strict=True)
        for k in ("train/reward_mean", "train/completion_len")
    )
    s1 = statistics.median(r["time/step_s"] for r in one[3:])
    s2 = statistics.median(r["time/step_s"] for r in two[3:])
    print(
        f"step seconds (median of steps 3-{steps}): 1 process {s1:.3f}, 2 processes {s2:.3f}; same rollouts: {same}"
    )
    verdict("sharded/same_rollouts", str(same), "True", same)
    verdict("sharded/step_time_ratio_2_vs_1", f"{s2 / s1:.2f}x", f"<= {MAX_RATIO}x", s2 / s1 <= MAX_RATIO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
