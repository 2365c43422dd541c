"""The optimizer registry: explicit arguments and exact optimizer-state byte accounting."""

from __future__ import annotations

import pytest
import torch

from rlopt_cli.algo.optimizers import build_optimizer, state_bytes
from rlopt_cli.config.optimizers import expected_state_bytes_per_param, resolved_args


def one_step(name: str, args: dict) -> tuple[dict[str, int], int]:
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 3))  # 283 params in 4 tensors
    opt = build_optimizer(model.parameters(), name, 0.01, 0.0, args)
    model(torch.randn(5, 10)).sum().backward()
    opt.step()
    return state_bytes(opt), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "args", "keys"),
    [
        ("sgd", {}, {}),
        ("sgd", {"momentum": 0.9}, {"momentum_buffer": 4}),
        ("adamw", {}, {"exp_avg": 4, "exp_avg_sq": 4}),
        ("rmsprop", {}, {"square_avg": 4}),
        ("rmsprop", {"momentum": 0.9}, {"square_avg": 4, "momentum_buffer": 4}),
    ],
)
def test_state_bytes_by_key(name: str, args: dict, keys: dict[str, int]) -> None:
    held, n = one_step(name, args)
    for key, per_param in keys.items():
        assert held[key] == per_param * n
    tensor_bytes = sum(per * n for per in keys.values())
    assert expected_state_bytes_per_param(name, args) * n == tensor_bytes
    # AdamW also keeps a float32 `step` scalar per tensor (4 tensors x 4 bytes); nothing else is held
    extra = 16 if name == "adamw" else (16 if name == "rmsprop" else 0)
    assert held["total"] == tensor_bytes + extra


def test_defaults_are_explicit() -> None:
    assert resolved_args("sgd", {}) == {"momentum": 0.0, "nesterov": False}
    assert resolved_args("adamw", {"eps": 1e-6}) == {"betas": (0.9, 0.999), "eps": 1e-6}
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], "adamw", 1e-3, 0.0, {})
    assert opt.param_groups[0]["weight_decay"] == 0.0  # not torch's AdamW default of 0.01


def test_update_kernels_per_device() -> None:
    """CPU steps tensor by tensor (bit-identical to every earlier run); CUDA steps with foreach kernels."""
    from rlopt_cli.algo.optimizers import update_kernels

    assert update_kernels("cpu") == {"foreach": False}
    assert update_kernels("cuda") == {"foreach": True}
    assert update_kernels("meta") == {"foreach": False}
    for name in ("sgd", "adamw", "rmsprop"):
        opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), name, 0.01, 0.0, {})
        assert opt.param_groups[0]["foreach"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parameters_get_foreach() -> None:
    opt = build_optimizer(torch.nn.Linear(2, 2).cuda().parameters(), "adamw", 0.01, 0.0, {})
    assert opt.param_groups[0]["foreach"] is True
