"""rlopt's cache ($RLOPT_CACHE, default ~/.cache/rlopt) and the checksummed assets in it.

An asset (a converted model folder, a task's data files) is built once into a temporary folder, every file it
holds is hashed (sha256) into `manifest.json`, and the folder is renamed into place: a cache entry is whole or
absent. A later fetch finds the manifest, re-hashes every file, and reuses the entry when all match; a mismatch
is a one-line error that says to refetch. Simplifications: one lock file per asset (parallel fetches wait for
one build); no eviction.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlopt_cli.errors import RloptError
from rlopt_cli.runtime.atomic_files import atomic_write_json

MANIFEST = "manifest.json"
Build = Callable[[Path], dict[str, Any]]
"""Writes an asset's files into the given (empty) folder; returns what the manifest should say of its source."""


def cache_dir() -> Path:
    return Path(os.environ.get("RLOPT_CACHE", Path.home() / ".cache" / "rlopt"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_manifest(folder: Path, refetch: str) -> dict[str, Any]:
    """The entry's manifest, after checking every file it lists against its sha256; `refetch` is the command
    that rebuilds the entry, named in the error."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RloptError(f"{folder / MANIFEST} is unreadable; refetch: {refetch}") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise RloptError(f"{path} is missing from the cache; refetch: {refetch}")
        if sha256_file(path) != expected:
            raise RloptError(f"{path} does not match its sha256 (corrupt?); refetch: {refetch}")
    return manifest


def cached_asset(name: str, build: Build, root: Path, refetch: str, force: bool = False) -> tuple[Path, bool]:
    """(folder of the asset `name` under root/assets, whether it came from the cache). Built by `build` when
    absent or when `force`; otherwise verified by checksum and reused."""
    folder = root / "assets" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel fetches of one asset wait for one build
        if (folder / MANIFEST).is_file() and not force:
            verify_manifest(folder, refetch)
            return folder, True
        tmp = folder.parent / f".{name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            started = time.perf_counter()
            source = build(tmp)
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {
                "name": name,
                "source": source,
                "files": files,
                "bytes": sum((tmp / f).stat().st_size for f in files),
                "build_s": round(time.perf_counter() - started, 1),
            }
            atomic_write_json(tmp / MANIFEST, manifest)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, False
