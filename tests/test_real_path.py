"""The real-model path on CPU: GRPO on GSM8K files through `trainer.train`, and sharded safetensors checkpoints
(what a real model's checkpoint is) that transformers and rlopt load back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rlopt_cli.checkpoint import has_weights, load_trainer_state, resolve_checkpoint, save_checkpoint
from rlopt_cli.config import ModelConfig
from rlopt_cli.config_io import load_config
from rlopt_cli.models import build_char_tokenizer, build_embedded_model, load_pretrained

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.slow
def test_gsm8k_grpo_runs_end_to_end(tmp_path: Path, tiny_overrides: list[str]) -> None:
    pytest.importorskip("datasets")
    from rlopt_cli.tracking import read_metrics
    from rlopt_cli.trainer import train

    cfg = load_config(
        None,
        tiny_overrides
        + [
            "model.warmup_steps=0",  # a random model: this test is about the data path, not the reward
            "task.name=gsm8k",
            f"task.train_file={FIXTURES / 'gsm8k_train.jsonl'}",
            f"task.eval_file={FIXTURES / 'gsm8k_test.jsonl'}",
            "task.n_eval=4",
            "grpo.max_completion_length=8",
            "train.steps=2",
        ],
    )
    run_dir = train(cfg, tmp_path, say=lambda *_: None)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in (rows[0], rows[2]))
    assert all(r["train/completion_len"] > 0 for r in rows[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "gsm8k" and summary["steps"] == 2


def test_sharded_checkpoint_has_an_index_and_loads(tmp_path: Path) -> None:
    tokenizer = build_char_tokenizer()
    model: Any = build_embedded_model(
        ModelConfig(hidden_size=64, intermediate_size=128), len(tokenizer), tokenizer
    )
    # save_checkpoint shards at 5GB; a ~400 KB model needs a small limit to shard as a multi-GB one does
    save_pretrained = model.save_pretrained
    model.save_pretrained = lambda *args, **kwargs: save_pretrained(
        *args, **{**kwargs, "max_shard_size": "100KB"}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    optimizer.step()
    ckpt = save_checkpoint(tmp_path, 1, model, tokenizer, optimizer, "# test\n", "bfloat16")

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in ckpt.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (ckpt / "model.safetensors").exists()
    assert has_weights(ckpt) and resolve_checkpoint(tmp_path) == ckpt

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert loaded.dtype == torch.bfloat16  # the export dtype recorded in config.json
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    policy, _ = load_pretrained(ckpt, torch.device("cpu"))  # rlopt's loader: fp32 master weights
    assert next(policy.parameters()).dtype == torch.float32

    fresh: Any = build_embedded_model(
        ModelConfig(hidden_size=64, intermediate_size=128), len(tokenizer), tokenizer
    )
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert load_trainer_state(ckpt, fresh, fresh_opt) == 1  # exact fp32 resume state sits beside the shards
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
