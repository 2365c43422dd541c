"""Shared fixtures: pinned CPU kernels, an isolated cache and W&B offline, a tiny, fast configuration of the
embedded default, and training signals forced by construction."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from rlopt_cli.runtime import cpu_kernels
from rlopt_cli.tasks import Example, Task

REPO = Path(__file__).resolve().parents[1]

# The suite runs on one kernel set, pinned before anything imports torch, so a trajectory that passes on one
# machine passes on every x86-64 machine. `make test` runs the tests marked `trajectory` again on other kernels
# (RLOPT_TEST_CPU_ISA=native and =baseline): those must hold on any trajectory, not just this one.
TEST_CPU_ISA = os.environ.get("RLOPT_TEST_CPU_ISA", "avx2")
if _note := cpu_kernels.pin(TEST_CPU_ISA):
    print(_note)

# Runs in tests are tiny: a 2-layer, width-64 embedded model on single-digit addition, warmed up by 100 SFT
# steps (to ~35% accuracy, so GRPO has a reward signal; cached once per test session), 2 prompts x 4 samples.
TINY = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.warmup_steps=100",
    "model.warmup_lr=3e-3",
    "model.warmup_batch_size=32",
    "task.digits=1",
    "task.n_eval=32",
    "grpo.num_generations=4",
    "grpo.batch_size=8",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "log.progress=false",
    f"train.cpu_isa='{TEST_CPU_ISA}'",
]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path_factory.getbasetemp() / "rlopt-cache"
    monkeypatch.setenv("RLOPT_CACHE", str(cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


Pattern = Callable[[int, int], float]
"""(GRPO step's call number from 1, row index in the batch) -> reward."""


@dataclasses.dataclass(frozen=True)
class ForcedTask(Task):
    """A real task whose training rewards follow a pattern fixed in advance (eval keeps the real verifier), so a
    test that needs a learning signal has one by construction, on any trajectory the kernels produce."""

    pattern: Pattern = lambda call, row: 0.0
    calls: list[int] = dataclasses.field(default_factory=list)

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        train_ids = {id(e) for e in self.train}
        if not examples or id(examples[0]) not in train_ids:  # an eval batch
            return super().rewards(completions, examples)
        self.calls.append(len(self.calls) + 1)
        return [self.pattern(self.calls[-1], row) for row in range(len(completions))]


def first_of_each(group: int) -> Pattern:
    """Reward 1 for the first completion of every group, 0 for the rest: every group has a non-zero advantage."""
    return lambda call, row: float(row % group == 0)


def force_rewards(monkeypatch: pytest.MonkeyPatch, pattern: Pattern) -> None:
    """Every task the trainer builds from now on scores its training rollouts by `pattern`."""
    from rlopt_cli.training import loop as trainer

    real = trainer.build_task

    def build(cfg: object) -> Task:
        task = real(cfg)  # type: ignore[arg-type]
        fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(Task)}
        return ForcedTask(**fields, pattern=pattern)

    monkeypatch.setattr(trainer, "build_task", build)


@pytest.fixture
def forced_rewards(monkeypatch: pytest.MonkeyPatch) -> Callable[[Pattern], None]:
    """`forced_rewards(pattern)`: see `force_rewards`."""
    return lambda pattern: force_rewards(monkeypatch, pattern)
