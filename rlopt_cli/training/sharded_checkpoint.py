"""A sharded run's checkpoints: the consolidated Hugging Face export (written by rank 0 from the full state dict)
and the trainer state as `torch.distributed.checkpoint` (DCP) shards, one file per rank, which resume on any
number of processes; a one-process checkpoint resumes into a sharded run too.

The folder is the one-process checkpoint's (training/checkpoint.py), with `trainer_state/` in place of
`trainer_state.safetensors`: built as `step-NNNNNN.tmp`, fsynced, and renamed by rank 0 once every rank's shard
is written. Reading it never unpickles code (`trainer_state.SafeLoadPlanner`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, cast

import torch

from rlopt_cli.errors import RloptError
from rlopt_cli.models.loading import mark_saved_dtype
from rlopt_cli.runtime.atomic_files import fsync_dir, fsync_tree
from rlopt_cli.runtime.distributed import World
from rlopt_cli.runtime.kill_points import kill_point
from rlopt_cli.training.checkpoint import export_weights, step_dir
from rlopt_cli.training.trainer_state import DCP_DIR, SafeLoadPlanner, is_dcp


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any | None,
    config_toml: str,
    save_dtype: str,
    world: World,
) -> Path:
    """checkpoints/step-NNNNNN, atomically: the Hugging Face export (model.safetensors in `save_dtype`, config,
    tokenizer) from the full state dict, written by rank 0; the trainer state (fp32 model shards, optimizer
    shards, RNG) through DCP by every rank into `trainer_state/`, readable on any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if world.lead:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    full: dict[str, Any] = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if world.lead:  # the other ranks' `full` is empty: cpu_offload gathers to rank 0 only
        # the gathered state dict holds a copy per name of a tied parameter: made one tensor again, the export
        # writes it once, as the one-process export does
        full |= {name: full[first] for name, first in tied_names(model).items() if name in full}
        export = export_weights(full, getattr(torch, save_dtype))
        model.save_pretrained(tmp, state_dict=export, safe_serialization=True, max_shard_size="5GB")
        mark_saved_dtype(tmp, save_dtype)
        tokenizer.save_pretrained(tmp)
        (tmp / "rlopt.toml").write_text(config_toml)
    del full
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    state["rng"] = torch.get_rng_state()
    # every rank writes its shard file and fsyncs it (FileSystemWriter's sync_files); DCP's last collective
    # writes the metadata once every shard is written
    shards = str(tmp / DCP_DIR)
    dcp.save(
        state, checkpoint_id=shards, storage_writer=shard_writer(shards, step), no_dist=not world.sharded
    )
    if world.lead:
        info = {"step": step, "save_dtype": save_dtype, "format": "dcp", "world_size": world.size}
        info["has_optimizer"] = optimizer is not None
        info["tied"] = tied_names(model)  # DCP holds a tied weight under each name; readers count it once
        (tmp / "trainer_state.json").write_text(json.dumps(info, indent=2) + "\n")
        fsync_tree(tmp)  # as the one-process save: every file on disk before the rename publishes the folder
        kill_point(f"checkpoint-{step}")
        if final.exists():  # re-saving a step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    world.barrier()
    return final


def shard_writer(path: str, step: int) -> Any:
    """DCP's file writer, with the kill point `shard-N` once this rank's shard file is written (the moment a
    rank that dies leaves the others waiting inside the save: checkpoint N stays a .tmp folder)."""
    from torch.distributed.checkpoint import FileSystemWriter

    class ShardWriter(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            written = super().write_data(plan, planner)
            kill_point(f"shard-{step}")
            return written

    return ShardWriter(path)


def tied_names(model: Any) -> dict[str, str]:
    """{a tied parameter's second name: its first name}, e.g. {"lm_head.weight": "model.embed_tokens.weight"}."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            tied[name] = first[id(param)]
    return tied


def load_trainer_state(ckpt: Path, model: Any, optimizer: Any | None) -> int:
    """Restore model, optimizer and RNG from a checkpoint on any number of processes; returns its step.

    A DCP checkpoint (saved by a sharded run) is resharded to this run's processes by DCP. A one-process
    checkpoint (trainer_state.safetensors) is read whole by every rank and scattered into the shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    try:
        info = json.loads((ckpt / "trainer_state.json").read_text())
    except (ValueError, FileNotFoundError) as err:
        raise RloptError(
            f"checkpoint {ckpt} is unreadable ({err}); move it away to resume from the one before"
        ) from None
    if not is_dcp(ckpt):
        return load_single_process_state(ckpt, info, model, optimizer)
    with_optim = optimizer is not None and info.get("has_optimizer", False)
    if with_optim:
        # `get_state_dict` builds a fresh optimizer's state for DCP to read into only when no parameter holds a
        # gradient (else it leaves the state empty, and the load silently restores no moments)
        model.zero_grad(set_to_none=True)
        model_state, optim_state = get_state_dict(model, cast(Any, optimizer))
        state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    else:
        state = {"model": get_model_state_dict(model)}
    state["rng"] = torch.get_rng_state()
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with (
            warnings.catch_warnings()
        ):  # one process (no process group): DCP reads every rank's shards, says so
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(
                state,
                checkpoint_id=str(ckpt / DCP_DIR),
                planner=SafeLoadPlanner(),  # the optimizer's param groups are pickles: no code runs from them
                no_dist=not dist.is_initialized(),
            )
    except CheckpointException as err:  # a shard damaged or tampered with from outside: writes are atomic
        reason = ", ".join(sorted({type(exc).__name__ for exc, _ in err.failures.values()}))
        raise RloptError(
            f"checkpoint {ckpt} is unreadable ({reason} in its trainer state); move it away to resume from the one "
            "before"
        ) from None
    if with_optim:
        set_state_dict(
            model, cast(Any, optimizer), model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    else:
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    torch.set_rng_state(state["rng"])
    return int(info["step"])


def load_single_process_state(ckpt: Path, info: dict[str, Any], model: Any, optimizer: Any | None) -> int:
    """A one-process checkpoint into a sharded model: full fp32 masters and optimizer state, keyed by name."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    tensors = load_file(str(ckpt / "trainer_state.safetensors"))
    names = [n for n, _ in model.named_parameters()]
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, {n: tensors[f"master.{n}"] for n in names}, options=full)
    torch.set_rng_state(tensors["rng.torch"])
    if optimizer is not None and info["param_groups"]:
        state: dict[str, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(names[int(idx)], {})[name] = value
        groups = []
        for group in info["param_groups"]:
            group = dict(group, params=[names[i] for i in group["params"]])
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
            groups.append(group)
        full_optim: Any = {"state": state, "param_groups": groups}
        set_optimizer_state_dict(model, optimizer, full_optim, options=full)
    return int(info["step"])
