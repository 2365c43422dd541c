"""The paper study's measurements, computed from run folders only (never a live trainer).

- `weight_update`: from a run's starting and final fp32 master weights (its checkpoints' trainer state, saved by one
  process or sharded by several: `training/trainer_state.master_weights`): the L2 norm
  of the total update, the changed fraction when stored in bf16 and in fp32, the ULP-based prediction of the bf16
  changed fraction, mean over coordinates of min(1, |dw| / ulp_bf16(w0)), and the histogram of |dw| / ulp_bf16(w0).
- `at_matched_norm`: one optimizer's changed fraction interpolated at another's update norm (log-log), so the
  sparsity contrast is also read at equal update size, not only at each optimizer's best LR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlopt_cli.training.checkpoint import list_checkpoints
from rlopt_cli.training.trainer_state import master_weights
from rlopt_cli.training.update_fraction import ulp_bf16

RATIO_BINS = [-math.inf, *range(-6, 5), math.inf]  # log10(|dw| / ulp) bin edges; 0 = one ULP


@dataclass(frozen=True)
class WeightUpdate:
    n: int
    update_l2: float
    changed_bf16: float
    """Fraction of coordinates whose bf16 value changed (bitwise)."""
    changed_fp32: float
    """Fraction whose fp32 master value changed (bitwise): the sparsity fp32 storage would show."""
    predicted_bf16: float
    """Mean over coordinates of min(1, |dw| / ulp_bf16(w0)): the ULP mechanism's prediction of changed_bf16."""
    median_step_ulp: float
    """Median over all coordinates of |dw| / ulp_bf16(w0)."""
    ratio_hist: list[int]
    """Counts of log10(|dw| / ulp_bf16(w0)) in RATIO_BINS (exact zeros in the first bin)."""


def weight_update(run_dir: Path) -> WeightUpdate:
    """Compare the run's step-0 and last checkpoints' fp32 master weights, tensor by tensor."""
    import torch  # heavy: imported on use

    ckpts = list_checkpoints(run_dir)
    n = 0
    sq = changed16 = changed32 = predicted = 0.0
    hist = torch.zeros(len(RATIO_BINS) - 1, dtype=torch.long)
    samples = []
    edges = torch.tensor(RATIO_BINS[1:-1], dtype=torch.float32)
    for (name, start), (same, end) in zip(master_weights(ckpts[0]), master_weights(ckpts[-1]), strict=True):
        assert name == same, (name, same)  # one model, saved in one order
        w0, w1 = start.float().flatten(), end.float().flatten()  # [n_t]
        delta = (w1 - w0).abs()  # [n_t]
        ratio = delta / ulp_bf16(w0)  # [n_t]
        n += w0.numel()
        sq += float((delta.double() ** 2).sum())
        changed16 += int((w1.to(torch.bfloat16) != w0.to(torch.bfloat16)).sum())
        changed32 += int((w1 != w0).sum())
        predicted += float(ratio.clamp(max=1.0).sum())
        logs = torch.where(ratio > 0, ratio.log10(), torch.full_like(ratio, -math.inf))
        hist += torch.bincount(torch.bucketize(logs, edges), minlength=len(RATIO_BINS) - 1)
        samples.append(ratio[:: max(1, ratio.numel() // 20_000)])
    return WeightUpdate(
        n=n,
        update_l2=math.sqrt(sq),
        changed_bf16=changed16 / n,
        changed_fp32=changed32 / n,
        predicted_bf16=predicted / n,
        median_step_ulp=float(torch.cat(samples).median()),
        ratio_hist=hist.tolist(),
    )


def at_matched_norm(points: Sequence[tuple[float, float]], norm: float) -> float | None:
    """Interpolate y at x = norm in log-log space over (update_norm, changed_fraction) points; None outside."""
    pts = sorted((x, y) for x, y in points if x > 0 and y > 0)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= norm <= x1:
            if x1 == x0:
                return y0
            t = (math.log(norm) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None
