"""Sweep files: a base recipe plus a grid, expanded into one run config (a "cell") per grid point.

A sweep file is TOML (see recipes/lr_grid.toml for a complete, commented one):

    [sweep]                          name, base recipe, launcher defaults, resources
    name = "lr_grid"                 -> results/lr_grid/<run-name>/ for every cell
    base = "default.toml"            a recipe, relative to the sweep file (optional)
    [sweep.resources]                num_cpus / num_gpus of one cell (ray tasks, slurm cpus_per_task);
                                     nproc = N shards every cell over N processes (torchrun), each with
                                     num_cpus / num_gpus of its own
    [sweep.slurm]                    partition, time_min, gpus_per_node, cluster ("local" runs here)
    [train] / [grpo] / ...           inline sections, overriding the base recipe key by key
    [grid]
    seeds = [0, 1, 2]
    "train.objective" = ["grpo", "sft"]       any dotted config key with a list of values is an axis
    [grid.optimizers.sgd]            one table per optimizer variant: its own learning rates
    lr = [1e-3, 1e-2]
    [grid.optimizers.sgd_momentum]   a variant of an optimizer: `name` says which one
    name = "sgd"
    momentum = 0.9                   scalars are fixed, lists are axes of this variant only

The cells are the Cartesian product of (variant x its lrs x its list fields) x other axes x seeds. Each cell's
run name encodes its axes (`{objective}__{variant}__lr{lr:g}__s{seed}`, plus `__{key}{value}` per other axis)
and is written into the cell's config as train.run_name, so the run folder is self-describing.

Deliberate simplifications: no random or Bayesian search (a grid is what the paper's comparison needs); the
sweep folder's sweep.toml records the latest invocation, while cells of an earlier, larger grid stay on disk
and in reports.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlopt_cli.config.optimizers import OPTIMIZERS
from rlopt_cli.config.recipes import from_dict, parse_override, read_toml, set_dotted, to_dict, valid_keys
from rlopt_cli.config.schema import RunConfig
from rlopt_cli.errors import RloptError, close_matches

OPTIMIZER_ARGS = sorted({k for spec in OPTIMIZERS.values() for k in spec.defaults})

LAUNCHER_NAMES = ("local", "ray", "slurm")
SWEEP_FILE = "sweep.toml"
RESOURCES = ("num_cpus", "num_gpus", "nproc")
# Axes that have their own place in the grid; naming them as plain axes would fight that place.
RESERVED_AXES = {"train.seed": "seeds = [...]", "train.run_name": "[sweep] run_name"}


@dataclass(frozen=True)
class Settings:
    """The [sweep] table: how and where the cells run."""

    name: str
    """Sweep name: the folder under --out and the W&B group of every cell."""
    launcher: str = "local"
    """local | ray | slurm; the command line's --launcher wins."""
    workers: int = 1
    """local: processes running cells at once; slurm: array parallelism."""
    num_cpus: float = 1.0
    """Cores one cell uses (ray task resources, slurm cpus_per_task, torch threads); per process when nproc > 1."""
    num_gpus: float = 0.0
    """GPUs one cell uses (ray task resources); per process of a sharded cell (nproc > 1)."""
    nproc: int = 1
    """Processes of one cell: > 1 runs every cell as a sharded run (FSDP2 under torchrun) on one machine."""
    slurm_partition: str = ""
    """slurm: partition (empty = the cluster's default)."""
    slurm_time_min: int = 60
    """slurm: time limit of one array task, minutes."""
    slurm_gpus_per_node: int = 0
    """slurm: GPUs of one array task; 0 = nproc x num_gpus."""
    slurm_cluster: str = ""
    """submitit cluster: empty = auto (slurm if sbatch exists, else local); 'local' or 'debug' to test."""
    run_name: str = ""
    """Template of cell names, e.g. '{objective}__{variant}__lr{lr:g}__s{seed}'; empty = the default."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise RloptError(f"[sweep] name = {self.name!r} must be a plain folder name, e.g. 'lr_grid'")
        if self.launcher not in LAUNCHER_NAMES:
            raise RloptError(
                f"[sweep] launcher = {self.launcher!r} is not one of {', '.join(LAUNCHER_NAMES)}"
                f"{close_matches(self.launcher, LAUNCHER_NAMES)}"
            )
        if self.workers < 1:
            raise RloptError(f"[sweep] workers = {self.workers} must be >= 1")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise RloptError("[sweep.resources] num_cpus must be > 0 and num_gpus >= 0")
        if self.nproc < 1:
            raise RloptError(f"[sweep.resources] nproc = {self.nproc} must be >= 1")
        if self.nproc > 1 and self.num_gpus not in (0, 1):  # a rank computes on one GPU, cuda:LOCAL_RANK
            raise RloptError(
                f"[sweep.resources] num_gpus = {self.num_gpus:g} with nproc = {self.nproc}: each process of a "
                "sharded cell uses one GPU; set num_gpus = 1 (per process) or 0 (CPU)"
            )
        short = self.slurm_gpus_per_node and self.num_gpus and self.slurm_gpus_per_node < self.nproc
        if self.nproc > 1 and short:
            raise RloptError(
                f"[sweep.slurm] gpus_per_node = {self.slurm_gpus_per_node} but a cell's {self.nproc} processes "
                f"need one GPU each: set gpus_per_node = {self.nproc}, or drop it"
            )


@dataclass(frozen=True)
class Cell:
    """One grid point: a run name, the axis values that define it, and its full run config."""

    name: str
    axes: dict[str, Any] = field(hash=False)
    """objective, variant, optimizer, lr, seed, then every other axis by its dotted key."""
    config: RunConfig


@dataclass(frozen=True)
class Sweep:
    settings: Settings
    cells: list[Cell] = field(hash=False)
    resolved: dict[str, Any] = field(hash=False)
    """The sweep file with its base recipe merged in: self-contained, saved as <sweep>/sweep.toml."""


# ---------------------------------------------------------------------------------------------------------------
# reading a sweep file


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file, merge its base recipe, validate it and expand the grid into cells."""
    path = Path(path)
    data = read_toml(path)
    table = data.get("sweep")
    if not isinstance(table, dict):
        raise RloptError(f'{path} has no [sweep] table; a sweep file starts with [sweep] name = "..."')
    base: dict[str, Any] = {}
    if table.get("base"):
        base = read_toml(path.parent / table["base"])
        if "sweep" in base or "grid" in base:
            raise RloptError(f"base recipe {table['base']!r} is itself a sweep file; point base at a recipe")
    for section, values in data.items():
        if section not in ("sweep", "grid"):
            if not isinstance(values, dict):
                raise RloptError(f"{path}: top-level key {section!r} must be inside a table such as [train]")
            base.setdefault(section, {}).update(values)
    resolved = {
        "sweep": {k: v for k, v in table.items() if k != "base"},
        **base,
        "grid": data.get("grid", {}),
    }
    return expand(resolved, where=str(path))


