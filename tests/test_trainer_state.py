"""Reading a checkpoint's trainer state: a sharded (DCP) checkpoint's non-tensor values are unpickled without
running code, and the fp32 master weights read alike from a one-process and a sharded checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from rlopt_cli.training.trainer_state import SafeLoadPlanner


class Planted:
    """What a tampered checkpoint could hold: unpickling it calls `open(marker, "w")`, creating the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_dcp_values_are_unpickled_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    folder = tmp_path / "state"
    groups = {"lr": 0.1, "betas": (0.9, 0.999), "params": ["a.weight"], "fused": None}
    saved = {"w": torch.arange(4.0), "groups": groups, "planted": Planted(marker)}
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(saved, checkpoint_id=folder, no_dist=True)

    # the values rlopt saves (tensors, numbers, tuples, names), read into a state dict of the same structure
    plain = {"w": torch.zeros(4), "groups": {"lr": 0.0, "betas": (0.0, 0.0), "params": [""], "fused": False}}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(plain, checkpoint_id=folder, planner=SafeLoadPlanner(), no_dist=True)
    assert plain["groups"] == groups and torch.equal(plain["w"], torch.arange(4.0))

    planted = {"planted": None}
    with pytest.raises(CheckpointException, match="Weights only load failed"), pytest.warns(UserWarning):
        dcp.load(planted, checkpoint_id=folder, planner=SafeLoadPlanner(), no_dist=True)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="single process"):  # torch's own planner would have run it
        dcp.load(planted, checkpoint_id=folder, no_dist=True)
    assert marker.exists()


def test_a_sharded_checkpoint_reads_back_and_a_damaged_one_is_one_line(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """A DCP checkpoint (what a sharded run saves) written and read in one process: its fp32 masters come back
    through `master_weights` and into a model; a damaged shard is a one-line error naming the checkpoint."""
    from rlopt_cli.config.recipes import load_config
    from rlopt_cli.errors import RloptError
    from rlopt_cli.models.loading import load_policy
    from rlopt_cli.runtime.distributed import World
    from rlopt_cli.training import sharded_checkpoint
    from rlopt_cli.training.trainer_state import master_weights

    cfg = load_config(None, [*tiny_overrides, "model.warmup_steps=0"])
    model, tokenizer = load_policy(cfg, torch.device("cpu"), None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    optimizer.step()  # momentum buffers: optimizer state to save
    ckpt = sharded_checkpoint.save_checkpoint(
        tmp_path, 1, model, tokenizer, optimizer, "", "bfloat16", World.single()
    )
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    momenta = {name: optimizer.state[p]["momentum_buffer"].clone() for name, p in model.named_parameters()}
    assert {name: w for name, w in master_weights(ckpt)}.keys() == saved.keys()
    assert all(torch.equal(w, saved[name]) for name, w in master_weights(ckpt))

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert sharded_checkpoint.load_trainer_state(ckpt, model, fresh) == 1
    assert all(torch.equal(p, saved[name]) for name, p in model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(fresh.state[p]["momentum_buffer"], momenta[name]), name

    shard = next((ckpt / "trainer_state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(RloptError, match=rf"checkpoint {ckpt} is unreadable \(.*\); move it away"):
        sharded_checkpoint.load_trainer_state(ckpt, model, fresh)
