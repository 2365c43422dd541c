"""`rlopt sparsity` speed and memory: the scan against simply reading both files, on a synthetic bf16 pair.

The pair is Llama-shaped (an embedding and an untied lm_head, the largest tensors, then layers of q/k/v/o and
gate/up/down projections and norms) and written to a temporary folder that is removed afterwards. B is A with
1-ULP changes: tensors alternate between 10% changed (AdamW-like, the dense path) and 0.01% (SGD-like).
`--dtype fp32` writes a float32 pair instead (master weights, as `train.save_dtype = "float32"` saves them),
where every changed coordinate takes the float rules; its verdict lines end in `_fp32`.

Two measurements, each in a fresh process, alternating over `--rounds` (the best time of each is kept, because
other processes share the CPU):
  read   every tensor of both files through `safe_open`, copied into one reused buffer (`get_tensor` alone
         only maps pages; the copy reads them)
  scan   `rlopt_cli.sparsity.sparsity(A, B)`: the three rules over every tensor, as `rlopt sparsity` runs it
Both run with one torch thread by default (`--threads`): on a CPU shared with other jobs, torch's thread pool
waits for busy cores and both timings become noise; numpy's comparisons are single-threaded anyway.
Peak RSS of the scan is measured with `resource.getrusage` in its own process, against the RSS right after the
imports (current RSS); the target is below two copies of the largest tensor (plus 64 MiB for slices and the allocator).

Run: `python -m benchmarks.bench_sparsity [--quick | --size-gb 2]`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, peak_rss_bytes, run_worker, verdict

TARGET_RATIO = 0.5
RSS_SLACK = 64 << 20  # slices of the scan (a few 4 MB fp32 temporaries) and allocator slack
GB = 1e9
DTYPES = {"bf16": ("bfloat16", "int16"), "fp32": ("float32", "int32")}  # storage dtype, its same-width int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="Size of each of the two files (default 1 GB).")
    p.add_argument("--quick", action="store_true", help="Smoke mode: 2 x ~50 MB, one round.")
    p.add_argument("--rounds", type=int, default=None, help="Alternating read/scan measurements (default 2).")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in both measurements (0: torch's default; see above).",
    )
    p.add_argument("--dir", default=None, help="Where to write the pair (default: the system temp folder).")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="The pair's dtype (default bf16).")
    # worker mode (internal): one measurement, one JSON line
    p.add_argument("--worker", choices=("write", "read", "scan"), help=argparse.SUPPRESS)
    p.add_argument("--files", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size_gb = 0.05
    args.rounds = args.rounds or (1 if args.quick else 2)
    return args


# ---------------------------------------------------------------------------------------------------------------
# the synthetic pair


def shapes(size_bytes: float, item: int = 2) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-shaped tensors of `item` bytes per element totalling about `size_bytes`; the embedding and lm_head
    are the largest."""
    h = 512 if size_bytes < 0.3 * GB else 2048  # hidden size; the MLP is 4h wide, the vocabulary 16h
    vocab = 16 * h
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    per_layer = item * (4 * h * h + 3 * 4 * h * h + 2 * h)  # bytes of one block
    layers = max(1, round((size_bytes - 2 * item * vocab * h) / per_layer))
    for i in range(layers):
        pre = f"model.layers.{i}."
        out += [(f"{pre}self_attn.{p}_proj.weight", (h, h)) for p in "qkvo"]
        out += [(f"{pre}mlp.gate_proj.weight", (4 * h, h)), (f"{pre}mlp.up_proj.weight", (4 * h, h))]
        out += [(f"{pre}mlp.down_proj.weight", (h, 4 * h))]
        out += [(f"{pre}input_layernorm.weight", (h,)), (f"{pre}post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def write_pair(file_a: Path, file_b: Path, size_bytes: float, dtype_name: str = "bf16") -> int:
    """Write A and B (B = A with 1-ULP moves); returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    dtype, as_int = (getattr(torch, name) for name in DTYPES[dtype_name])
    gen = torch.Generator().manual_seed(0)
    item = torch.empty(0, dtype=dtype).element_size()
    a = {
        name: (0.02 * torch.randn(shape, generator=gen)).to(dtype) for name, shape in shapes(size_bytes, item)
    }
    save_file(a, str(file_a))
    for i, t in enumerate(a.values()):  # B in place, tensor by tensor, to hold one copy in memory
        frac = 0.1 if i % 2 == 0 else 1e-4
        moved = torch.rand(t.shape, generator=gen) < frac
        t.view(as_int)[moved] += 1  # one ULP
    save_file(a, str(file_b))
    return max(t.numel() * t.element_size() for t in a.values())


# ---------------------------------------------------------------------------------------------------------------
# the two measurements (each in its own process)


def read_all(files: list[str]) -> int:
    """Pull every tensor of every file through memory, one at a time; returns the bytes read.

    The fastest honest reading: each tensor is copied into one reused buffer, so no time goes to allocating
    fresh memory per tensor (a `clone()` per tensor is slower at 1 GB and would flatter the scan).
    """
    import torch
    from safetensors import safe_open

    total = 0
    buffer = torch.empty(0, dtype=torch.uint8)
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                raw = f.get_tensor(name).reshape(-1).view(torch.uint8)  # [bytes], pages not yet read
                if buffer.numel() < raw.numel():
                    buffer = torch.empty(raw.numel(), dtype=torch.uint8)
                buffer[: raw.numel()].copy_(raw)
                total += raw.numel()
    return total


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc); the peak is ru_maxrss, this is the floor it is measured against."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_measurement(args: argparse.Namespace) -> dict[str, Any]:
    import numpy  # noqa: F401 (imported by the scan; loaded here so its RSS counts as overhead)
    import safetensors.torch  # noqa: F401
    import torch

    from rlopt_cli.sparsity.compare import sparsity

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = current_rss_bytes()  # after the imports: the overhead every command pays
    start = time.perf_counter()
    if args.worker == "read":
        nbytes = read_all(args.files)
        changed = None
    else:
        result = sparsity(*args.files)
        nbytes = sum(Path(f).stat().st_size for f in args.files)
        changed = result.total.rules()["bitwise"]["fraction"]
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "bytes": nbytes,
        "base_rss": base,
        "peak_rss": peak_rss_bytes(),
        "frac": changed,
    }


# ---------------------------------------------------------------------------------------------------------------
# the comparison


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.worker == "write":
        emit({"largest": write_pair(Path(args.files[0]), Path(args.files[1]), args.size_gb * GB, args.dtype)})
        return []
    if args.worker:
        emit(run_measurement(args))
        return []
    size = args.size_gb * GB
    root = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(root).free
    if 2.2 * size > free:
        raise SystemExit(f"not enough disk in {root}: {free / GB:.1f} GB free, need {2.2 * size / GB:.1f} GB")
    tmp = Path(tempfile.mkdtemp(prefix="rlopt-bench-sparsity-", dir=root))
    try:
        # The pair is written by a worker too: a child inherits its parent's peak RSS at fork (Linux), so the
        # parent stays small (no torch) and each worker's ru_maxrss is its own.
        files = [str(tmp / "A.safetensors"), str(tmp / "B.safetensors")]
        largest = run_worker(
            "benchmarks.bench_sparsity",
            ["--worker", "write", "--size-gb", str(args.size_gb), "--dtype", args.dtype, "--files", *files],
        )["largest"]
        total = sum(Path(f).stat().st_size for f in files)
        print(f"pair: 2 x {total / 2 / GB:.2f} GB {args.dtype}, largest tensor {mib(largest)}", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {"read": [], "scan": []}
        for _ in range(args.rounds):
            for side in runs:
                worker_args = ["--worker", side, "--threads", str(args.threads), "--files", *files]
                runs[side].append(run_worker("benchmarks.bench_sparsity", worker_args))
                r = runs[side][-1]
                rss = f"peak RSS {mib(r['peak_rss'])} ({mib(r['base_rss'])} after imports)"
                print(f"  {side}: {r['seconds']:.2f} s, {rss}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report(runs, largest, "" if args.dtype == "bf16" else f"_{args.dtype}")


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


def report(runs: dict[str, list[dict[str, Any]]], largest: int, suffix: str = "") -> list[str]:
    best = {side: min(r["seconds"] for r in rs) for side, rs in runs.items()}
    speed = {side: runs[side][0]["bytes"] / best[side] / GB for side in runs}
    for side in runs:
        print(
            f"{side:>5}: {speed[side]:.2f} GB/s (best of {len(runs[side])}: {best[side]:.2f} s)", flush=True
        )
    scan = max(runs["scan"], key=lambda r: r["peak_rss"])
    over = scan["peak_rss"] - scan["base_rss"]
    print(
        f"scan: {100 * scan['frac']:.2f}% changed bitwise; peak RSS {scan['peak_rss'] / 2**20:.0f} MiB",
        flush=True,
    )
    ratio = speed["scan"] / speed["read"]
    return [
        verdict(
            f"sparsity_throughput_ratio{suffix}",
            f"{ratio:.2f} (scan {speed['scan']:.2f} GB/s / read {speed['read']:.2f} GB/s)",
            f"target >= {TARGET_RATIO}",
            ratio >= TARGET_RATIO,
        ),
        verdict(
            f"sparsity_peak_rss{suffix}",
            f"{over / 2**20:.0f} MiB over imports = {over / largest:.2f}x the largest tensor ({mib(largest)})",
            "target < 2x largest tensor + overhead",
            over < 2 * largest + RSS_SLACK,
        ),
    ]


if __name__ == "__main__":
    main()
