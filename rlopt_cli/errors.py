"""User-facing errors: one line that says what is wrong and how to fix it.

Anything raised as `RloptError` reaches the user as `error: <message>` with a non-zero exit and no traceback
(see `cli.friendly_errors`). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RloptError(Exception):
    """A problem with the user's input or files, explained in one line."""

    exit_code = 2


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> str:
    """`'; did you mean: a, b?'` for the nearest valid names, or an empty string."""
    matches = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    return f"; did you mean: {', '.join(matches)}?" if matches else ""
