"""The KL penalty's reference model: a frozen copy of the starting policy, in its own dtype, optionally parked in
host memory between its passes.

Why not a deepcopy of the policy: the policy is fp32 (master weights), so a deepcopy costs 4 bytes per parameter
on the device (6.4 GiB at Qwen3-1.7B, 30 GiB at 8B) for a model that only ever runs one no-grad pass per step.
Here each parameter is copied straight into `dtype` on `device` (no fp32 transient), ties kept, buffers (rotary
frequencies) left in their own dtype. bf16 halves it; `offload` keeps it in host memory and moves it to the
trainer's device for its pass only, so during the policy's forward/backward and the rollout it costs the device
nothing.

What bf16 costs: its log-probs differ from the fp32 copy's by bf16 rounding, so the k3 KL reads ~1e-7 where the
policy has not moved, and within 0.5% of the fp32 reference's once it has (tests/test_reference.py, tiny models).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def reference_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA (half the memory, tensor cores), float32 on CPU, where bf16 matmuls are emulated
    on most CPUs (slow) and small runs have memory to spare."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def frozen_copy(model: Any, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Any:
    """An eval-mode copy of `model` with every parameter in `dtype` on `device`, no gradients, sharing no
    storage with `model` (a step of the policy never moves it)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():  # a tied parameter is one object: one copy, so the copy stays tied
        weights = p.detach().to(device=device or p.device, dtype=dtype or p.dtype, copy=True)
        memo[id(p)] = torch.nn.Parameter(weights, requires_grad=False)
    ref = copy.deepcopy(model, memo)  # everything else (config, buffers, hooks) as deepcopy makes it
    if device is not None:
        ref.to(device)  # the buffers; the parameters are there already
    return ref.eval()


class Reference:
    """The reference model, where it lives between passes, and the device its passes run on."""

    def __init__(self, model: Any, dtype: torch.dtype, offload: bool) -> None:
        self.device = next(model.parameters()).device
        self.offload = offload and self.device.type != "cpu"  # on a CPU run there is nowhere else to put it
        self.model = frozen_copy(model, dtype, torch.device("cpu") if self.offload else self.device)

    @contextmanager
    def on_device(self) -> Iterator[Any]:
        """The model on the trainer's device for the block; back in host memory after it when offloaded."""
        if not self.offload:
            yield self.model
            return
        self.model.to(self.device)
        try:
            yield self.model
        finally:
            self.model.to("cpu")
            torch.cuda.empty_cache()  # hand the copy's blocks back before the policy's forward needs them
