"""`rlopt report`: tables and plots of a sweep folder, from its run folders' files only."""

from __future__ import annotations

from pathlib import Path

import typer

from rlopt_cli.commands._common import friendly_errors


@friendly_errors
def report(
    results_dir: Path = typer.Argument(..., help="A sweep folder, e.g. results/lr_grid."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Also draw the PNG figures."),
) -> None:
    """Mean and 95% CI over seeds per optimizer x lr, the best lr of each, written as csv/parquet/md (+ PNGs)."""
    from rlopt_cli.commands.sweep_cmd import run_report

    run_report(results_dir, plots=plots, missing_ok=False)
