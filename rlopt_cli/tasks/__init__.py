"""Tasks: each owns its examples, its answer extraction and its verifier. The reward *is* the verifier.

A task module exposes `build(cfg: TaskConfig) -> Task`. `TASKS` maps names to those builders; file-backed tasks
(GSM8K, MATH) are imported lazily so the embedded default needs no extra packages.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlopt_cli.errors import RloptError, close_matches

if TYPE_CHECKING:
    from rlopt_cli.config.schema import TaskConfig


@dataclass(frozen=True)
class Example:
    prompt: str
    """The text the model continues (before any chat template)."""
    answer: str
    """The gold answer the verifier compares with."""
    solution: str
    """A reference completion (text after the prompt) for SFT."""


@dataclass(frozen=True)
class Task:
    name: str
    train: Sequence[Example]
    eval: Sequence[Example]
    verify: Callable[[str, Example], float]
    """(completion text, example) -> reward in [0, 1]."""

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """List in, list out, like TRL's reward functions."""
        return [self.verify(c, e) for c, e in zip(completions, examples, strict=True)]


# name -> module that defines build(cfg) -> Task
TASKS: dict[str, str] = {
    "arithmetic": "rlopt_cli.tasks.arithmetic",
    "gsm8k": "rlopt_cli.tasks.gsm8k",
    "math": "rlopt_cli.tasks.math",
}


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name not in TASKS:
        raise RloptError(
            f"unknown task {cfg.name!r}; choose one of {', '.join(TASKS)}{close_matches(cfg.name, TASKS)}"
        )
    try:
        module = importlib.import_module(TASKS[cfg.name])
    except ModuleNotFoundError as err:
        raise RloptError(f"task {cfg.name!r} needs {err.name}: pip install -e '.[real]'") from None
    task: Task = module.build(cfg)
    if not task.train or not task.eval:
        split = "train" if not task.train else "eval"
        raise RloptError(f"task {cfg.name!r} has an empty {split} split; check its data file or settings")
    return task