def settings_from(table: dict[str, Any]) -> Settings:
    resources = table.get("resources", {})
    slurm = table.get("slurm", {})
    for key in resources:  # a misspelt nproc must not run every cell in one process
        if key not in RESOURCES:
            raise RloptError(
                f"unknown key [sweep.resources] {key}{close_matches(key, RESOURCES)} "
                f"(valid: {', '.join(RESOURCES)})"
            )
    known = {"name", "base", "launcher", "workers", "run_name", "resources", "slurm"}
    for key in table:
        if key not in known:
            raise RloptError(
                f"unknown key [sweep] {key}{close_matches(key, known)} (valid: {', '.join(known)})"
            )
    try:
        return Settings(
            name=str(table.get("name", "")),
            launcher=table.get("launcher", "local"),
            workers=int(table.get("workers", 1)),
            num_cpus=float(resources.get("num_cpus", 1)),
            num_gpus=float(resources.get("num_gpus", 0)),
            nproc=int(resources.get("nproc", 1)),
            slurm_partition=slurm.get("partition", ""),
            slurm_time_min=int(slurm.get("time_min", 60)),
            slurm_gpus_per_node=int(slurm.get("gpus_per_node", 0)),
            slurm_cluster=slurm.get("cluster", ""),
            run_name=table.get("run_name", ""),
        )
    except (TypeError, ValueError) as err:
        raise RloptError(f"[sweep] has a value of the wrong type ({err})") from None


