"""Pin torch's CPU kernels to one instruction set, so a command and seed give the same numbers on any x86-64 CPU.

torch picks its CPU kernels by the machine it runs on: ATen's vectorised ops (sums, softmax, elementwise),
MKL's BLAS (every fp32 matmul) and oneDNN (bf16 matmuls) each take their widest instruction set. AVX2 and
AVX-512 kernels add floats in different orders, so the same seed trains a different trajectory on an AVX-512
CPU than on an AVX2 one (measured: another demo table, and tests that passed by the luck of one trajectory).
Each library reads one environment variable, once, when it first runs a kernel:

    ATEN_CPU_CAPABILITY      ATen's dispatch (default | avx2 | avx512)
    MKL_ENABLE_INSTRUCTIONS  MKL's widest code path (SSE4_2 | AVX2 | AVX512 ...), and MKL_CBWR its
                             reproducibility mode (COMPATIBLE | AVX2 | AVX512)
    ONEDNN_MAX_CPU_ISA       oneDNN's widest code path (SSE41 | AVX2 | AVX512_CORE ...)

so `pin()` sets them before torch is imported: the commands call it right after reading the config (they import
torch lazily), and sweep workers call it before their own first torch import. `train.cpu_isa` chooses:

- "avx2" (default): every x86-64 CPU made since ~2015 runs it; AVX2 and AVX-512 machines give equal numbers.
- "avx512": for machines that all have AVX-512 (faster matmuls on big models).
- "baseline": the kernels every x86-64 CPU runs (slow); the tests use it to check a result does not hang on
  one trajectory.
- "native": leave the libraries to choose (and any variables the user set).

CUDA kernels ignore these variables, so GPU runs are unaffected. On a CPU that lacks the asked-for set, or on a
CPU that is not x86-64 (ARM), nothing is pinned and one line says so; the run goes on with native kernels.
"""

from __future__ import annotations

import os
import platform
from typing import Any

CPU_ISAS = ("avx2", "avx512", "baseline", "native")

# The variables each setting pins. MKL and oneDNN also accept lower ceilings than the CPU has, never higher.
# MKL_CBWR is MKL's own "conditional numerical reproducibility" mode: within one ISA, MKL may still pick code paths
# by the CPU model (cache sizes, core counts); CBWR fixes them, so that Intel CPUs of one ISA agree too.
PINS: dict[str, dict[str, str]] = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "MKL_CBWR": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "MKL_CBWR": "AVX512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
    },
    "baseline": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "MKL_CBWR": "COMPATIBLE",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
    },
}
VARIABLES = tuple(PINS["avx2"])
# CPU flags each setting needs: torch's avx512 kernels use the F, BW, VL and DQ extensions.
NEEDS = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"), "baseline": ()}
# What torch.backends.cpu.get_cpu_capability() reports when the pin took.
ATEN_NAMES = {"avx2": "AVX2", "avx512": "AVX512", "baseline": "DEFAULT"}


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux); None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def pin(isa: str) -> str | None:
    """Set the variables for `isa` in this process's environment (children inherit them).

    Returns a one-line note when nothing could be pinned, else None. Call it before torch is imported: a
    library that already ran a kernel keeps the set it chose (`check` then says so)."""
    if isa == "native":
        return None
    if not is_x86_64():
        return (
            f"note: train.cpu_isa = {isa!r} pins x86-64 kernels; this CPU is {platform.machine()}, so torch "
            "picks its own and numbers may differ from x86-64 machines (set train.cpu_isa = 'native' to "
            "silence this)"
        )
    flags = cpu_flags()
    missing = [f for f in NEEDS[isa] if flags is not None and f not in flags]
    if flags is None or missing:
        why = "its flags cannot be read" if flags is None else f"it lacks {', '.join(missing)}"
        return (
            f"note: train.cpu_isa = {isa!r} but {why}; torch picks its own kernels, so numbers may differ "
            "from other machines (choose another train.cpu_isa, or 'native' to silence this)"
        )
    os.environ.update(PINS[isa])
    return None


def check(isa: str) -> tuple[dict[str, Any], str | None]:
    """After torch is loaded: what the run actually uses (for meta.json), and a note if the pin did not take."""
    import torch  # only here: this module must load, and pin, before torch

    used = torch.backends.cpu.get_cpu_capability()
    record: dict[str, Any] = {
        "cpu_isa": isa,
        "aten_capability": used,
        "environment": {v: os.environ[v] for v in VARIABLES if v in os.environ},
        "cpu": platform.processor() or platform.machine(),
        "cpu_simd_flags": sorted(f for f in (cpu_flags() or ()) if f.startswith(("avx", "sse", "fma"))),
        "torch_threads": torch.get_num_threads(),
    }
    note = None
    if isa in ATEN_NAMES and used != ATEN_NAMES[isa] and PINS[isa].items() <= os.environ.items():
        note = (
            f"note: train.cpu_isa = {isa!r} but torch was loaded before rlopt could pin its kernels (ATen runs "
            f"{used}); numbers may differ from other machines: run through the rlopt command, or set "
            f"{', '.join(f'{k}={v}' for k, v in PINS[isa].items())} before importing torch"
        )
    record["pinned"] = isa in ATEN_NAMES and used == ATEN_NAMES[isa]
    return record, note
