"""MATH / MATH-500 from local files, graded with math-verify.

Formats, JSONL or Parquet (read by `rlopt_cli.tasks.files`): MATH-500's `problem` + `answer` (preferred when both
are present), Hendrycks MATH's `problem` + `solution` (the gold is the solution's last `\\boxed{}`, braces
balanced), or verl's `prompt` + `reward_model.ground_truth`. Prompts end in verl's suffix `PROMPT_SUFFIX`.

Grading follows TRL's `accuracy_reward`: the gold is parsed first (wrapped in `\\boxed{}`), then the completion
with boxed answers taking priority and no un-anchored guessing, and `verify(gold, completion)` gives 1/0. A gold
that math-verify cannot parse cannot be graded: TRL skips such an example, so here it is dropped when the task
is built and a warning says how many were. Deliberate differences from TRL:
- only the completion's *last* `\\boxed{}` counts (the MATH convention the gold uses too), not the set of all;
- malformed operators (`\\frac12`, `\\sqrt2`) are repaired, as model outputs often write them;
- math-verify's own timeouts use `signal.alarm`, which fails outside the main thread; they are turned off and
  each parse / verify runs in a daemon thread joined with `TIMEOUT_S`. A timed-out call scores 0 and its thread
  is abandoned (Python cannot kill a thread); it ends when sympy does.
Golds are parsed once when the task is built (a few ms each: ~30 s for MATH's 7.5k train problems).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from rlopt_cli.config.schema import TaskConfig
from rlopt_cli.errors import RloptError
from rlopt_cli.tasks import Example, Task
from rlopt_cli.tasks.files import field, load_split, prompt_text, required

PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."
FORMATS = {
    "math500": ("problem", "answer"),
    "math": ("problem", "solution"),
    "verl": ("prompt", "reward_model"),
}
TIMEOUT_S = 5.0  # per parse or verify call, as math-verify's default
T = TypeVar("T")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5) :]  # after '\\boxed' / '\\fbox'
    if rest.startswith(" "):  # `\boxed 5` form: up to the next `$` or whitespace
        return rest.split()[0].split("$")[0] if rest.split() else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced


def with_timeout(fn: Callable[[], T], default: T, seconds: float = TIMEOUT_S) -> T:
    """`fn()` in a daemon thread, or `default` if it takes longer than `seconds` or raises. Thread-safe."""
    result: list[T] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception:  # math-verify raises on odd LaTeX; an ungradable answer scores 0
            pass

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else default


class Grader:
    """math-verify with TRL's extraction settings; parsed golds are cached by their text."""

    def __init__(self) -> None:
        try:
            from math_verify import LatexExtractionConfig, parse, verify  # heavy: imported on use
            from math_verify.parser import NormalizationConfig  # heavy: imported on use
        except ModuleNotFoundError:
            raise RloptError("task 'math' needs math-verify: pip install -e '.[real]'") from None
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call with timeouts off
        self._parse, self._verify = parse, verify
        norm = NormalizationConfig(
            basic_latex=True, units=True, malformed_operators=True, nits=False, boxed="last"
        )
        self._completion_config = [
            LatexExtractionConfig(
                normalization_config=norm, boxed_match_priority=0, try_extract_without_anchor=False
            )
        ]
        self._golds: dict[str, list[Any]] = {}

    def gold(self, answer: str) -> list[Any]:
        """The parsed gold (an empty list when it does not parse)."""
        if answer not in self._golds:
            text = f"\\boxed{{{answer}}}"
            self._golds[answer] = with_timeout(lambda: self._parse(text, parsing_timeout=None), [])
        return self._golds[answer]

    def __call__(self, completion: str, example: Example) -> float:
        gold = self.gold(example.answer)
        if not gold:
            return 0.0
        config = self._completion_config

        boxed = last_boxed(completion)  # math-verify would take the first box; MATH's convention is the last
        text = completion if boxed is None else f"\\boxed{{{boxed}}}"

        def grade() -> bool:
            pred = self._parse(
                text, extraction_config=config, extraction_mode="first_match", parsing_timeout=None
            )
            return bool(pred) and bool(self._verify(gold, pred, timeout_seconds=None))

        return 1.0 if with_timeout(grade, False) else 0.0


def to_example(row: dict[str, Any], fmt: str) -> Example | None:
    """An Example, or None for a MATH solution without a `\\boxed{}` answer."""
    if fmt == "verl":
        gold = field(row, "reward_model.ground_truth")
        solution = field(row, "extra_info.answer") or field(row, "extra_info.solution")
        prompt = prompt_text(row["prompt"])
    else:
        prompt = required(row, "problem")
        solution = row.get("solution")
        gold = row["answer"] if fmt == "math500" else last_boxed(str(solution))
    if gold is None:
        return None
    prompt = prompt.strip()
    prompt = prompt if prompt.endswith(PROMPT_SUFFIX) else f"{prompt} {PROMPT_SUFFIX}"
    return Example(prompt, str(gold).strip(), str(solution or f"\\boxed{{{gold}}}"))


def load_examples(cfg: TaskConfig, key: str, grader: Grader, limit: int = 0) -> list[Example]:
    """One split, without the examples whose gold cannot be graded (counted in a warning, as TRL skips them)."""
    fmt, rows = load_split(cfg.name, key, getattr(cfg, key), FORMATS, limit)
    examples = [e for e in (to_example(row, fmt) for row in rows) if e is not None and grader.gold(e.answer)]
    if skipped := len(rows) - len(examples):
        warnings.warn(
            f"task math: skipped {skipped} of {len(rows)} rows of {getattr(cfg, key)} whose gold answer "
            "has no \\boxed{} or does not parse with math-verify",
            stacklevel=2,
        )
    return examples


def build(cfg: TaskConfig) -> Task:
    grader = Grader()
    return Task(
        name="math",
        train=load_examples(cfg, "train_file", grader),
        eval=load_examples(cfg, "eval_file", grader, cfg.n_eval),
        verify=grader,
    )