def expand(resolved: dict[str, Any], where: str = "sweep file") -> Sweep:
    """The resolved sweep dict -> validated cells (the Cartesian product of the grid)."""
    settings = settings_from(resolved["sweep"])
    base = {k: v for k, v in resolved.items() if k not in ("sweep", "grid")}
    from_dict(base)  # validate the base once, so its errors are not reported per cell
    grid = resolved.get("grid") or {}
    variants = grid.get("optimizers") or {}
    seeds = _values(grid.get("seeds", [base.get("train", {}).get("seed", 0)]), "grid.seeds")
    axes = _axes(grid)
    if not variants or not seeds or any(not v for v in axes.values()):
        raise RloptError(
            f"{where} has an empty grid: add [grid] seeds = [0, 1] and a [grid.optimizers.<name>] table "
            "with lr = [...] (every axis needs at least one value)"
        )
    cells = []
    for variant, spec in variants.items():
        opt_points, opt_axes = _variant_points(variant, spec)
        for opt, values, seed in itertools.product(opt_points, itertools.product(*axes.values()), seeds):
            point = dict(zip(axes, values, strict=True))
            named = {k: opt[k] for k in opt_axes}
            named |= {k.rsplit(".", 1)[1]: v for k, v in point.items() if k != "train.objective"}
            cells.append(_cell(settings, base, variant, opt, point, named, seed))
    _check_unique(cells)
    return Sweep(settings, cells, resolved)


