"""Where a run computes: the device, bf16 autocast, and peak memory (CUDA's allocator or the process's RSS).

`rlopt eval` and the training loop both resolve devices here, so evaluating does not depend on the trainer.
"""

from __future__ import annotations

import resource
from contextlib import nullcontext
from typing import Any

import torch

from rlopt_cli.errors import RloptError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RloptError(f"train.device = {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RloptError(f"train.device = {name!r} but no CUDA device is available; use train.device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RloptError(f"train.device = {name!r} but there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise RloptError(f"train.device = {name!r}: rlopt trains on cpu or cuda[:N]")
    return device


def autocast(precision: str, device: torch.device) -> Any:
    """bf16 compute over fp32 master weights for train.precision = "bf16-autocast"; nothing otherwise."""
    if precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def peak_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(peak_rss_bytes())


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM belongs to the process's own address space; getrusage's
    ru_maxrss would also carry the parent's peak at fork time into a freshly spawned worker."""
    try:
        for line in open("/proc/self/status"):  # noqa: SIM115 (a short read)
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS
