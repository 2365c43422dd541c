"""The memory plan's arithmetic: parameter counts against the published ones and against real (tiny) models,
and `rlopt plan` on the paper's recipes. Its byte counts are validated against measured peaks by
benchmarks/bench_memory_plan.py (too slow for a unit test)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rlopt_cli.cli import app
from rlopt_cli.config.recipes import load_config
from rlopt_cli.training.memory_plan import GIB, GPUS, KNOWN_SHAPES, plan, resolve_shape, shape_from_config
from tests.tiny_hf import ARCHS, tiny_model

runner = CliRunner()
PAPER = "recipes/paper/qwen3_1p7b_math_grpo_{}.toml"


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("qwen2.5-0.5b", 494_032_768),  # Qwen2.5-0.5B's model card: 0.49B
        ("qwen3-1.7b", 1_720_574_976),  # 1.7B, 1.4B of them outside the (tied) embedding
        ("qwen3-8b", 8_190_735_360),  # 8.2B, untied
        ("smollm2-135m", 134_515_008),
    ],
)
def test_known_shapes_count_the_published_parameters(name: str, published: int) -> None:
    assert KNOWN_SHAPES[name].params == published


@pytest.mark.parametrize("arch", ARCHS)
def test_a_config_json_gives_the_model_s_own_parameter_count(arch: str) -> None:
    model = tiny_model(arch)
    shape = shape_from_config(model.config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.tied and shape.qk_norm == (arch == "qwen3")


def test_hub_ids_and_folders_without_config_resolve_by_name() -> None:
    assert resolve_shape("models/Qwen3-1.7B") == KNOWN_SHAPES["qwen3-1.7b"]
    assert resolve_shape("Qwen/Qwen2.5-0.5B-Instruct") == KNOWN_SHAPES["qwen2.5-0.5b"]


def test_the_paper_setting_fits_one_80gb_card_and_did_not_before() -> None:
    for optimizer in ("sgd", "adamw"):
        cfg = load_config(PAPER.format(optimizer))
        after = plan(cfg, resolve_shape(cfg.model.name_or_path), optimizer, GPUS["h100-80gb"], 512)
        assert after.fits, after.phases
        # the same run with the whole micro-batch's logits: 8 x 3,072 positions x 151,936 x 14 B = 49 GiB, and
        # AdamW no longer fits (the reading: ~70 GiB with SGD, ~83 GiB with AdamW)
        whole = load_config(PAPER.format(optimizer), ["grpo.logprob_chunk_tokens=0"])
        before = plan(whole, resolve_shape(cfg.model.name_or_path), optimizer, GPUS["h100-80gb"], 512)
        assert before.items["log-prob pass"] > 45 * GIB
        assert before.fits == (optimizer == "sgd")


def test_rlopt_plan_prints_both_optimizers_and_refuses_bad_input() -> None:
    result = runner.invoke(app, ["plan", PAPER.format("sgd"), "--gpu", "a100-80gb"])
    assert result.exit_code == 0, result.output
    for line in ("log-prob pass", "vLLM KV cache", "sgd: fits", "adamw: fits"):
        assert line in result.output
    small = runner.invoke(app, ["plan", PAPER.format("adamw"), "--gpu", "rtx4090-24gb"])
    assert small.exit_code == 0 and "adamw: does NOT fit" in small.output
    bad = runner.invoke(app, ["plan", PAPER.format("sgd"), "--gpu", "h100"])
    assert bad.exit_code == 2 and "h100-80gb" in bad.output
    unknown = runner.invoke(app, ["plan", PAPER.format("sgd"), "--set", "model.name_or_path=org/Mystery-9B"])
    assert unknown.exit_code == 2 and "known" in unknown.output


def test_sharding_splits_the_states_and_adds_fsdps_buffers() -> None:
    cfg = load_config(PAPER.format("adamw"), ["model.name_or_path=Qwen/Qwen3-8B"])
    shape = resolve_shape(cfg.model.name_or_path)
    one, four = (plan(cfg, shape, "adamw", GPUS["h100-80gb"], 512, n) for n in (1, 4))
    for key in ("weights (fp32 master)", "gradients (fp32)", "optimizer state", "reference model"):
        assert four.items[key] == pytest.approx(one.items[key] / 4, rel=1e-6)  # shards, padded to equal sizes
    for key in (
        "activations",
        "log-prob pass",
        "vLLM weights",
    ):  # per rank: its own micro-batch, its own engine
        assert four.items[key] == one.items[key]
    assert one.items["FSDP gathered + unreduced"] == 0
    # the gathered embedding (bf16) and two blocks, and the embedding's unreduced fp32 gradient
    embedding = shape.vocab * shape.hidden
    assert four.items["FSDP gathered + unreduced"] > 6 * embedding
    assert not one.fits and four.fits  # the 8B setting needs several cards; 4 hold it with AdamW


def test_rlopt_plan_shards_and_tabulates_gpu_counts() -> None:
    result = runner.invoke(app, ["plan", PAPER.format("adamw"), "--nproc", "4"])
    assert result.exit_code == 0, result.output
    assert "sharded over 4 GPUs" in result.output and "FSDP gathered + unreduced" in result.output
    rows = [line.split() for line in result.output.splitlines() if line.strip().startswith("N = ")]
    assert [r[2] for r in rows] == ["1", "2", "4", "8"]
    peaks = [float(r[3].rstrip("*")) for r in rows]  # SGD's per-GPU peak falls as N grows
    assert peaks == sorted(peaks, reverse=True)
    bad = runner.invoke(app, ["plan", PAPER.format("sgd"), "--nproc", "0"])
    assert bad.exit_code == 2 and "--nproc 0 must be >= 1" in bad.output
