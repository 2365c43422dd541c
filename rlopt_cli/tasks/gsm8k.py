"""GSM8K from local files: grade-school word problems whose answer is one number.

Two file formats, JSONL or Parquet (read by `rlopt_cli.tasks.files`):
- the dataset's own columns: `question`, and `answer` = the worked solution ending in a line `#### 72`;
- verl's preprocessed format (`examples/data_preprocess/gsm8k.py`): `prompt` (a chat list or a string, already
  ending in the suffix below), `reward_model.ground_truth` (the number) and `data_source` (ignored: here the
  task, not the data, picks the verifier); `extra_info.answer`, when present, is the worked solution for SFT.

Prompts are the question plus verl's suffix `PROMPT_SUFFIX`, so the model learns to end with `#### N`. Answer
extraction follows verl's `gsm8k.py` in two modes (`task.answer_mode`): strict takes the number after the last
`####`, flexible the last number anywhere; commas and `$` are stripped. Numbers compare by value, so `18.00`
matches `18` (verl compares strings; a deliberate, documented difference). Reward 1/0, no format bonus.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from rlopt_cli.config.schema import TaskConfig
from rlopt_cli.errors import RloptError
from rlopt_cli.tasks import Example, Task
from rlopt_cli.tasks.files import field, load_split, prompt_text, required

PROMPT_SUFFIX = 'Let\'s think step by step and output the final answer after "####".'
FORMATS = {"gsm8k": ("question", "answer"), "verl": ("prompt", "reward_model")}
# verl searches only the tail in strict mode so a long completion cannot smuggle in many '####' guesses cheaply
STRICT_TAIL_CHARS = 300
_STRICT = re.compile(r"####\s*\$?\s*(-?[0-9.,]*[0-9])")
_NUMBER = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?|-?\$?\.[0-9]+")


def normalize_number(text: str) -> str:
    """'$1,234.50' -> '1234.50': commas, dollar signs and a sentence-final dot go."""
    return text.replace(",", "").replace("$", "").strip().rstrip(".")


def extract_answer(completion: str, mode: str = "flexible") -> str | None:
    """The completion's answer as a normalised number string, or None when there is none."""
    if mode == "strict":
        matches = _STRICT.findall(completion[-STRICT_TAIL_CHARS:])
    else:
        matches = _NUMBER.findall(completion)
    for raw in reversed(matches):
        number = normalize_number(raw)
        if number not in ("", "-", "."):
            return number
    return None


def same_number(a: str, b: str) -> bool:
    """Equal by value ('18.00' == '18'); strings that are not numbers compare exactly."""
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a == b


def gold_from_solution(solution: str) -> str:
    """The number on the solution's `#### N` line."""
    if "####" not in solution:
        raise RloptError(f"GSM8K answer without a '#### N' line: {solution[-80:]!r}")
    return normalize_number(solution.rsplit("####", 1)[1].strip().split()[0])


def make_verifier(mode: str) -> Any:
    def verify(completion: str, example: Example) -> float:
        answer = extract_answer(completion, mode)
        return 1.0 if answer is not None and same_number(answer, example.answer) else 0.0

    return verify


def with_suffix(question: str) -> str:
    question = question.strip()
    return question if question.endswith(PROMPT_SUFFIX) else f"{question} {PROMPT_SUFFIX}"


def to_example(row: dict[str, Any], fmt: str) -> Example:
    if fmt == "gsm8k":
        solution = required(row, "answer")
        return Example(with_suffix(required(row, "question")), gold_from_solution(solution), solution)
    truth = field(row, "reward_model.ground_truth")
    if truth is None:
        raise RloptError(f"verl row without reward_model.ground_truth: {str(row)[:80]!r}")
    gold = normalize_number(str(truth))
    solution = field(row, "extra_info.answer") or f"#### {gold}"
    return Example(with_suffix(prompt_text(row["prompt"])), gold, str(solution))


def load_examples(cfg: TaskConfig, key: str, limit: int = 0) -> list[Example]:
    fmt, rows = load_split(cfg.name, key, getattr(cfg, key), FORMATS, limit)
    return [to_example(row, fmt) for row in rows]


def build(cfg: TaskConfig) -> Task:
    return Task(
        name="gsm8k",
        train=load_examples(cfg, "train_file"),
        eval=load_examples(cfg, "eval_file", cfg.n_eval),
        verify=make_verifier(cfg.answer_mode),
    )
