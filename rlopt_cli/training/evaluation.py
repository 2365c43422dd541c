"""Accuracy on a task's eval split: greedy decoding, and pass@k from k samples per problem.

pass@k uses the unbiased estimator of Chen et al. (2021), 1 - C(n - c, k) / C(n, k) with n samples of which c
are correct; with n = k it is the fraction of problems solved by at least one sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Any

from rlopt_cli.models.loading import render_prompts
from rlopt_cli.rollout import Backend
from rlopt_cli.tasks import Example, Task


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate(
    backend: Backend,
    tokenizer: Any,
    task: Task,
    cfg: Any,
    *,
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    examples: Sequence[Example] | None = None,
) -> dict[str, float]:
    """Greedy accuracy on the eval split; with `samples = k > 0` also pass@k and mean sampled accuracy.
    `cfg` (a RunConfig) gives the completion length, the prompts per generation call and the chat template."""
    max_new_tokens, batch_size = cfg.grpo.max_completion_length, cfg.rollout.eval_batch_size
    examples = list(task.eval if examples is None else examples)
    greedy_correct = 0.0
    per_problem_correct: list[int] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = render_prompts(
            tokenizer, [e.prompt for e in chunk], cfg.task.chat_template, cfg.task.chat_template_kwargs
        )
        greedy = backend.generate(prompts, 1, max_new_tokens, 0.0, seed)
        greedy_correct += sum(task.rewards(greedy.texts, chunk))
        if samples:
            sampled = backend.generate(prompts, samples, max_new_tokens, temperature, seed + start)
            repeated = [e for e in chunk for _ in range(samples)]
            rewards = task.rewards(sampled.texts, repeated)
            per_problem_correct += [
                int(sum(rewards[i * samples : (i + 1) * samples])) for i in range(len(chunk))
            ]
    n = len(examples)
    result: dict[str, float] = {"accuracy": greedy_correct / n, "n": n}
    if samples:
        result[f"pass@{samples}"] = sum(pass_at_k(samples, c, samples) for c in per_problem_correct) / n
        result["sample_accuracy"] = sum(per_problem_correct) / (n * samples)
        result["samples"] = samples
    return result
