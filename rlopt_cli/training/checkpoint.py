"""The run folder and its checkpoints: the only thing reports, eval and sparsity read.

    results/<run>/config.toml            fully resolved config
                  meta.json              seed, git sha, package versions, device, start/end time, W&B id
                  metrics.jsonl          one JSON line per step
                  summary.json           written when the run finishes
                  .lock                  the owner's pid (folder_lock.py)
                  checkpoints/step-NNNNNN/
                      model.safetensors (+ index when sharded), config.json, tokenizer files
                                                  (transformers loads the folder as it is)
                      rlopt.toml                  the run's resolved config
                      trainer_state.json          step, optimizer param groups, dtypes
                      trainer_state.safetensors   fp32 master weights, optimizer state, RNG state

step-000000 holds the starting weights, so `rlopt sparsity` and the in-training sparsity have a reference.
Every file is written into a temporary folder, fsynced (files, then folders), and the folder is renamed into
place and its parent fsynced: a checkpoint folder appears whole or not at all, through a kill or a power loss.
Nothing is pickled: tensors go to safetensors, the rest to JSON.

Memory and size: the trainer state is written one tensor at a time (`runtime/safetensors_stream.py`), so the
host holds one tensor's copy, not the model's fp32 weights and moments at once. A tied lm_head (SmolLM2, Qwen3)
is one parameter: the trainer state holds it once (`named_parameters` yields it once), and so does the export
(`export_weights` keeps the tie through the dtype cast, so save_pretrained drops the lm_head copy as it does
for the fp32 model). `train.keep_checkpoints` prunes old checkpoints after each save (`prune_checkpoints`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from rlopt_cli.errors import RloptError
from rlopt_cli.models.loading import PICKLE_SUFFIXES, mark_saved_dtype, refuse_pickle
from rlopt_cli.runtime.atomic_files import fsync_dir, fsync_tree
from rlopt_cli.runtime.kill_points import kill_point

CHECKPOINTS = "checkpoints"
DELETING = ".old.tmp"  # suffix of a checkpoint being pruned: ends in .tmp, so no reader takes it for whole


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders of an interrupted save are ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")
    )


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A checkpoint folder, or a run folder (its last checkpoint, or `step`); one-line errors otherwise."""
    p = Path(path)
    refuse_pickle(p)
    if not p.exists():
        raise RloptError(f"checkpoint not found: {p}")
    if p.is_dir() and (p / CHECKPOINTS).is_dir():
        ckpts = list_checkpoints(p)
        if step is not None:
            ckpts = [c for c in ckpts if checkpoint_step(c) == step]
            if not ckpts:
                raise RloptError(f"run {p} has no checkpoint at step {step}")
        if not ckpts:
            raise RloptError(f"run folder {p} has no checkpoints yet")
        return ckpts[-1]
    if p.is_dir():
        if has_weights(p):
            return p
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
        hint = f"; found pickles ({', '.join(pickles)}), which rlopt refuses to load" if pickles else ""
        raise RloptError(f"no model.safetensors in {p}{hint}")
    raise RloptError(f"{p} is not a checkpoint folder or run folder")


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any | None,
    config_toml: str,
    save_dtype: str,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically: export weights in `save_dtype`, master weights in fp32."""
    import torch  # heavy: imported on use

    from rlopt_cli.runtime.safetensors_stream import save_streamed  # imports torch

    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export = export_weights(model.state_dict(), getattr(torch, save_dtype))
    model.save_pretrained(tmp, state_dict=export, safe_serialization=True, max_shard_size="5GB")
    del export
    mark_saved_dtype(tmp, save_dtype)
    tokenizer.save_pretrained(tmp)
    (tmp / "rlopt.toml").write_text(config_toml)

    # References, not copies (`.float()` of the fp32 master weights is the tensor itself): `save_streamed`
    # copies them to the host one at a time.
    tensors = {f"master.{n}": p.detach().float() for n, p in model.named_parameters()}
    tensors["rng.torch"] = torch.get_rng_state()
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, values in state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{idx}.{key}"] = value
        groups = state["param_groups"]
    save_streamed(tensors, tmp / "trainer_state.safetensors")
    (tmp / "trainer_state.json").write_text(
        json.dumps({"step": step, "save_dtype": save_dtype, "param_groups": groups}, indent=2, default=list)
        + "\n"
    )
    fsync_tree(tmp)  # every file's data on disk before the rename publishes the folder
    kill_point(f"checkpoint-{step}")
    if final.exists():  # re-saving a step after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)  # the rename itself, durable
    return final


def export_weights(state: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The state dict cast to `dtype`, contiguous, with one cast per distinct tensor: a tied lm_head stays the
    embedding's own tensor, so save_pretrained writes it once (as for the fp32 model). Casting per key made two
    equal bf16 tensors, and the tied matrix was written twice (+ vocab x hidden x 2 bytes: 622 MB at Qwen3-1.7B)."""
    cast: dict[tuple[Any, ...], Any] = {}
    export: dict[str, Any] = {}
    for name, value in state.items():
        key = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if key not in cast:
            cast[key] = value.detach().to(dtype).contiguous()
        export[name] = cast[key]
    return export


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (0 = keep all), never step-000000 (the sparsity reference);
    returns the deleted folders. Each is renamed to a `.tmp` name before it is deleted, so a kill midway leaves no
    half folder that looks whole; leftovers of such a kill are deleted here too."""
    for leftover in (run_dir / CHECKPOINTS).glob(f"step-*{DELETING}"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep <= 0:
        return []
    later = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) > 0]
    doomed = later[:-keep]
    for ckpt in doomed:
        gone = ckpt.with_name(ckpt.name + DELETING)
        os.replace(ckpt, gone)
        shutil.rmtree(gone)
    if doomed:
        fsync_dir(run_dir / CHECKPOINTS)
    return doomed


def load_trainer_state(ckpt: Path, model: Any, optimizer: Any | None) -> int:
    """Restore fp32 master weights, optimizer state and RNG from a checkpoint; returns its step.

    Step 0 holds no optimizer state (it is saved before the first step): the optimizer is left as built, which
    is exactly the state an uninterrupted run had at that point."""
    import torch  # heavy: imported on use
    from safetensors import SafetensorError  # heavy: imported on use
    from safetensors.torch import load_file  # heavy: imported on use

    try:
        info = json.loads((ckpt / "trainer_state.json").read_text())
        tensors = load_file(str(ckpt / "trainer_state.safetensors"))
    except (SafetensorError, ValueError, FileNotFoundError) as err:  # damaged from outside: writes are atomic
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RloptError(
            f"checkpoint {ckpt} is unreadable ({reason}); move it away to resume from the one before"
        ) from None
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(tensors[f"master.{name}"].to(param.device))
    torch.set_rng_state(tensors["rng.torch"])
    if optimizer is not None and info["param_groups"]:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        groups = info["param_groups"]
        for group in groups:  # JSON turned tuples into lists
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    return int(info["step"])
