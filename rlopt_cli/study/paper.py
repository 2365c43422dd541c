"""The paper study as run configs: `rlopt paper` runs these stages, then paper_report writes REPORT.md.

Stages (each an independent, resumable set of run folders under results/paper/):
1. select/   the optimizer x lr x seed sweep of recipes/paper.toml, GRPO and SFT, on the selection seeds: it
             picks each optimizer's lr per objective (the paper's Table 2 shape) and feeds the matched-norm
             control (claim 8); no verdict reads its accuracies, so the chosen lr's luck does not leak in;
2. verdict/  SGD and AdamW at their chosen lrs on fresh seeds, split into two disjoint sets A and B, and set A's
             seeds again from a second warm-up (start point A', model.init_seed + 1); AdamW runs carry
             `probe.steps` (read-only), so the mechanism claim gets its seeds too (claims 1-3, 5, 6, 9);
3. scale/    GRPO with SGD and AdamW at each one's chosen lr, at several embedded model widths (claim 7);
4. regime/   SGD and AdamW with the per-coordinate step of the paper's 1.7B runs (claim 9): with clipping always
             active SGD moves each coordinate by about lr / sqrt(n), so lr = 0.1 * sqrt(n / 1.7e9) matches the
             paper's SGD; AdamW's step is about lr whatever n, so its paper lr 1e-6 is used as it is.
`--quick` keeps one selection seed, SGD's and AdamW's two central learning rates, verdict sets of 2 seeds, and
the two smallest widths. The verdict seeds and sets are fixed here, before any run (see paper_stats for the rules).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlopt_cli.config.recipes import from_dict, parse_override, set_dotted
from rlopt_cli.errors import RloptError
from rlopt_cli.study.paper_stats import split_seeds
from rlopt_cli.study.sweep import Cell, Sweep, expand, load_sweep

PAPER_N_PARAMS = 1.7e9  # Qwen3-1.7B, the paper's model for the SGD lr 0.1 runs
PAPER_SGD_LR = 0.1
PAPER_ADAMW_LR = 1e-6
# 16 fresh seeds -> sets A = 100..107 and B = 108..115: 8 paired SGD/AdamW differences per set give a 95% CI
# half-width of about 0.03 at a seed-to-seed spread of the difference of 0.04 (t_7 = 2.36), and 0.02 pooled.
VERDICT_SEEDS = tuple(range(100, 116))
QUICK_VERDICT_SEEDS = (100, 101, 102, 103)
VERDICT_OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class SeedSet:
    """One set of verdict runs: its name in the report, the warm-up seed it starts from, its training seeds."""

    name: str
    init_seed: int
    seeds: tuple[int, ...]


def verdict_plan(quick: bool, init_seed: int = 0) -> list[SeedSet]:
    """Sets A and B (disjoint halves of the verdict seeds) from the warm-up `init_seed`, and A' (A's seeds
    from the warm-up init_seed + 1): A vs B tests the seed noise, A vs A' the start point."""
    a, b = split_seeds(QUICK_VERDICT_SEEDS if quick else VERDICT_SEEDS)
    return [
        SeedSet("A", init_seed, tuple(a)),
        SeedSet("B", init_seed, tuple(b)),
        SeedSet("A'", init_seed + 1, tuple(a)),
    ]


def check_fresh(selection_seeds: list[int], plan: list[SeedSet]) -> None:
    """The verdict must not reuse a selection seed: that run's luck chose the lr."""
    reused = sorted(set(selection_seeds) & {s for p in plan for s in p.seeds})
    if reused:
        raise RloptError(
            f"grid.seeds {reused} are also verdict seeds ({min(VERDICT_SEEDS)}..{max(VERDICT_SEEDS)}); "
            "choose selection seeds below 100"
        )


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
    if quick:  # the verdict's optimizers only: the others are in no claim, and each run costs seconds here
        grid = resolved["grid"]
        grid["seeds"] = grid.get("seeds", [0])[:1]
        grid["optimizers"] = {k: v for k, v in grid["optimizers"].items() if k in VERDICT_OPTIMIZERS}
        for spec in grid["optimizers"].values():
            spec["lr"] = central(spec["lr"])
    return expand(resolved, where=str(recipe))


def base_config(sweep: Sweep) -> dict[str, Any]:
    """The sweep's base sections (no optimizer choice), to derive the other stages' runs from."""
    return {k: copy.deepcopy(v) for k, v in sweep.resolved.items() if k not in ("sweep", "grid")}


def verdict_cells(
    base: dict[str, Any], lrs: dict[str, dict[str, float]], plan: list[SeedSet], probe_steps: list[int]
) -> list[Cell]:
    """objective -> {optimizer: chosen lr}: one run per optimizer x seed set x seed (AdamW with the probe on)."""
    cells = []
    for objective, chosen in lrs.items():
        for name, lr in chosen.items():
            for seed_set in plan:
                for seed in seed_set.seeds:
                    settings: dict[str, Any] = {
                        "train.objective": objective,
                        "optimizer.name": name,
                        "optimizer.lr": lr,
                        "train.seed": seed,
                        "model.init_seed": seed_set.init_seed,
                    }
                    if name == "adamw":
                        settings["probe.steps"] = probe_steps
                    run = f"{objective}__{name}__lr{lr:g}__s{seed}__init{seed_set.init_seed}"
                    cells.append(make_cell(base, run, "paper-verdict", settings))
    return cells


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
    """variant -> its best lr for `objective`, from the selection report's best table."""
    best = grid_report.best[grid_report.best.objective == objective]
    return {str(r.variant): float(r.best_lr) for r in best.itertuples()}
