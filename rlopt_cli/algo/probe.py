"""The optimizer probe: what momentum and adaptivity see at chosen steps (paper section 3).

At each step in `probe.steps`, between gradient clipping and the optimizer step, the probe copies the gradient
g_t and the first moment before the step; after the step it reads m_t and v_t. It reports, over all
coordinates of all parameters:
- cos(m_{t-1}, g_t), with m_{t-1} recovered as the paper does, (m_t - (1 - beta1) g_t) / beta1 (AdamW), and the
  same cosine from the snapshot taken before the step (they agree up to rounding; a test checks it);
- the history ratio ||m_{t-1}|| / ||g_t||;
- the spread (std) of sqrt(v_t) (AdamW's exp_avg_sq, RMSProp's square_avg), and histograms of sqrt(v_t) and |g_t|.
Paper, Qwen3-1.7B at step 50: cos 0.997 in SFT vs -0.007 in RL; std sqrt(v) 5.11e-6 in SFT vs 2.29e-7 in RL.

The probe only reads: it never writes a gradient, a parameter or optimizer state, so the trajectory is the same
with or without it (tested). Statistics go to `probe/step-NNNNNN.json` in the run folder and to metrics.jsonl.

Memory: every statistic is a running sum over views of at most CHUNK elements of one parameter at a time
(inner products and squared norms by `torch.dot`, so no temporary at all; sqrt(v), |g| and the recovered
m_{t-1} as chunk-sized temporaries), accumulated across chunks in Python floats (fp64). Nothing whole-model is
ever built: the probe's extra memory is a few x CHUNK floats, at any model size (the whole-vector version held
~6 fp32 copies of the model, ~40 GiB at Qwen3-1.7B). The gradient is not copied either: g_t is read again
after the step from `p.grad`, which rlopt's optimizers (foreach=False) never write; a checksum taken before the
step guards that.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlopt_cli.runtime.atomic_files import atomic_write_json

FIRST_MOMENT = ("exp_avg", "momentum_buffer")
SECOND_MOMENT = ("exp_avg_sq", "square_avg")
HIST_BINS = 60
CHUNK = 1 << 22  # elements per view (16 MiB in fp32): bounds every temporary the probe makes


def _moment(optimizer: Any, p: torch.Tensor, keys: tuple[str, ...]) -> torch.Tensor | None:
    state = optimizer.state.get(p, {})
    return next((state[k] for k in keys if isinstance(state.get(k), torch.Tensor)), None)


def _moments(optimizer: Any, params: list[torch.Tensor], keys: tuple[str, ...]) -> list[torch.Tensor] | None:
    """One moment tensor per parameter, or None unless every parameter holds one (as the statistics need)."""
    found = [_moment(optimizer, p, keys) for p in params]
    return None if any(m is None for m in found) else [m for m in found if m is not None]


def _chunks(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Aligned fp32 views [<= CHUNK] over same-shaped tensors, one parameter after another (no copy when fp32)."""
    flat = [t.detach().reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CHUNK):
        yield tuple(f[start : start + CHUNK].float() for f in flat)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b))


def _cos(dot: float, sq_a: float, sq_b: float) -> float:
    return dot / max(math.sqrt(sq_a) * math.sqrt(sq_b), 1e-30)


