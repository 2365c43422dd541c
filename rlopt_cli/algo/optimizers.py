"""Build the registry's optimizers (rlopt_cli/config/optimizers.py) in torch, and measure the state they hold.

`state_bytes` measures what `optimizer.state` really holds, to compare with the registry's textbook sizes.
"""

from __future__ import annotations

from typing import Any

import torch

from rlopt_cli.config.optimizers import OPTIMIZERS, resolved_args


def update_kernels(device_type: str) -> dict[str, Any]:
    """How torch applies the update on `device_type`'s parameters.

    CPU: tensor by tensor (foreach=False), as every run so far: the same numbers, bit for bit. CUDA: foreach, one
    kernel per operation over all tensors instead of one per tensor (Qwen3-1.7B has 310 tensors, so the
    per-tensor loop is launch-bound); torch's own CUDA default. foreach applies the loop's elementwise formulas
    op by op; fused computes the whole update in one kernel with its own rounding, so it is not the loop's
    arithmetic and is not used (neither was compared on a GPU here). The cost: AdamW's (and RMSprop's) foreach
    step holds one transient fp32 list as large as the parameters (its sqrt(v)), which `rlopt plan` counts. A
    resumed run keeps the choice its checkpoint was saved with (torch restores `foreach` with the param groups),
    so resume stays exact."""
    return {"foreach": device_type == "cuda"}


def build_optimizer(
    params: Any, name: str, lr: float, weight_decay: float, args: dict[str, Any]
) -> torch.optim.Optimizer:
    params = list(params)
    spec = OPTIMIZERS[name]
    cls = getattr(torch.optim, spec.torch_class)
    kernels = update_kernels(params[0].device.type if params else "cpu")
    return cls(params, lr=lr, weight_decay=weight_decay, **kernels, **resolved_args(name, args))


def state_bytes(optimizer: torch.optim.Optimizer, local: bool = False) -> dict[str, int]:
    """Bytes held in `optimizer.state`, by state key (exp_avg, exp_avg_sq, momentum_buffer, ...), and 'total'.

    Sharded (FSDP2), the state tensors are DTensors, whose numel is the global size: the whole run's bytes;
    `local` counts this process's shards instead (`to_local`), what its device holds."""
    by_key: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                if local and hasattr(value, "to_local"):  # a DTensor
                    value = value.to_local()
                by_key[key] = by_key.get(key, 0) + value.numel() * value.element_size()
    by_key["total"] = sum(by_key.values())
    return by_key
