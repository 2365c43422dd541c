"""Files that appear whole or not at all: written to a temporary name in the same folder, fsynced, renamed.

Every file rlopt writes into a run folder, sweep folder or report goes through here, so a kill at any moment
leaves either the old file or the new one, never half of one; the folder is fsynced after the rename too, so a
power loss cannot leave the new name over a file whose data never reached the disk.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename itself, durable


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a file created or renamed in it) durable: without it, a power loss after a
    rename can leave the old name, or the new name over an empty file."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder (deepest first), before the folder is renamed into
    place: files that third-party writers (save_pretrained, tokenizers) closed without fsync included."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(folders):
        fsync_dir(d)
