"""`rlopt sparsity CKPT_A CKPT_B`: which parameters an update changed (bitwise, atol and relative rules)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import typer

from rlopt_cli.commands._common import friendly_errors


@friendly_errors
def sparsity(
    checkpoint_a: Path = typer.Argument(
        ...,
        help="Before: checkpoint, run or model folder, or a .safetensors file (e.g. a run's step-000000).",
    ),
    checkpoint_b: Path = typer.Argument(..., help="After: same kinds as CKPT_A."),
    atol: float = typer.Option(1e-5, "--atol", help="Absolute rule: |b - a| > atol (the papers' 1e-5)."),
    rtol: float = typer.Option(1e-3, "--rtol", help="Relative rule: |b - a| > rtol * max(|a|, |b|)."),
    dtype: str = typer.Option(
        "stored", "--dtype", help="Compare in: stored | bfloat16 | float32 (bfloat16 judges a bf16 pair)."
    ),
    by: str = typer.Option("module", "--by", help="Table rows: module | layer | tensor."),
    rank: bool = typer.Option(False, "--rank", help="Also the effective rank (99% of Σσ²) of each 2-D ΔW."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write the per-tensor table to this CSV file."),
    step: int | None = typer.Option(None, "--step", help="With a run folder: the checkpoint at this step."),
) -> None:
    """Count the coordinates that changed from CKPT_A to CKPT_B, overall, per module type and per layer."""
    from rlopt_cli.errors import RloptError, close_matches
    from rlopt_cli.sparsity.compare import GROUPS, check_options, compare, resolve_pair

    check_options(atol, rtol, dtype)
    if by not in GROUPS:
        raise RloptError(f"unknown --by {by!r}; valid: {', '.join(GROUPS)}{close_matches(by, GROUPS)}")
    wa, wb = resolve_pair(checkpoint_a, checkpoint_b, step)  # all input errors surface before the bar
    with progress_bar(enabled=not as_json) as on_progress:
        result = compare(wa, wb, atol=atol, rtol=rtol, dtype=dtype, rank=rank, on_progress=on_progress)
    if csv_path is not None:
        write_csv(csv_path, [t.row() for t in result.tensors])
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    print_tables(result, by)
    if csv_path is not None:
        typer.echo(f"per-tensor table written to {csv_path}", err=True)


def progress_bar(enabled: bool) -> Any:
    """A context manager yielding `on_progress(done_bytes, total_bytes)`: a rich bar on stderr, or a no-op."""
    from contextlib import contextmanager, nullcontext

    if not enabled:
        return nullcontext(None)

    @contextmanager
    def bar() -> Any:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("comparing", total=None)
            yield lambda done, total: progress.update(task, completed=done, total=total)

    return bar()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from rlopt_cli.errors import RloptError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    except OSError as err:
        raise RloptError(f"cannot write --csv {path}: {err.strerror}") from None


def print_tables(result: Any, by: str) -> None:
    """Overall rules, then one row per group (module, layer or tensor), then skipped tensors and ranks."""
    from rich.table import Table

    from rlopt_cli.commands._common import console
    from rlopt_cli.sparsity.count import RULES

    out = console()
    total = result.total
    settings = f"dtype {result.dtype}, atol {result.atol:g}, rtol {result.rtol:g}"
    overall = Table(title=f"update sparsity {result.a} -> {result.b} ({settings})")
    for column in ("rule", "changed", "n", "updated %", "sparsity %"):
        overall.add_column(column, justify="left" if column == "rule" else "right")
    for rule, stats in total.rules().items():
        pct = 100 * stats["fraction"]
        overall.add_row(rule, f"{stats['changed']:,}", f"{total.n:,}", f"{pct:.4f}", f"{100 - pct:.4f}")
    out.print(overall)

    groups = {t.name: t.counts for t in result.tensors} if by == "tensor" else result.by(by)
    table = Table(title=f"updated % by {by}")
    table.add_column(by)
    for column in ("n", "bitwise %", "atol %", "relative %"):
        table.add_column(column, justify="right")
    for key, counts in groups.items():
        table.add_row(key, f"{counts.n:,}", *(f"{100 * counts.fraction(rule):.4f}" for rule in RULES))
    out.print(table)

    for s in result.skipped:
        out.print(f"skipped {s.name}: {s.reason}")
    if result.with_rank:
        summary = result.rank_summary()
        if summary["mean"] is None:
            out.print("effective rank: no 2-D tensors")
        else:
            out.print(
                f"effective rank of ΔW (99% of Σσ²), mean over {len(summary['tensors'])} matrices: "
                f"{summary['mean']:.1f} ({summary['mean_pct']:.2f}% of full rank)"
            )
