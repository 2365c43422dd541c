"""The embedded verifiable task: integer addition, `'47+38='` -> `'85'`.

Seeded and exact: operands have `digits` digits each (the difficulty knob); the eval split is a fixed sample of
`n_eval` problems, and the train split never contains an eval problem. The verifier reads the completion's
leading integer, so '85' and '85 apples' are right and 'eighty-five', '' and '58' are wrong.
Simplification: one operation (addition) keeps the tiny model's warm-up to seconds.
"""

from __future__ import annotations

import random
import re

from rlopt_cli.config.schema import TaskConfig
from rlopt_cli.tasks import Example, Task

MAX_TRAIN = 50_000  # enough problems that a 1M-parameter model sees few repeats in a demo-length run
_LEADING_INT = re.compile(r"^\s*(-?\d+)")


def extract_answer(completion: str) -> str | None:
    """The completion's leading integer, or None if it does not start with one."""
    match = _LEADING_INT.match(completion)
    return match.group(1).lstrip("0") or "0" if match else None


def verify(completion: str, example: Example) -> float:
    return 1.0 if extract_answer(completion) == example.answer else 0.0


def make_example(a: int, b: int) -> Example:
    return Example(prompt=f"{a}+{b}=", answer=str(a + b), solution=str(a + b))


def build(cfg: TaskConfig) -> Task:
    low, high = (0, 9) if cfg.digits == 1 else (10 ** (cfg.digits - 1), 10**cfg.digits - 1)
    rng = random.Random(cfg.split_seed)
    space = (high - low + 1) ** 2
    if space <= 2 * MAX_TRAIN:
        pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
        rng.shuffle(pairs)
    else:  # too many to list: sample distinct pairs
        seen: set[tuple[int, int]] = set()
        while len(seen) < cfg.n_eval + MAX_TRAIN:
            seen.add((rng.randint(low, high), rng.randint(low, high)))
        pairs = sorted(seen)
        rng.shuffle(pairs)
    n_eval = min(cfg.n_eval or 200, space // 4)
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval : n_eval + MAX_TRAIN]
    return Task(
        name="arithmetic",
        train=[make_example(a, b) for a, b in train_pairs],
        eval=[make_example(a, b) for a, b in eval_pairs],
        verify=verify,
    )
