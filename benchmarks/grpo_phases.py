"""Where a GRPO step's time goes, on both sides of `bench_grpo_vs_trl`: the same five phases for each trainer.

Wall-clock timers around the functions each trainer calls (wrapped in place inside the worker process), summed
per optimizer step and reported as medians. A few `perf_counter` calls per step: cheap enough to stay on in
every measured run, so the profile and the ratio come from the same steps.
- generate: rlopt's backend `generate` (its `time/gen_s`); TRL's `_generate` (tokenize, `model.generate`,
  decode);
- forward: the policy forward and its log-softmax, rlopt's `grpo.token_logprobs`, TRL's
  `_get_per_token_logps_and_entropies`;
- backward: `torch.autograd.backward`, which `loss.backward()` calls, on both sides;
- step: gradient clipping and the optimizer step (rlopt's `clip_and_step`; TRL's `clip_grad_norm_` and the
  optimizer's own step, timed by its step hooks);
- other: the rest of the step (rewards, advantages, the loss arithmetic, batching, the trainers' bookkeeping).
Simplification: the timers see Python calls, not threads; with one torch thread (the benchmark's default) a
phase's wall time is its compute.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

PHASES = ("generate", "forward", "backward", "step", "other")


class PhaseClock:
    """Seconds per phase within the current step; `end_step` files them and starts the next."""

    def __init__(self) -> None:
        self.current = dict.fromkeys(PHASES[:-1], 0.0)
        self.steps: list[dict[str, float]] = []
        self._open: dict[str, float] = {}

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - t0

        return timed

    def begin(self, phase: str) -> None:
        """Open a span closed by `end` (for code reached through hooks, not one call)."""
        self._open[phase] = time.perf_counter()

    def end(self, phase: str) -> None:
        self.current[phase] += time.perf_counter() - self._open.pop(phase)

    def end_step(self, total_s: float, generate_s: float | None = None) -> None:
        """File this step (`generate_s` overrides the timed generation, e.g. from rlopt's metrics)."""
        row = dict(self.current)
        if generate_s is not None:
            row["generate"] = generate_s
        row["other"] = max(0.0, total_s - sum(row.values()))
        self.steps.append(row)
        self.current = dict.fromkeys(PHASES[:-1], 0.0)


@contextlib.contextmanager
def wrapped(clock: PhaseClock, targets: list[tuple[Any, str, str]]) -> Iterator[None]:
    """Time each `(owner, attribute, phase)` while inside; the originals are put back on the way out (the tests
    run the workers in-process)."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    try:
        for (owner, name, phase), (_, _, fn) in zip(targets, originals, strict=True):
            setattr(owner, name, clock.wrap(phase, fn))
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def trl_targets(trainer: Any) -> list[tuple[Any, str, str]]:
    """What one TRL `GRPOTrainer` step calls; its optimizer's step is timed by `hook_optimizer`."""
    import torch

    return [
        (trainer, "_generate", "generate"),
        (trainer, "_get_per_token_logps_and_entropies", "forward"),
        (torch.autograd, "backward", "backward"),
        (torch.nn.utils, "clip_grad_norm_", "step"),
    ]


def hook_optimizer(optimizer: Any, clock: PhaseClock) -> None:
    """Hooks, not a wrapped `step`: torch's LR scheduler re-wraps `optimizer.step` through its `__func__`."""
    optimizer.register_step_pre_hook(lambda *_: clock.begin("step"))
    optimizer.register_step_post_hook(lambda *_: clock.end("step"))


def rlopt_targets() -> list[tuple[Any, str, str]]:
    """What rlopt's GRPO step calls by module-global name (its generation time comes from its metrics)."""
    import torch

    from rlopt_cli.algo import grpo
    from rlopt_cli.training import steps

    return [
        (grpo, "token_logprobs", "forward"),
        (torch.autograd, "backward", "backward"),
        (steps, "clip_and_step", "step"),
    ]


def median_phases(steps: list[dict[str, float]]) -> dict[str, float]:
    return {phase: statistics.median(s[phase] for s in steps) for phase in PHASES}


def print_profile(profiles: dict[str, list[dict[str, float]]]) -> None:
    """One line per side: median seconds per phase and its share of the summed medians."""
    print("where a step's time goes (median s per phase over the measured steps; share of their sum):")
    for side, steps in profiles.items():
        if not steps:
            continue
        med = median_phases(steps)
        total = sum(med.values()) or 1.0
        cells = "  ".join(f"{p} {med[p]:.3f} ({100 * med[p] / total:.0f}%)" for p in PHASES)
        print(f"{side:>14}: {cells}", flush=True)
    if "trl" in profiles and "rlopt" in profiles and profiles["trl"] and profiles["rlopt"]:
        trl, ours = median_phases(profiles["trl"]), median_phases(profiles["rlopt"])
        ratios = "  ".join(f"{p} {trl[p] / ours[p]:.2f}x" if ours[p] > 0 else f"{p} -" for p in PHASES)
        print(f"{'TRL / rlopt':>14}: {ratios}", flush=True)
