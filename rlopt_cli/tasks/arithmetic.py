"""The embedded verifiable task: integer addition, `'47+38='` -> `'85'`.

Seeded and exact: operands have `digits` digits each (the difficulty knob); the eval split is a fixed sample of
`n_eval` problems, and the train split never contains an eval problem. Two prompt styles (`task.prompt_style`):
- bare (the embedded model's): the prompt `'47+38='`; the verifier reads the completion's leading integer, so
  '85' and '85 apples' are right and 'eighty-five', '' and '58' are wrong;
- instruct (chat models): `'Compute 47+38. Reply with just the result.'`; the verifier reads the last integer,
  so '85', '47 + 38 = 85' and '47+38 = 85.' are right and '47 + 38 = 125', 'To compute 47+38, we' are wrong.
  Measured on SmolLM2-135M-Instruct (greedy, 12 tokens, 24 problems): this wording and rule scored 6/24 on
  two-digit sums; the bare prompt 0/24 under either rule (README, "A real model on CPU").
Simplification: one operation (addition) keeps the tiny model's warm-up to seconds.
"""

from __future__ import annotations

import random
import re

from rlopt_cli.config.schema import TaskConfig
from rlopt_cli.tasks import Example, Task

MAX_TRAIN = 50_000  # enough problems that a 1M-parameter model sees few repeats in a demo-length run
_LEADING_INT = re.compile(r"^\s*(-?\d+)")
_INT = re.compile(r"-?\d+")
INSTRUCTION = "Compute {a}+{b}. Reply with just the result."


def canonical(number: str) -> str:
    """'007' -> '7', '-0' -> '0': integers compare by value, not by spelling."""
    return str(int(number))


def extract_answer(completion: str, style: str = "bare") -> str | None:
    """The completion's leading integer (bare) or last integer (instruct), or None if there is none."""
    if style == "instruct":
        numbers = _INT.findall(completion)
        return canonical(numbers[-1]) if numbers else None
    match = _LEADING_INT.match(completion)
    return canonical(match.group(1)) if match else None


def verify(completion: str, example: Example) -> float:
    return 1.0 if extract_answer(completion) == example.answer else 0.0


def verify_instruct(completion: str, example: Example) -> float:
    return 1.0 if extract_answer(completion, "instruct") == example.answer else 0.0


def make_example(a: int, b: int, style: str = "bare") -> Example:
    prompt = INSTRUCTION.format(a=a, b=b) if style == "instruct" else f"{a}+{b}="
    return Example(prompt=prompt, answer=str(a + b), solution=str(a + b))


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
        train=[make_example(a, b, cfg.prompt_style) for a, b in train_pairs],
        eval=[make_example(a, b, cfg.prompt_style) for a, b in eval_pairs],
        verify=verify_instruct if cfg.prompt_style == "instruct" else verify,
    )
