"""The optimizer registry as data: which optimizers exist, their explicit arguments and defaults, and the
textbook size of their state. The config validates against it; rlopt_cli/algo/optimizers.py builds them.

We build torch optimizers ourselves rather than through `TrainingArguments.optim`, so no argument is dropped
on the way (transformers#44075 silently ignored SGD's momentum) and weight decay is never inherited from a
framework default (verl's 0.01 reaches SGD as coupled L2).

Expected optimizer state per parameter (fp32): sgd 0 bytes, sgd+momentum 4, rmsprop 4 (+4 with momentum),
adamw 8 (exp_avg + exp_avg_sq).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rlopt_cli.errors import RloptError


@dataclass(frozen=True)
class OptimizerSpec:
    torch_class: str
    """Name of the class in torch.optim."""
    defaults: dict[str, Any]
    """Every optimizer-specific argument rlopt passes, with the value used when the recipe leaves it unset."""


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec("SGD", {"momentum": 0.0, "nesterov": False}),
    "adamw": OptimizerSpec("AdamW", {"betas": (0.9, 0.999), "eps": 1e-8}),
    "rmsprop": OptimizerSpec("RMSprop", {"alpha": 0.99, "eps": 1e-8, "momentum": 0.0}),
}


def check_optimizer_args(name: str, args: dict[str, Any]) -> None:
    """Reject arguments the optimizer does not take, and nesterov without momentum (torch would raise later)."""
    spec = OPTIMIZERS[name]
    for key in args:
        if key not in spec.defaults:
            valid = ", ".join(spec.defaults)
            raise RloptError(
                f"optimizer {name!r} has no argument {key!r} (it takes: {valid}); remove optimizer.{key}"
            )
    if args.get("nesterov") and not args.get("momentum"):
        raise RloptError("optimizer.nesterov = true needs optimizer.momentum > 0")
    betas = args.get("betas")
    if betas is not None and not all(0 <= b < 1 for b in betas):
        raise RloptError(f"optimizer.betas = {list(betas)} must each be in [0, 1)")
    # torch checks these only when the optimizer is built, after the run folder exists; `not 0 <= x` catches nan
    bounds = {
        "momentum": (0.0, math.inf, "a finite number >= 0"),
        "eps": (0.0, math.inf, "a finite number > 0"),
    }
    bounds["alpha"] = (0.0, 1.0, "in [0, 1]")
    for key, (low, high, what) in bounds.items():
        value = args.get(key)
        if value is None:
            continue
        if not (low <= value <= high and math.isfinite(value)) or (key == "eps" and value == 0):
            raise RloptError(f"optimizer.{key} = {value} must be {what}")


def resolved_args(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """The registry defaults overlaid with the user's arguments: exactly what the optimizer is built with."""
    return {**OPTIMIZERS[name].defaults, **args}


def expected_state_bytes_per_param(name: str, args: dict[str, Any]) -> int:
    """The textbook fp32 state size per parameter, to compare with `state_bytes` (the 'step' scalars aside)."""
    full = resolved_args(name, args)
    if name == "adamw":
        return 8
    if name == "sgd":
        return 4 if full["momentum"] else 0
    return 4 + (4 if full["momentum"] else 0)
