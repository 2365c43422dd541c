"""Reading a file-backed task's splits: local JSONL or Parquet through the `datasets` library, with the column
checks and one-line errors that GSM8K and MATH share.

A task names the column sets it accepts (its *formats*, e.g. the dataset's own columns and verl's); the first
format whose columns are all present wins, and a file that matches none is an error naming the columns found
and expected. Extra columns are ignored. Simplifications: local files only (no hub download, these machines
have no network), and a split is read whole into memory (GSM8K and MATH are a few MB).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlopt_cli.errors import RloptError

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def split_path(task: str, key: str, value: str) -> Path:
    """The path in `task.train_file` / `task.eval_file`, checked to be an existing JSONL or Parquet file."""
    if not value:
        raise RloptError(f"task {task!r} reads local files: set task.{key}=PATH (a .jsonl or .parquet file)")
    path = Path(value).expanduser()
    if not path.is_file():
        raise RloptError(f"task.{key} not found: {path} (give the path of a local .jsonl or .parquet file)")
    if path.suffix not in SUFFIXES:
        raise RloptError(f"task.{key} = {path} must end in .jsonl, .json or .parquet")
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSONL / Parquet file as plain dicts (nested structs stay dicts, lists stay lists)."""
    try:
        import datasets  # heavy: imported on use
    except ModuleNotFoundError:
        raise RloptError(f"reading {path} needs the `datasets` package: pip install -e '.[real]'") from None
    if path.stat().st_size == 0:
        raise RloptError(f"{path} is empty; a split needs at least one row")
    datasets.disable_progress_bars()  # keep the terminal for rlopt's own progress bar
    try:
        data = datasets.load_dataset(SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RloptError(f"cannot read {path} as {path.suffix[1:]}: {first}") from None
    if len(data) == 0:
        raise RloptError(f"{path} has no rows; a split needs at least one")
    return list(data.to_list())


def pick_format(path: Path, columns: list[str], formats: Mapping[str, tuple[str, ...]]) -> str:
    """The first format whose required columns are all present, else a one-line error listing both sides."""
    for name, required in formats.items():
        if set(required) <= set(columns):
            return name
    expected = " or ".join(f"{name} ({', '.join(req)})" for name, req in formats.items())
    raise RloptError(f"{path} has columns {', '.join(columns) or '(none)'}; expected {expected}")


def load_split(
    task: str, key: str, value: str, formats: Mapping[str, tuple[str, ...]], limit: int = 0
) -> tuple[str, list[dict[str, Any]]]:
    """(format name, rows) of one split; `limit` > 0 keeps the first `limit` rows (n_eval caps the eval split)."""
    path = split_path(task, key, value)
    rows = read_rows(path)
    fmt = pick_format(path, list(rows[0]), formats)
    return fmt, rows[:limit] if limit > 0 else rows


def field(row: Mapping[str, Any], dotted: str) -> Any:
    """`row['reward_model']['ground_truth']` for `'reward_model.ground_truth'`; None where a level is missing."""
    value: Any = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def required(row: Mapping[str, Any], dotted: str) -> str:
    """A column every row needs, as text; a row without it (JSONL rows may omit keys: they read as null) is a
    one-line error naming the column, not a confusing 'None' further on."""
    value = field(row, dotted)
    if value is None:
        raise RloptError(
            f"a row has no {dotted!r} (or it is null): {str(dict(row))[:80]!r}; every row needs it"
        )
    return str(value)


def prompt_text(prompt: Any) -> str:
    """verl's `prompt`: a chat list (the last user turn's content is the prompt) or a plain string."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        if users:
            return str(users[-1])
    raise RloptError(f"cannot read a prompt from {str(prompt)[:80]!r}: expected a string or a chat list")
