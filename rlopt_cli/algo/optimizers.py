"""Build the registry's optimizers (rlopt_cli/config/optimizers.py) in torch, and measure the state they hold.

`state_bytes` measures what `optimizer.state` really holds, to compare with the registry's textbook sizes.
"""

from __future__ import annotations

from typing import Any

import torch

from rlopt_cli.config.optimizers import OPTIMIZERS, resolved_args


def build_optimizer(
    params: Any, name: str, lr: float, weight_decay: float, args: dict[str, Any]
) -> torch.optim.Optimizer:
    spec = OPTIMIZERS[name]
    cls = getattr(torch.optim, spec.torch_class)
    # foreach=False keeps the CPU path simple and bitwise deterministic across resume.
    return cls(params, lr=lr, weight_decay=weight_decay, foreach=False, **resolved_args(name, args))


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held in `optimizer.state`, by state key (exp_avg, exp_avg_sq, momentum_buffer, ...), and 'total'."""
    by_key: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                by_key[key] = by_key.get(key, 0) + value.numel() * value.element_size()
    by_key["total"] = sum(by_key.values())
    return by_key
