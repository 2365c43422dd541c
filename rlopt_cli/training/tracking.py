"""Loggers: metrics.jsonl always, W&B as an optional sink, behind one small interface.

Keys are namespaced (`train/`, `optim/`, `eval/`, `sparsity/`, `time/`, `mem/`). Everything outside `time/` and
`mem/` is a deterministic function of the config and seed on CPU, which the tests check.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

from rlopt_cli.runtime.atomic_files import atomic_write_text


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


class NullSink:
    """The default sink: removes `if wandb:` branches from the loop."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill -9; the resume rewrites it
            break
    return rows


class MetricsFile:
    """Appends one JSON line per step; on resume keeps only lines up to the resumed step (no duplicates)."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self.file = self.path.open("a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class WandbSink:
    """A real W&B run (offline when there is no API key); its id is kept so a resume continues the same run."""

    def __init__(
        self,
        run_dir: Path,
        name: str,
        config: dict[str, Any],
        project: str,
        group: str,
        run_id: str | None,
        say: Any,
    ) -> None:
        import wandb  # heavy: imported on use

        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_key() else "offline")
        if mode == "offline":
            say(
                "W&B: no API key found, logging offline to "
                f"{run_dir / 'wandb'} (sync later with `wandb sync`)"
            )
        self.run = wandb.init(
            project=project,
            group=group or None,
            name=name,
            id=run_id or uuid.uuid4().hex[:8],
            resume="allow",
            config=config,
            dir=str(run_dir),
            mode=mode,  # type: ignore[arg-type]
            reinit="finish_previous",
        )
        self.id: str = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            if isinstance(value, (int, float, str)):
                self.run.summary[key] = value
        self.run.finish()
