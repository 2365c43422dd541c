"""One owner per folder: an OS lock (`flock`) on `<folder>/.lock`, which holds the owner's pid.

A run folder is owned by the process training it, a sweep folder by the sweep that runs it. The kernel drops
the lock when its process dies (kill -9 included), so a stale `.lock` file never blocks a rerun; a second
process is refused at once, in one line naming the owner's pid, instead of doing the same work twice.

Deliberate simplifications: Linux/macOS only (fcntl); the `.lock` file stays in the folder (removing it would
race with a process that just opened it).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import IO

from rlopt_cli.errors import EnvironmentFailure, RloptError

LOCK_FILE = ".lock"


class FolderLock:
    """`with FolderLock(folder, "run"):` holds the folder for this process, or raises EnvironmentFailure."""

    def __init__(self, folder: Path, what: str) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.what = what
        self.file: IO[str] | None = None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "a+": never truncate, so the owner's pid stays readable while we try the lock
        file = self.path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = file.read().strip() or "unknown"
            file.close()
            raise EnvironmentFailure(
                f"{self.path.parent} is in use by another rlopt process (pid {owner}); wait for it to "
                "finish or stop it, then rerun"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file = file
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None


def owner_pid(folder: Path) -> int | None:
    """The pid written in `folder`'s lock file (the owner, or the last one), None if there is none."""
    try:
        return int((Path(folder) / LOCK_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def make_folder(folder: Path) -> None:
    """mkdir -p, with one-line errors for a path through a file and for what the OS refuses."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise RloptError(f"{parent} is a file, not a folder; choose another --out")
            break
    folder.mkdir(parents=True, exist_ok=True)
