"""Optimizer memory: peak RSS of one training step with SGD, AdamW, SGD+momentum and RMSProp on a ~100M model.

Each optimizer runs in its own fresh process: build a Qwen2 model from a config (random init, fp32, CPU), one
forward/backward on a small batch (so activations stay far below the optimizer state), one optimizer step built
by rlopt's `build_optimizer`, then read the process's peak RSS (VmHWM). The measurement itself lives in
rlopt_cli/training/memory.py, which `rlopt paper` uses too. The peak above SGD's is the
optimizer's cost; it is compared with the textbook fp32 state (AdamW 8 bytes per parameter, SGD+momentum 4,
RMSProp 4) and with rlopt's own `state_bytes` accounting. Target: measured >= 0.9 of the expected saving.

A measured ratio above 1 is expected for AdamW and RMSProp: their single-tensor step (rlopt builds optimizers
with foreach=False) allocates a temporary the size of the parameter it updates (`sqrt` of the second moment),
so the peak also holds one copy of the largest parameter (the embedding here).

Run: `python -m benchmarks.bench_optimizer_memory [--quick]` (quick: a ~20M model, one repeat).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from benchmarks.common import emit, run_worker, verdict
from rlopt_cli.training.memory import BATCH, SEQ, SIZES, STEP_OPTIMIZERS, one_step

TARGET_RATIO = 0.9
OPTIMIZERS = STEP_OPTIMIZERS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Smoke mode: a ~22M-parameter model, one repeat.")
    p.add_argument(
        "--repeats", type=int, default=None, help="Fresh processes per optimizer (default 2); min."
    )
    p.add_argument("--worker", choices=sorted(OPTIMIZERS), help=argparse.SUPPRESS)
    p.add_argument("--size", choices=sorted(SIZES), default="full", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.quick:
        args.size = "quick"
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.worker:
        emit(one_step(args.worker, args.size))
        return []
    size = SIZES[args.size]
    print(
        f"optimizer memory: Qwen2 ({size['num_layers']} layers, width {size['hidden_size']}, "
        f"vocab {size['vocab_size']}), "
        f"fp32 CPU, batch {BATCH}x{SEQ}, one step per fresh process, min of {args.repeats} repeat(s)",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in OPTIMIZERS}
    for _ in range(args.repeats):  # interleaved, so a slow phase of the machine hits every optimizer
        for name in OPTIMIZERS:
            runs[name].append(
                run_worker("benchmarks.bench_optimizer_memory", ["--worker", name, "--size", args.size])
            )
    return report(runs)


def report(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    peak = {name: min(r["peak_rss"] for r in rs) for name, rs in runs.items()}
    first = runs["sgd"][0]
    n = first["n_params"]
    mb = 1e6
    print(
        f"{n / 1e6:.1f}M parameters ({4 * n / mb:.0f} MB of fp32 weights); largest tensor "
        f"{first['largest_param_bytes'] / mb:.0f} MB; peak RSS spread over repeats: "
        + ", ".join(f"{k} {(max(r['peak_rss'] for r in v) - peak[k]) / mb:.0f} MB" for k, v in runs.items()),
        flush=True,
    )
    header = (
        f"{'optimizer':<13} {'peak RSS':>10} {'vs sgd':>10} {'expected':>10} {'ratio':>6} {'state_bytes':>12}"
    )
    print(header + "  (MB; expected = textbook B/param x params; state_bytes = rlopt's accounting)")
    lines = []
    for name, rs in runs.items():
        r = rs[0]
        extra = peak[name] - peak["sgd"]
        expected = r["expected_per_param"] * n
        ratio = extra / expected if expected else float("nan")
        state = statistics.fmean(x["state_bytes"] for x in rs)
        print(
            f"{name:<13} {peak[name] / mb:>10.0f} {extra / mb:>+10.0f} {expected / mb:>10.0f} "
            f"{ratio:>6.2f} {state / mb:>9.0f} ({state / n:.2f} B/param)".replace("nan", "  -"),
            flush=True,
        )
        if expected:
            lines.append((name, extra, expected, ratio))
    return [
        verdict(
            f"optimizer_memory_{name.replace('+', '_')}",
            f"{ratio:.2f} of expected ({extra / mb:.0f} / {expected / mb:.0f} MB above sgd)",
            f">= {TARGET_RATIO:g}",
            ratio >= TARGET_RATIO,
        )
        for name, extra, expected, ratio in lines
    ]


if __name__ == "__main__":
    main()
