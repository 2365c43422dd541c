"""In-training update sparsity: which parameters has the run changed since its starting weights?

The reference is a compact copy of the starting weights in the checkpoint dtype (bf16 by default: 2 bytes per
parameter, not a second fp32 model), held in host memory: on a GPU it would take 3.4 GB of the device at
Qwen3-1.7B for a comparison made once per evaluation. A coordinate counts as changed when its current value,
rounded to that dtype, differs bitwise from the reference, or (the papers' rule) differs by more than atol = 1e-5.

Why bf16 makes updates sparse: a stored bf16 weight changes only once the accumulated fp32 step passes about half
a bf16 ULP (|w|/512 to |w|/256). `ulp_ratios` measures how far each coordinate's total step is from that.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

ATOL = 1e-5
ULP_SAMPLE = 1 << 20  # coordinates per tensor for the ULP medians: exact enough, cheap at 8B scale


def ulp_bf16(w: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |w| (8 significant bits): 2^(floor(log2|w|) - 7); the subnormal floor at 0."""
    mag = w.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def changed_masks(
    current: torch.Tensor, reference: torch.Tensor, atol: float = ATOL
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitwise, atol) change masks of `current` rounded to the reference's dtype."""
    cur = current.detach().to(reference.dtype).to(reference.device)  # one tensor at a time to the host
    if reference.dtype.itemsize == 2:
        bitwise = cur.view(torch.int16) != reference.view(torch.int16)
    elif reference.dtype.itemsize == 4:
        bitwise = cur.view(torch.int32) != reference.view(torch.int32)
    else:
        bitwise = cur != reference
    beyond = (cur.float() - reference.float()).abs() > atol
    return bitwise, beyond


class UpdateReference:
    """The starting weights, held in the checkpoint dtype, and the fractions changed since."""

    def __init__(self, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.reference = {name: w.detach().to("cpu", dtype, copy=True) for name, w in weights.items()}
        self.n = sum(w.numel() for w in self.reference.values())

    @classmethod
    def from_model(cls, model: Any, dtype: torch.dtype) -> UpdateReference:
        return cls(dict(model.named_parameters()), dtype)

    @classmethod
    def from_file(cls, checkpoint: Path, model: Any, dtype: torch.dtype) -> UpdateReference:
        """The starting weights as saved in `checkpoint` (one or many safetensors shards)."""
        from safetensors import safe_open  # heavy: imported on use

        wanted = dict(model.named_parameters())
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(checkpoint.glob("*.safetensors")):
            if shard.name.startswith("trainer_state"):
                continue
            with safe_open(str(shard), framework="pt") as f:
                weights |= {k: f.get_tensor(k) for k in f.keys() if k in wanted}  # noqa: SIM118
        missing = set(wanted) - set(weights)
        if missing:
            raise RuntimeError(f"{checkpoint} lacks starting weights for {sorted(missing)[:3]}")
        return cls({k: weights[k] for k in wanted}, dtype)  # in host memory: the device has better uses

    @torch.no_grad()
    def fractions(self, model: Any) -> dict[str, float]:
        bitwise = atol = 0
        for name, param in model.named_parameters():
            b, a = changed_masks(param, self.reference[name])
            bitwise += int(b.sum())
            atol += int(a.sum())
        return {"sparsity/bitwise_frac": bitwise / self.n, "sparsity/atol_frac": atol / self.n}

    @torch.no_grad()
    def ulp_ratios(self, model: Any) -> dict[str, float]:
        """Median |w - w0| / ulp_bf16(w0) over changed and over unchanged coordinates (bf16 bitwise rule)."""
        gen = torch.Generator().manual_seed(0)
        changed, unchanged = [], []
        for name, param in model.named_parameters():
            ref = self.reference[name]
            flat_w, flat_ref = param.detach().float().flatten().cpu(), ref.float().flatten().cpu()
            if flat_w.numel() > ULP_SAMPLE:
                idx = torch.randint(flat_w.numel(), (ULP_SAMPLE,), generator=gen)
                flat_w, flat_ref = flat_w[idx], flat_ref[idx]
            ratio = (flat_w - flat_ref).abs() / ulp_bf16(flat_ref)
            moved = flat_w.to(torch.bfloat16).view(torch.int16) != flat_ref.to(torch.bfloat16).view(
                torch.int16
            )
            changed.append(ratio[moved])
            unchanged.append(ratio[~moved])
        out = {}
        for key, parts in (("all", changed + unchanged), ("changed", changed), ("unchanged", unchanged)):
            values = torch.cat(parts)
            out[f"sparsity/ulp_ratio_median_{key}"] = (
                float(values.median()) if values.numel() else float("nan")
            )
        return out


def weights_before_step(model: Any) -> list[torch.Tensor]:
    """A copy of the weights for `step_norm` (log.update_norm): transient, one fp32 model's worth."""
    return [p.detach().clone() for p in model.parameters()]


@torch.no_grad()
def step_norm(model: Any, before: list[torch.Tensor]) -> float:
    """L2 norm of the weight change since `before`: the optimizer step actually taken (after clipping, the lr
    and the optimizer's own scaling), which is what decides how many bf16 weights can change."""
    total = sum(
        float((p.detach() - b).float().pow(2).sum()) for p, b in zip(model.parameters(), before, strict=True)
    )
    return math.sqrt(total)
