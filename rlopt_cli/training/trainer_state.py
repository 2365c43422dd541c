"""A checkpoint's trainer state, whichever number of processes saved it: reading it without pickles.

A one-process run writes `trainer_state.safetensors` (fp32 masters as `master.<name>`, optimizer state, RNG); a
sharded run writes `trainer_state/`, a `torch.distributed.checkpoint` (DCP) folder of one shard file per rank
(keys `model.<name>`, `optim...`, `rng`). Readers that need the fp32 weights (the paper study's analysis) go
through `master_weights`, which yields one whole tensor at a time from either.

DCP stores every non-tensor value (the optimizer's param groups: floats, bools, a tuple of betas, a list of
names) as a pickle, and its default planner unpickles them with `weights_only=False`, which runs whatever code
the file names. `SafeLoadPlanner` unpickles them with `weights_only=True`: plain containers and numbers only.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

DCP_DIR = "trainer_state"  # DCP's folder inside a checkpoint: one file per rank plus its .metadata
MODEL_PREFIX = (
    "model."  # DCP's flattened key of a model weight: the state dict's "model" entry, then the name
)


def is_dcp(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR).is_dir()


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor values are unpickled with `weights_only=True`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import (
            set_element,
        )  # private: the helper DCP uses itself

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def master_weights(ckpt: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, fp32 master weight) of `ckpt`, one whole tensor at a time, in the saved order."""
    if not is_dcp(ckpt):
        from safetensors import safe_open  # heavy: imported on use

        with safe_open(str(ckpt / "trainer_state.safetensors"), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.startswith("master."):
                    yield key.removeprefix("master."), f.get_tensor(key)
        return
    import torch.distributed.checkpoint as dcp

    tied = json.loads((ckpt / "trainer_state.json").read_text()).get("tied", {})
    reader = FileSystemReader(str(ckpt / DCP_DIR))
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        name = key.removeprefix(MODEL_PREFIX)
        if not key.startswith(MODEL_PREFIX) or name in tied:  # a tied weight once, as named_parameters has it
            continue
        # DCP reads the entry's pieces from every rank's shard file into this one tensor
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)  # type: ignore[union-attr]
        with warnings.catch_warnings():  # no process group: DCP says it reads in one process, as meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({key: tensor}, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
        yield name, tensor
