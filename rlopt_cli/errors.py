"""User-facing errors: one line that says what is wrong and how to fix it.

Anything raised as `RloptError` reaches the user as `error: <message>` with a non-zero exit and no traceback
(see `commands._common.friendly_errors`). Everything else is a bug and keeps its traceback.

Exit codes: 2 = bad input or files (fix the command or the file); 3 = the environment failed (disk full, a
read-only or vanished folder, an I/O error, or another process owns the folder): fix it and rerun the same
command, which resumes; 130 = interrupted (Ctrl-C).
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class RloptError(Exception):
    """A problem with the user's input or files, explained in one line."""

    exit_code = 2


class EnvironmentFailure(RloptError):
    """The machine, not the input: disk full, read-only, I/O error, or a folder owned by another process."""

    exit_code = 3


# errno -> what the user should do about it; any other OSError is a bug and keeps its traceback
OS_FAILURES = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota exceeded)",
    errno.EROFS: "the file system is read-only; choose another --out (or output path)",
    errno.EACCES: "no permission; fix the permissions or choose another --out (or output path)",
    errno.EPERM: "no permission; fix the permissions or choose another --out (or output path)",
    errno.EIO: "an I/O error; check the disk",
    errno.ENOENT: "a folder vanished while rlopt used it",
    errno.ENOTDIR: "a path rlopt writes is a file, not a folder; choose another --out (or output path)",
    errno.EISDIR: "a path rlopt writes is a folder, not a file; choose another output path",
    errno.ENAMETOOLONG: "a path is too long; choose a shorter --out or run name",
}


def os_failure(err: OSError) -> EnvironmentFailure | None:
    """The one-line EnvironmentFailure for an OSError the user can fix, None for anything else."""
    if err.errno not in OS_FAILURES:
        return None
    where = f" on {err.filename}" if err.filename else ""
    reason = err.strerror or errno.errorcode.get(err.errno or 0, "OS error")
    return EnvironmentFailure(
        f"{reason}{where}: {OS_FAILURES[err.errno]}; then rerun the same command to resume"
    )


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> str:
    """`'; did you mean: a, b?'` for the nearest valid names, or an empty string."""
    matches = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    return f"; did you mean: {', '.join(matches)}?" if matches else ""
