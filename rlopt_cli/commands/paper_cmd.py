"""`rlopt paper`: the whole reproduction study on the embedded default, one command, one report."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import typer

from rlopt_cli.commands._common import friendly_errors, pin_cpu_kernels, say


@friendly_errors
def paper(
    quick: bool = typer.Option(
        False,
        "--quick",
        help="One selection seed, SGD and AdamW at two lrs, 2 seeds per verdict set, two widths: a smoke run.",
    ),
    recipe: Path = typer.Option(Path("recipes/paper.toml"), "--grid", help="The study's sweep file."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Folder that holds results/<name>/."),
    workers: int | None = typer.Option(None, "--workers", "-w", help="Runs at once (default: the file's)."),
    launcher: str | None = typer.Option(None, "--launcher", "-l", help="local | ray | slurm."),
    probe_steps: str = typer.Option(
        "10,50", "--probe-steps", help="Steps at which AdamW's moments are probed (verdict runs)."
    ),
    widths: str = typer.Option(
        "64,128,256", "--widths", help="Model widths of the scale trend (128 = default)."
    ),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Dotted override applied to every run."),
) -> None:
    """Run the selection, verdict, scale and step-size-regime runs, then write results/<name>/REPORT.md."""
    from rlopt_cli.commands.sweep_cmd import run_cells
    from rlopt_cli.errors import RloptError
    from rlopt_cli.runtime.atomic_files import atomic_write_json
    from rlopt_cli.runtime.folder_lock import FolderLock, make_folder
    from rlopt_cli.study import paper as study
    from rlopt_cli.study.report import build_report
    from rlopt_cli.study.sweep import LAUNCHER_NAMES
    from rlopt_cli.study.sweep_folder import cell_status, check_unchanged, claim_folder

    if workers is not None and workers < 1:
        raise RloptError(f"--workers {workers} must be >= 1")
    if launcher is not None and launcher not in LAUNCHER_NAMES:
        raise RloptError(f"--launcher {launcher!r} is not one of {', '.join(LAUNCHER_NAMES)}")

    started = time.perf_counter()
    try:
        steps = [int(s) for s in probe_steps.split(",") if s]
        sizes = [int(s) for s in widths.split(",") if s]
    except ValueError:
        raise RloptError("--probe-steps and --widths take comma-separated integers, e.g. 10,50") from None
    grid = study.grid_sweep(recipe, quick, overrides)
    pin_cpu_kernels(grid.cells[0].config.train.cpu_isa)
    # torch loads with these (the report reads weights): only after the pin
    from rlopt_cli.study.paper_report import write_report
    from rlopt_cli.study.paper_tables import grid_n_params

    if quick:
        sizes, steps = sorted(sizes)[:2], steps[:1]
    paper_dir = out / grid.settings.name
    name, n_workers = launcher or grid.settings.launcher, workers or grid.settings.workers

    def run_stage(stage: str, cells: list) -> None:
        stage_dir = paper_dir / stage
        check_unchanged(stage_dir, cells)
        todo = [c for c in cells if cell_status(stage_dir, c) != "done"]
        say(f"{stage}: {len(cells) - len(todo)} of {len(cells)} runs done; running {len(todo)}")
        failures = run_cells(todo, cells, stage_dir, grid.settings, name, n_workers)
        if failures:
            raise RloptError(
                f"{len(failures)} {stage} runs failed ({failures[0][0]}: {failures[0][1]}); "
                f"see {stage_dir / 'logs'}, then rerun"
            )
        say(f"{stage}: done at {time.perf_counter() - started:.0f} s")

    base = study.base_config(grid)
    plan = study.verdict_plan(quick, grid.cells[0].config.model.init_seed)
    study.check_fresh(sorted({c.config.train.seed for c in grid.cells}), plan)
    make_folder(paper_dir)
    with FolderLock(paper_dir, "paper"):  # one study per folder; its run folders are locked by their workers
        claim_folder(paper_dir / "select", grid)
        run_stage("select", grid.cells)
        report = build_report(paper_dir / "select")
        chosen = {
            obj: {k: v for k, v in study.best_lrs(report, obj).items() if k in study.VERDICT_OPTIMIZERS}
            for obj in ("grpo", "sft")
        }
        (paper_dir / "verdict").mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            paper_dir / "verdict" / "plan.json",
            {"sets": [dataclasses.asdict(s) for s in plan], "lrs": chosen, "probe_steps": steps},
        )
        run_stage("verdict", study.verdict_cells(base, chosen, plan, steps))
        run_stage("scale", study.scale_cells(base, sizes, chosen["grpo"]))
        n_params = grid_n_params(report)
        run_stage("regime", study.regime_cells(base, n_params))
        _measure_memory(paper_dir, quick)
        path = write_report(paper_dir)
        say(f"wrote {path} in {time.perf_counter() - started:.0f} s")


def _measure_memory(paper_dir: Path, quick: bool) -> None:
    import json

    from rlopt_cli.runtime.atomic_files import atomic_write_json
    from rlopt_cli.training.memory import measure_step_memory

    path = paper_dir / "memory.json"
    if not path.is_file():
        atomic_write_json(path, measure_step_memory(quick=quick))
    say(f"memory: {json.loads(path.read_text())}")
