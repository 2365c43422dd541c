"""The paper study as run configs: `rlopt paper` runs these stages, then paper_report writes REPORT.md.

Stages (each an independent, resumable set of run folders under results/paper/):
1. grid/    the optimizer x lr x seed sweep of recipes/paper.toml, GRPO and SFT (claims 1-4, 6, 8, 9);
2. probe/   AdamW at its best lr per objective with `probe.steps` on (claim 5, the mechanism);
3. scale/   GRPO with SGD and AdamW at each one's best lr, at several embedded model widths (claim 7);
4. regime/  SGD and AdamW with the per-coordinate step of the paper's 1.7B runs (claim 9): with clipping always
            active SGD moves each coordinate by about lr / sqrt(n), so lr = 0.1 * sqrt(n / 1.7e9) matches the
            paper's SGD; AdamW's step is about lr whatever n, so its paper lr 1e-6 is used as it is.
`--quick` keeps one seed and each optimizer's two central learning rates, and the two smallest widths.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from rlopt_cli.config.recipes import from_dict, parse_override, set_dotted
from rlopt_cli.study.sweep import Cell, Sweep, expand, load_sweep

PAPER_N_PARAMS = 1.7e9  # Qwen3-1.7B, the paper's model for the SGD lr 0.1 runs
PAPER_SGD_LR = 0.1
PAPER_ADAMW_LR = 1e-6


def central(lrs: list[float]) -> list[float]:
    """The two central learning rates of a sorted list (all of it when it has two or fewer)."""
    lrs = sorted(lrs)
    start = max(0, (len(lrs) - 1) // 2)
    return lrs[start : start + 2]


def grid_sweep(recipe: Path, quick: bool, overrides: list[str]) -> Sweep:
    """recipes/paper.toml, reduced for --quick, with --set overrides applied to every cell."""
    resolved = copy.deepcopy(load_sweep(recipe).resolved)
    for item in overrides:
        set_dotted(resolved, *parse_override(item))
    if quick:
        resolved["grid"]["seeds"] = resolved["grid"].get("seeds", [0])[:1]
        for spec in resolved["grid"]["optimizers"].values():
            spec["lr"] = central(spec["lr"])
    return expand(resolved, where=str(recipe))


def base_config(sweep: Sweep) -> dict[str, Any]:
    """The sweep's base sections (no optimizer choice), to derive the other stages' runs from."""
    return {k: copy.deepcopy(v) for k, v in sweep.resolved.items() if k not in ("sweep", "grid")}


def make_cell(base: dict[str, Any], name: str, group: str, settings: dict[str, Any]) -> Cell:
    data = copy.deepcopy(base)
    data.get("optimizer", {}).pop("name", None)
    data.get("optimizer", {}).pop("lr", None)
    for key, value in settings.items():
        set_dotted(data, key, value)
    set_dotted(data, "train.run_name", name)
    set_dotted(data, "log.wandb_group", group)
    set_dotted(data, "log.progress", False)
    config = from_dict(data)
    axes = {
        "objective": config.train.objective,
        "variant": config.optimizer.name,
        "optimizer": config.optimizer.name,
        "lr": config.optimizer.lr,
        "seed": config.train.seed,
    }
    return Cell(name, axes, config)


def probe_cells(base: dict[str, Any], adamw_lr: dict[str, float], steps: list[int]) -> list[Cell]:
    return [
        make_cell(
            base,
            f"{objective}__adamw__lr{lr:g}__probe",
            "paper-probe",
            {
                "train.objective": objective,
                "optimizer.name": "adamw",
                "optimizer.lr": lr,
                "probe.steps": steps,
                "train.seed": 0,
            },
        )
        for objective, lr in adamw_lr.items()
    ]


def scale_cells(base: dict[str, Any], widths: list[int], lrs: dict[str, float]) -> list[Cell]:
    """GRPO at each width (4 layers, 4 heads, MLP 4x), each optimizer at its best lr at the default width."""
    cells = []
    for width in widths:
        dims = {"model.hidden_size": width, "model.intermediate_size": 4 * width}
        for name, lr in lrs.items():
            cells.append(
                make_cell(
                    base,
                    f"grpo__{name}__lr{lr:g}__h{width}",
                    "paper-scale",
                    {
                        **dims,
                        "train.objective": "grpo",
                        "optimizer.name": name,
                        "optimizer.lr": lr,
                        "train.seed": 0,
                    },
                )
            )
    return cells


def regime_lrs(n_params: int) -> dict[str, float]:
    """The learning rates that reproduce the paper's per-coordinate step at this parameter count."""
    return {"sgd": PAPER_SGD_LR * math.sqrt(n_params / PAPER_N_PARAMS), "adamw": PAPER_ADAMW_LR}


def regime_cells(base: dict[str, Any], n_params: int) -> list[Cell]:
    return [
        make_cell(
            base,
            f"grpo__{name}__lr{lr:.3g}__paper_regime",
            "paper-regime",
            {
                "train.objective": "grpo",
                "optimizer.name": name,
                "optimizer.lr": float(f"{lr:.3g}"),
                "train.seed": 0,
            },
        )
        for name, lr in regime_lrs(n_params).items()
    ]


def best_lrs(grid_report: Any, objective: str) -> dict[str, float]:
    """variant -> its best lr for `objective`, from a report's best table."""
    best = grid_report.best[grid_report.best.objective == objective]
    return {str(r.variant): float(r.best_lr) for r in best.itertuples()}
