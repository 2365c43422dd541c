"""The real-model path on CPU: GRPO on GSM8K files through `trainer.train`, every paper recipe with its own flags
on a tiny random model of its architecture, and sharded safetensors checkpoints (what a real model's checkpoint
is) that transformers and rlopt load back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from rlopt_cli.config.recipes import load_config
from rlopt_cli.config.schema import ModelConfig
from rlopt_cli.models.loading import build_char_tokenizer, build_embedded_model, load_pretrained
from rlopt_cli.training.checkpoint import has_weights, load_trainer_state, resolve_checkpoint, save_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
# each paper recipe's model -> the tiny random stand-in of its architecture (tests/tiny_hf.py)
RECIPE_ARCHS = {
    "models/Qwen2.5-0.5B-Instruct": "qwen2",
    "models/Qwen3-1.7B": "qwen3",
    "models/Qwen3-8B": "qwen3",
}


@pytest.mark.slow
def test_gsm8k_grpo_runs_end_to_end(tmp_path: Path, tiny_overrides: list[str]) -> None:
    pytest.importorskip("datasets")
    from rlopt_cli.training.loop import train
    from rlopt_cli.training.tracking import read_metrics

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


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes/paper").glob("*.toml")))
def test_paper_recipe_trains_with_its_own_flags(
    recipe: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recipe as written (gradient checkpointing, micro-batches, beta > 0, dapo, bf16 autocast, chat template),
    # except what a CPU test must change: a tiny random model of the recipe's architecture in a local folder,
    # the fixture data, the hf backend on CPU, 2 steps of 8 completions of up to 100 tokens. That is the issue's
    # crash: P + G x (L-1) > pack_max_tokens = 512, so each group shares its prompt through the KV cache.
    pytest.importorskip("datasets")
    import transformers.modeling_utils

    from rlopt_cli.algo import grpo
    from rlopt_cli.training import loop as trainer_module
    from rlopt_cli.training.tracking import read_metrics
    from tests.tiny_hf import reward_spread, save_tiny_model

    path = REPO / "recipes/paper" / recipe
    written = load_config(path, [])
    arch = RECIPE_ARCHS[written.model.name_or_path]  # a recipe on a new model needs its stand-in here
    if written.task.name == "math":
        pytest.importorskip("math_verify")
    folder = tmp_path_factory.getbasetemp() / f"tiny-{arch}"
    if not folder.exists():
        save_tiny_model(folder, arch)
    cfg = load_config(
        path,
        [
            f"model.name_or_path={folder}",
            f"task.train_file={FIXTURES / f'{written.task.name}_train.jsonl'}",
            f"task.eval_file={FIXTURES / f'{written.task.name}_test.jsonl'}",
            "task.n_eval=4",
            "grpo.batch_size=8",
            "grpo.micro_batch_size=4",  # two micro-batches of one whole group each
            "grpo.max_completion_length=100",
            "train.steps=2",
            "train.device=cpu",
            "rollout.backend=hf",
            "rollout.vllm_sleep_mode=false",
            "log.wandb=false",
            "log.progress=false",
        ],
    )
    assert cfg.model.gradient_checkpointing and cfg.grpo.beta > 0 and cfg.train.precision == "bf16-autocast"
    assert cfg.grpo.micro_batch_size < cfg.grpo.batch_size and cfg.task.chat_template

    reward_spread(monkeypatch)
    calls: list[str] = []  # what ran: the two log-prob routes, and each checkpointed layer call

    def counted(name: str, f: Any) -> Any:
        return lambda *a, **k: (calls.append(name), f(*a, **k))[1]

    for route in ("shared_prompt_hidden", "packed_group_hidden"):
        monkeypatch.setattr(grpo, route, counted(route, getattr(grpo, route)))
    # rlopt enables checkpointing with functools.partial(transformers.modeling_utils.checkpoint, ...)
    checkpoint = counted("checkpoint", transformers.modeling_utils.checkpoint)
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", checkpoint)

    run_dir = trainer_module.train(cfg, tmp_path_factory.mktemp("runs"), say=lambda *_: None)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    # 2 steps x 2 micro-batches x (policy, reference), with checkpointed layers. A micro-batch is trimmed to its
    # own longest completion first: one whose group then fits pack_max_tokens is packed (one forward), the
    # others share their prompt through the KV cache (two forwards).
    routes = [c for c in calls if c != "checkpoint"]
    assert len(routes) == 8 and "shared_prompt_hidden" in routes
    policy = routes[2:4] + routes[6:8]  # each step: the reference's two passes (no grad), then the policy's
    forwards = sum(2 if r == "shared_prompt_hidden" else 1 for r in policy)
    assert calls.count("checkpoint") == forwards * 2  # only passes with gradients checkpoint; x 2 layers
    assert all(r["train/completion_len"] > 50 for r in rows[1:])  # random models rarely stop: long groups
    assert all(math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 for r in rows[1:])
    assert rows[1]["train/kl"] == 0 and rows[2]["train/kl"] > 0  # the policy left the reference after step 1
    assert rows[2]["sparsity/bitwise_frac"] > 0  # the weights moved
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


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