class _Spread:
    """Running count, mean and sum of squared deviations (Chan et al.'s parallel update), chunk by chunk."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: torch.Tensor) -> None:
        n = values.numel()
        var, mean = torch.var_mean(values, correction=0)  # within the chunk, in fp32 (pairwise sums)
        delta, total = float(mean) - self.mean, self.n + n
        self.m2 += float(var) * n + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n = total

    @property
    def std(self) -> float:  # unbiased, as torch.std
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else math.nan


class _LogHistogram:
    """Counts of |values| over log10-spaced bins between the smallest and largest non-zero magnitude, in two
    passes over the chunks: the range first, then the counts (the same bins and counts as one whole vector)."""

    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None  # smallest non-zero magnitude, as a 0-d fp32 tensor
        self.hi: torch.Tensor | None = None
        self.total = self.nonzero = 0
        self.counts: torch.Tensor | None = None

    def add_range(self, mags: torch.Tensor) -> None:
        nonzero = mags[mags > 0]
        self.total += mags.numel()
        self.nonzero += nonzero.numel()
        if nonzero.numel():
            lo, hi = nonzero.min(), nonzero.max()
            self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
            self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def add_counts(self, mags: torch.Tensor) -> None:
        if self.lo is None or self.hi is None:
            return
        lo, hi = self.bounds()
        nonzero = mags[mags > 0]
        if nonzero.numel():
            counts = torch.histogram(nonzero.log10().cpu(), bins=torch.linspace(lo, hi, HIST_BINS + 1)).hist
            self.counts = counts if self.counts is None else self.counts + counts

    def bounds(self) -> tuple[float, float]:
        assert self.lo is not None and self.hi is not None
        return float(self.lo.log10()), float(self.hi.log10()) + 1e-6

    def result(self) -> dict[str, list[float]]:
        zeros = [float(self.total - self.nonzero)]
        if self.lo is None:
            return {"edges": [], "counts": [], "zeros": zeros}
        lo, hi = self.bounds()
        counts = self.counts if self.counts is not None else torch.zeros(HIST_BINS)
        return {
            "edges": torch.logspace(lo, hi, HIST_BINS + 1).tolist(),
            "counts": counts.tolist(),
            "zeros": zeros,
        }


def _histogram(tensors: list[torch.Tensor], magnitude: Any) -> dict[str, list[float]]:
    hist = _LogHistogram()
    for t in tensors:
        for (c,) in _chunks(t):
            hist.add_range(magnitude(c))
    for t in tensors:
        for (c,) in _chunks(t):
            hist.add_counts(magnitude(c))
    return hist.result()


class Probe:
    """Snapshot before `optimizer.step()`, measure after it. Holds scalars only between the two."""

    def __init__(self, model: Any, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.grad is not None]
        self.n = sum(p.numel() for p in self.params)
        self.grad_sq = sum(_dot(g, g) for p in self.params for (g,) in _chunks(p.grad))  # ||g_t||^2 (clipped)
        self.snapshot: dict[str, float] = {}
        m_prev = _moments(optimizer, self.params, FIRST_MOMENT)  # None at the first step
        if m_prev is not None:  # cos(m_{t-1}, g_t) from the moment as it is before the step
            dot = sq = 0.0
            for p, m in zip(self.params, m_prev, strict=True):
                for mc, gc in _chunks(m, p.grad):
                    dot += _dot(mc, gc)
                    sq += _dot(mc, mc)
            self.snapshot = {"cos_m_prev_g_snapshot": _cos(dot, sq, self.grad_sq), "m_prev_sq": sq}

    def after_step(self) -> dict[str, Any]:
        grads = [p.grad for p in self.params]
        if sum(_dot(g, g) for t in grads for (g,) in _chunks(t)) != self.grad_sq:  # same sums, same data
            raise RuntimeError("the optimizer step changed the gradient in place; the probe cannot read g_t")
        group = self.optimizer.param_groups[0]
        m_t = _moments(self.optimizer, self.params, FIRST_MOMENT)
        v_t = _moments(self.optimizer, self.params, SECOND_MOMENT)
        g_norm = math.sqrt(self.grad_sq)
        stats: dict[str, Any] = {"grad_norm": g_norm, "n": self.n}
        if m_t is not None and "betas" in group:  # AdamW: the paper's recovery of m_{t-1}
            beta1 = group["betas"][0]
            dot = sq = 0.0
            for m, g in zip(m_t, grads, strict=True):
                for mc, gc in _chunks(m, g):
                    recovered = (mc - (1 - beta1) * gc) / beta1  # [<= CHUNK]
                    dot += _dot(recovered, gc)
                    sq += _dot(recovered, recovered)
            stats["cos_m_prev_g"] = _cos(dot, sq, self.grad_sq)
            stats["history_ratio"] = math.sqrt(sq) / max(g_norm, 1e-30)
        if self.snapshot:
            stats["cos_m_prev_g_snapshot"] = self.snapshot["cos_m_prev_g_snapshot"]
            stats.setdefault("history_ratio", math.sqrt(self.snapshot["m_prev_sq"]) / max(g_norm, 1e-30))
        if v_t is not None:
            spread = _Spread()
            for v in v_t:
                for (vc,) in _chunks(v):
                    spread.add(vc.sqrt())
            stats["sqrt_v_std"] = spread.std
            stats["sqrt_v_mean"] = spread.mean
            stats["hist_sqrt_v"] = _histogram(v_t, torch.sqrt)
        stats["hist_abs_grad"] = _histogram(grads, torch.abs)
        return stats


def write_probe(run_dir: Path, step: int, stats: dict[str, Any]) -> dict[str, float]:
    """Save the full statistics; return the scalars for metrics.jsonl under `probe/`."""
    atomic_write_json(run_dir / "probe" / f"step-{step:06d}.json", {"step": step, **stats})
    return {f"probe/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))}
