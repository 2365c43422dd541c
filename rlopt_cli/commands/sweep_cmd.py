"""`rlopt sweep`: expand a sweep file into cells, run the unfinished ones, then report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from rlopt_cli.commands._common import console, friendly_errors, pin_cpu_kernels, say


@friendly_errors
def sweep(
    file: Path = typer.Argument(..., help="Sweep file (TOML), e.g. recipes/lr_grid.toml."),
    workers: int | None = typer.Option(None, "--workers", "-w", help="Cells at once (default: the file's)."),
    launcher: str | None = typer.Option(None, "--launcher", "-l", help="local | ray | slurm."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the cells and their status; run nothing."),
    only: list[str] = typer.Option([], "--only", help="Run only matching cells, e.g. --only variant=sgd."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Folder that holds the sweep folder."),
) -> None:
    """Run every unfinished cell of a sweep (finished ones are skipped, partial ones resume), then report."""
    from rlopt_cli.errors import RloptError
    from rlopt_cli.runtime.folder_lock import FolderLock, make_folder
    from rlopt_cli.study.launchers import cpu_count
    from rlopt_cli.study.sharded_cell import check_cells
    from rlopt_cli.study.sweep import LAUNCHER_NAMES, load_sweep, select
    from rlopt_cli.study.sweep_folder import cell_status, check_folder, check_unchanged, claim_folder

    if workers is not None and workers < 1:
        raise RloptError(f"--workers {workers} must be >= 1")
    if launcher is not None and launcher not in LAUNCHER_NAMES:
        raise RloptError(f"--launcher {launcher!r} is not one of {', '.join(LAUNCHER_NAMES)}")
    plan = load_sweep(file)
    cells = select(plan.cells, only)
    sweep_dir = out / plan.settings.name
    statuses = {c.name: cell_status(sweep_dir, c) for c in cells}
    name = launcher or plan.settings.launcher
    if dry_run:
        console().print(
            plan_table(cells, statuses, f"{plan.settings.name}: {len(cells)} cells in {sweep_dir}")
        )
        check_unchanged(sweep_dir, cells)
        check_cells(cells, plan.settings, name, cpu_count())
        return
    if not cells:
        raise RloptError(f"--only {' '.join(only)} matches no cell of {file}")
    check_folder(sweep_dir, plan)  # before the folder is created or locked: a refused sweep leaves no trace
    pin_cpu_kernels(
        cells[0].config.train.cpu_isa
    )  # workers inherit it; each also pins its own cell's setting
    check_cells(cells, plan.settings, name, cpu_count())  # sharded cells (nproc > 1); loads torch, pinned
    make_folder(sweep_dir)
    with FolderLock(sweep_dir, "sweep"):  # one sweep per folder; its workers die with it (launchers.py)
        claim_folder(sweep_dir, plan)
        statuses = {c.name: cell_status(sweep_dir, c) for c in cells}  # again: it may have changed meanwhile
        run_locked(plan, cells, statuses, sweep_dir, launcher, workers)


def run_locked(
    plan: Any,
    cells: list[Any],
    statuses: dict[str, str],
    sweep_dir: Path,
    launcher: str | None,
    workers: int | None,
) -> None:
    from rlopt_cli.errors import RloptError

    todo = [c for c in cells if statuses[c.name] != "done"]
    name = launcher or plan.settings.launcher
    n_workers = workers or plan.settings.workers
    say(
        f"{plan.settings.name}: {len(cells) - len(todo)} of {len(cells)} cells done; running {len(todo)} "
        f"with the {name} launcher ({n_workers} workers); logs in {sweep_dir / 'logs'}"
    )
    failures = run_cells(todo, cells, sweep_dir, plan.settings, name, n_workers)
    run_report(sweep_dir)
    if failures:
        lines = "; ".join(f"{n}: {e}" for n, e in failures[:3])
        raise RloptError(f"{len(failures)} cells failed ({lines}); see {sweep_dir / 'logs'}, then rerun")


def plan_table(cells: list[Any], statuses: dict[str, str], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for col in ("run name", "objective", "optimizer", "lr", "seed", "status"):
        table.add_column(col)
    colors = {"done": "green", "partial": "yellow", "new": "", "changed": "bold red"}
    for cell in cells:
        a, status = cell.axes, statuses[cell.name]
        optimizer = a["variant"] if a["variant"] == a["optimizer"] else f"{a['variant']} ({a['optimizer']})"
        shown = f"[{colors[status]}]{status}[/]" if colors[status] else status
        table.add_row(cell.name, a["objective"], optimizer, f"{a['lr']:g}", str(a["seed"]), shown)
    return table


def run_cells(
    todo: list[Any], cells: list[Any], sweep_dir: Path, settings: Any, launcher: str, workers: int
) -> list[tuple[str, str]]:
    """Launch the cells under a live display; returns (cell, error) for the cells that failed."""
    from rich.live import Live

    from rlopt_cli.config.recipes import to_dict
    from rlopt_cli.study.launchers import Job, cpu_count, launch

    # threads per process: a local cell's share of the cores (split among its nproc ranks), else num_cpus
    local = max(1, cpu_count() // (workers * settings.nproc))
    threads = max(1, int(settings.num_cpus)) if launcher != "local" else local
    jobs = [Job(c.name, to_dict(c.config), str(sweep_dir), threads, nproc=settings.nproc) for c in todo]
    display = SweepDisplay(cells, sweep_dir, len(todo))
    with Live(display.render(), console=console(), refresh_per_second=2, transient=False) as live:

        def on_finish(name: str, summary: dict[str, Any] | None, error: str | None) -> None:
            display.finish(name, summary, error)
            live.update(display.render())

        def on_tick(running: int) -> None:
            display.running = running
            live.update(display.render())

        launch(launcher, jobs, settings, workers, on_finish, on_tick)
    return display.failures


class SweepDisplay:
    """Cells done/running/left and the best final accuracy so far per objective x optimizer variant."""

    def __init__(self, cells: list[Any], sweep_dir: Path, todo: int) -> None:
        self.variant = {c.name: (c.axes["objective"], c.axes["variant"]) for c in cells}
        self.total, self.left, self.running = len(cells), todo, 0
        self.failures: list[tuple[str, str]] = []
        self.best: dict[tuple[str, str], tuple[float, str]] = {}
        for cell in cells:  # cells finished by an earlier invocation count from the start
            summary_path = sweep_dir / cell.name / "summary.json"
            try:
                self.note(cell.name, json.loads(summary_path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):  # none yet, or corrupt: the report says which
                pass

    def note(self, name: str, summary: dict[str, Any]) -> None:
        key, acc = self.variant[name], float(summary["final_accuracy"])
        if key not in self.best or acc > self.best[key][0]:
            self.best[key] = (acc, f"lr {summary['lr']:g}")

    def finish(self, name: str, summary: dict[str, Any] | None, error: str | None) -> None:
        self.left -= 1
        if summary is not None:
            self.note(name, summary)
        else:
            self.failures.append((name, error or "unknown error"))

    def render(self) -> Any:
        from rich.table import Table

        done = self.total - self.left - len(self.failures)
        running = min(self.running, self.left)
        table = Table(
            title=f"cells: {done} done, {running} running, {self.left - running} queued, "
            f"{len(self.failures)} failed (of {self.total})"
        )
        for col in ("objective", "optimizer", "best final accuracy so far", "at"):
            table.add_column(col)
        for (objective, variant), (acc, where) in sorted(self.best.items()):
            table.add_row(objective, variant, f"{acc:.3f}", where)
        return table


def run_report(sweep_dir: Path, plots: bool = True, missing_ok: bool = True) -> None:
    """Print the report tables and write report.{csv,parquet,md} (+ the PNGs) into `sweep_dir`."""
    from rlopt_cli.errors import RloptError
    from rlopt_cli.study.plots import plot_report
    from rlopt_cli.study.report import build_report, print_report, write_report

    try:
        report = build_report(sweep_dir)
    except RloptError as err:
        if not missing_ok:
            raise
        say(f"no report: {err}")  # e.g. every cell failed: the sweep's own error says why
        return
    print_report(report, console())
    written = write_report(report)
    if plots:
        written += [sweep_dir / name for name in plot_report(report)]
    say("wrote " + ", ".join(str(p) for p in written))