def _values(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise RloptError(f"{key} must be a list of values, e.g. [0, 1, 2]; got {value!r}")
    return value


def _axes(grid: dict[str, Any]) -> dict[str, list[Any]]:
    """The [grid] axes other than seeds and optimizers, as flat dotted keys (quoted or nested TOML)."""
    flat: dict[str, Any] = {}
    for key, value in grid.items():
        if key in ("seeds", "optimizers"):
            continue
        if isinstance(value, dict):  # train.objective = [...] written unquoted is a nested table
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    for key in flat:
        if key in RESERVED_AXES:
            raise RloptError(f"[grid] {key!r} is set another way: use {RESERVED_AXES[key]}")
        if key.startswith("optimizer."):
            raise RloptError(f"[grid] {key!r}: optimizer fields belong in [grid.optimizers.<name>] tables")
        if key not in valid_keys():
            raise RloptError(f"unknown config key in [grid]: {key!r}{close_matches(key, valid_keys())}")
        if not isinstance(flat[key], list):
            raise RloptError(
                f"[grid] {key} = {flat[key]!r} must be a list of values; a fixed value goes in its section"
            )
    return flat


def _variant_points(variant: str, spec: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """[grid.optimizers.<variant>] -> one dict of optimizer fields per combination of its list values,
    and the fields other than lr that were lists (they go into the run names)."""
    where = f"[grid.optimizers.{variant}]"
    if not isinstance(spec, dict):
        raise RloptError(f"{where} must be a table with lr = [...]")
    fields = {"name": variant, **spec}
    if fields["name"] not in OPTIMIZERS:
        raise RloptError(
            f"{where}: unknown optimizer {fields['name']!r}; choose one of {', '.join(OPTIMIZERS)}"
            f"{close_matches(str(fields['name']), OPTIMIZERS)} (a variant names its optimizer with name = ...)"
        )
    if "lr" not in fields:
        raise RloptError(f"{where} needs lr = [...], the learning rates of this optimizer")
    lists: dict[str, list[Any]] = {}
    for key, value in fields.items():
        if f"optimizer.{key}" not in valid_keys():
            raise RloptError(
                f"{where}: unknown optimizer field {key!r}{close_matches(f'optimizer.{key}', valid_keys())}"
            )
        # betas is itself a list: only a list of lists makes it an axis
        is_axis = isinstance(value, list) and (key != "betas" or (value and isinstance(value[0], list)))
        lists[key] = value if is_axis else [value]
        if not lists[key]:
            raise RloptError(f"{where} {key} = [] is empty; give at least one value")
    for lr in lists["lr"]:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise RloptError(f"{where} lr = {lr!r} is not a positive number; use e.g. lr = [1e-3, 1e-2]")
    points = [dict(zip(lists, combo, strict=True)) for combo in itertools.product(*lists.values())]
    return points, [k for k, v in fields.items() if k != "lr" and lists[k] is v]


def _cell(
    settings: Settings,
    base: dict[str, Any],
    variant: str,
    opt: dict[str, Any],
    axes: dict[str, Any],
    named: dict[str, Any],
    seed: Any,
) -> Cell:
    data = {section: dict(values) for section, values in base.items()}
    # The variant names its optimizer; the base keeps only what every optimizer shares (clipping, schedule,
    # weight decay), since e.g. a base sgd momentum would be an error for adamw.
    for key in ("name", "lr", *OPTIMIZER_ARGS):
        data.get("optimizer", {}).pop(key, None)
    for key, value in opt.items():
        set_dotted(data, f"optimizer.{key}", value)
    for key, value in axes.items():
        set_dotted(data, key, value)
    set_dotted(data, "train.seed", seed)
    objective = data.get("train", {}).get("objective", "grpo")
    names = {
        "objective": objective,
        "variant": variant,
        "optimizer": opt["name"],
        "lr": opt["lr"],
        "seed": seed,
    }
    extra = {f"optimizer.{k}": v for k, v in opt.items() if k not in ("name", "lr")} | axes
    cell_axes = names | {k: v for k, v in extra.items() if k != "train.objective"}
    name = run_name(settings.run_name, names, named)
    set_dotted(data, "train.run_name", name)
    set_dotted(data, "log.wandb_group", settings.name)
    set_dotted(data, "log.progress", False)
    try:
        config = from_dict(data)
    except RloptError as err:
        raise RloptError(f"cell {name}: {err}") from None
    return Cell(name, cell_axes, config)


def run_name(template: str, names: dict[str, Any], varying: dict[str, Any]) -> str:
    """`{objective}__{variant}__lr{lr:g}__s{seed}` (+ `__{field}{value}` per other axis), or the template."""
    if template:
        try:
            return template.format(**names, **varying)
        except (KeyError, ValueError, IndexError) as err:
            keys = ", ".join([*names, *varying])
            raise RloptError(
                f"[sweep] run_name = {template!r} cannot be filled ({err}); fields: {keys}"
            ) from None
    name = f"{names['objective']}__{names['variant']}__lr{names['lr']:g}__s{names['seed']}"
    for key, value in varying.items():
        text = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else _short(value)
        name += f"__{key}{text}"
    return name


def _short(value: Any) -> str:
    # a path-valued axis (e.g. task.train_file) must not turn the cell's folder name into a path
    return (
        f"{value:g}" if isinstance(value, float) else str(value).lower().replace("/", "_").replace("\\", "_")
    )


def _check_unique(cells: list[Cell]) -> None:
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.name in seen:
            raise RloptError(
                f"two cells share the run name {cell.name!r}; add the differing axis to [sweep] run_name"
            )
        seen[cell.name] = cell


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """Keep the cells matching every `--only key=value` (repeat a key to allow several values)."""
    wanted: dict[str, list[Any]] = {}
    for item in only:
        key, value = parse_override(item)
        wanted.setdefault(key, []).append(value)
    if not wanted:
        return cells
    names = sorted({k for c in cells for k in c.axes})
    for key in wanted:
        if key not in names and key not in valid_keys():
            raise RloptError(
                f"--only {key}: not an axis of this sweep{close_matches(key, names)} (axes: "
                f"{', '.join(names)})"
            )
    return [c for c in cells if all(_matches(_value_of(c, k), vs) for k, vs in wanted.items())]


def _value_of(cell: Cell, key: str) -> Any:
    if key in cell.axes:
        return cell.axes[key]
    section, name = key.split(".", 1)
    return to_dict(cell.config)[section].get(name)


def _matches(actual: Any, values: list[Any]) -> bool:
    for value in values:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (actual, value))
        if numbers and abs(actual - value) <= 1e-9 * max(abs(actual), abs(value)):  # lr=1e-5 vs 0.00001
            return True
        if not numbers and str(actual).lower() == str(value).lower():
            return True
    return False
