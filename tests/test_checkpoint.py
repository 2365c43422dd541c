"""Checkpoints: the streamed trainer-state writer, a tied lm_head written once, fsync before and after the rename,
and `train.keep_checkpoints` pruning (resume still exact)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlopt_cli.config.recipes import load_config
from rlopt_cli.training import checkpoint
from rlopt_cli.training import loop as trainer
from rlopt_cli.training.checkpoint import list_checkpoints, prune_checkpoints, save_checkpoint, step_dir
from rlopt_cli.training.tracking import read_metrics
from tests.conftest import first_of_each
from tests.tiny_hf import byte_tokenizer, tiny_model


def quiet(message: str) -> None:
    pass


def test_the_streamed_writer_writes_save_files_bytes(tmp_path: Path) -> None:
    from rlopt_cli.runtime.safetensors_stream import save_streamed

    tensors = {
        "master.b": torch.randn(3, 5),
        "master.a": torch.randn(7),
        "optim.0.step": torch.tensor(3.0),  # 0-d, as AdamW's step
        "rng.torch": torch.get_rng_state(),  # uint8
        "export.w": torch.randn(4, 4).to(torch.bfloat16),
        "x.f64": torch.randn(2, dtype=torch.float64),
        "x.i64": torch.arange(3),
        "x.f16": torch.randn(5).half(),
        "x.transposed": torch.randn(3, 2).t(),  # not contiguous
    }
    save_streamed(tensors, tmp_path / "streamed.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "reference.safetensors"))
    assert (tmp_path / "streamed.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors"
    ).read_bytes()
    back = load_file(tmp_path / "streamed.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def old_export_bytes(model, folder: Path) -> int:
    """The export as it was: one cast per state-dict key (the tied matrix became two bf16 tensors)."""
    export = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=export, safe_serialization=True)
    return (folder / "model.safetensors").stat().st_size


@pytest.mark.parametrize("save_dtype", ["bfloat16", "float32"])
def test_a_tied_lm_head_is_saved_once(tmp_path: Path, save_dtype: str) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3")  # tied, as SmolLM2 and Qwen3-1.7B
    assert model.lm_head.weight is model.get_input_embeddings().weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    ckpt = save_checkpoint(tmp_path, 1, model, byte_tokenizer(), optimizer, "", save_dtype)

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        exported = set(f.keys())
    state = load_file(ckpt / "trainer_state.safetensors")
    assert "lm_head.weight" not in exported and "model.embed_tokens.weight" in exported
    assert "master.lm_head.weight" not in state and "master.model.embed_tokens.weight" in state
    n_params = len(list(model.parameters()))
    assert len([k for k in state if k.startswith("master.")]) == n_params
    assert len([k for k in state if k.endswith(".exp_avg")]) == n_params

    loaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    expected = model.get_input_embeddings().weight.detach().to(getattr(torch, save_dtype)).float()
    assert torch.equal(loaded.lm_head.weight, expected)
    if save_dtype == "bfloat16":  # the bytes one copy of the tied matrix took before
        saved = old_export_bytes(model, tmp_path / "old") - (ckpt / "model.safetensors").stat().st_size
        assert 0 <= saved - model.lm_head.weight.numel() * 2 < 100  # (+ its header entry)


def test_an_untied_lm_head_is_still_saved(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    ckpt = save_checkpoint(tmp_path, 0, model, byte_tokenizer(), None, "", "bfloat16")
    exported = load_file(ckpt / "model.safetensors")
    assert torch.equal(exported["lm_head.weight"], model.lm_head.weight.detach().bfloat16())


def test_every_file_and_folder_is_fsynced_around_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt = save_checkpoint(tmp_path, 3, tiny_model("qwen3"), byte_tokenizer(), None, "x", "bfloat16")
    tmp = str(ckpt) + ".tmp"
    files = {f"{tmp}/{p.relative_to(ckpt)}" for p in ckpt.rglob("*") if p.is_file()}
    assert files and files <= set(synced)  # each file's data, under its temporary name
    assert tmp in synced  # the folder's entries
    assert synced[-1] == str(ckpt.parent)  # and last, the rename into place


def test_pruning_keeps_step_0_and_the_newest(tmp_path: Path) -> None:
    for step in (0, 2, 4, 6, 8):
        step_dir(tmp_path, step).mkdir(parents=True)
    leftover = step_dir(tmp_path, 1).with_name("step-000001.old.tmp")  # a kill in the middle of a prune
    leftover.mkdir()
    assert prune_checkpoints(tmp_path, 0) == []
    assert not leftover.exists()
    assert [p.name[-1] for p in list_checkpoints(tmp_path)] == ["0", "2", "4", "6", "8"]
    assert [p.name for p in prune_checkpoints(tmp_path, 2)] == ["step-000002", "step-000004"]
    assert [p.name[-1] for p in list_checkpoints(tmp_path)] == ["0", "6", "8"]
    prune_checkpoints(tmp_path, 1)
    assert [p.name[-1] for p in list_checkpoints(tmp_path)] == ["0", "8"]
    assert sorted(p.name for p in (tmp_path / checkpoint.CHECKPOINTS).iterdir()) == [
        "step-000000",
        "step-000008",
    ]


@pytest.mark.slow
def test_keep_checkpoints_prunes_and_resume_is_exact(
    tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch, forced_rewards
) -> None:
    forced_rewards(first_of_each(4))
    sets = [*tiny_overrides, "train.steps=5", "train.checkpoint_every=1", "optimizer.name='adamw'"]
    cfg = load_config(None, [*sets, "optimizer.lr=1e-3", "train.keep_checkpoints=2"])
    straight = trainer.train(cfg, tmp_path / "a", quiet)
    assert [p.name for p in list_checkpoints(straight)] == ["step-000000", "step-000004", "step-000005"]

    real_step = trainer.grpo_step

    def crash_at_4(*args, **kwargs):
        if args[-1] == 4:
            raise KeyboardInterrupt  # a kill after the step-3 checkpoint (and the prune of step 1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "grpo_step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, tmp_path / "b", quiet)
    run = tmp_path / "b" / straight.name
    assert [p.name for p in list_checkpoints(run)] == ["step-000000", "step-000002", "step-000003"]
    monkeypatch.setattr(trainer, "grpo_step", real_step)
    resumed = trainer.train(cfg, tmp_path / "b", quiet)
    assert [p.name for p in list_checkpoints(resumed)] == ["step-000000", "step-000004", "step-000005"]
    a = load_file(straight / "checkpoints/step-000005/trainer_state.safetensors")
    b = load_file(resumed / "checkpoints/step-000005/trainer_state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "rng.torch")
    strip = [
        {k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in read_metrics(straight)
    ]
    assert strip == [
        {k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in read_metrics(resumed)
    ]
