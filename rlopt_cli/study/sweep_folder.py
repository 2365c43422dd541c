"""A sweep's folder: which cells it already holds (new, partial, done, changed), and claiming it for one sweep.

A cell's folder is its run folder, claimed by the cell's resolved config, so a changed cell is an error, never
an overwrite; the folder's sweep.toml records the resolved sweep file of the latest invocation.
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from rlopt_cli.config.recipes import first_difference, from_dict, read_toml, to_dict
from rlopt_cli.errors import RloptError
from rlopt_cli.runtime.atomic_files import atomic_write_text
from rlopt_cli.study.sweep import SWEEP_FILE, Cell, Sweep


def changed(sweep_dir: Path, cell: Cell) -> str:
    """How the config in the cell's folder differs from the cell's ('' when it matches or there is none)."""
    config_path = sweep_dir / cell.name / "config.toml"
    if not config_path.is_file():
        return ""
    try:
        return first_difference(to_dict(from_dict(read_toml(config_path))), to_dict(cell.config))
    except RloptError as err:
        return f"unreadable config.toml: {err}"


def cell_status(sweep_dir: Path, cell: Cell) -> str:
    """new (no folder), done (summary.json), partial (resumes from its last checkpoint), or changed (an error)."""
    run_dir = sweep_dir / cell.name
    if not (run_dir / "config.toml").is_file():
        return "new"
    if changed(sweep_dir, cell):
        return "changed"
    return "done" if (run_dir / "summary.json").is_file() else "partial"


def check_unchanged(sweep_dir: Path, cells: list[Cell]) -> None:
    """Refuse to run if any cell's folder holds a different config under the same name (no silent overwrite)."""
    for cell in cells:
        if diff := changed(sweep_dir, cell):
            raise RloptError(
                f"cell {cell.name} changed since it ran ({diff}); rename the sweep, or move "
                f"{sweep_dir / cell.name} away to rerun it"
            )


def check_folder(sweep_dir: Path, sweep: Sweep) -> None:
    """Refuse a folder that holds another sweep, or a cell of this one with a changed config; writes nothing."""
    saved = sweep_dir / SWEEP_FILE
    if saved.is_file():
        other = read_toml(saved).get("sweep", {}).get("name")
        if other != sweep.settings.name:
            raise RloptError(
                f"{sweep_dir} holds another sweep ({other!r}, not {sweep.settings.name!r}); "
                "choose another --out or rename the sweep"
            )
    check_unchanged(sweep_dir, sweep.cells)


def claim_folder(sweep_dir: Path, sweep: Sweep) -> None:
    """Check that sweep_dir holds this sweep (or nothing), then save the resolved sweep file in it."""
    check_folder(sweep_dir, sweep)
    saved = sweep_dir / SWEEP_FILE
    header = f"# resolved sweep file of {sweep.settings.name!r}: rerun with `rlopt sweep {saved}`\n"
    atomic_write_text(saved, header + tomli_w.dumps(sweep.resolved))
