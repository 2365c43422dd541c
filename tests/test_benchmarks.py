"""Smoke tests of benchmarks/: the workers run and the reports print parseable verdict lines. No timing asserts.

The --quick modes start a fresh process per measurement (tens of seconds each on a busy 2-core box), so these
tests call the workers in-process on tiny settings instead; `make bench BENCH_ARGS=--quick` runs the real thing.
The TRL side is skipped where trl (the `bench` extra) is not installed, as in CI's `make test`. The real-model
mode (`--model`) runs on a tiny random Llama with a ChatML template (tests/tiny_hf.py), not on SmolLM2: a step
of the real model costs tens of seconds per side.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import bench_grpo_vs_trl as grpo_bench
from benchmarks import bench_optimizer_memory as memory_bench
from benchmarks import bench_sparsity
from benchmarks.common import RESULT_LINE, verdict


@pytest.mark.parametrize(
    ("line", "ok"),
    [
        ("grpo_speedup_vs_trl: 2.10x (0.1 / 0.05 s per step), >= 2x, PASS", True),
        ("optimizer_memory_adamw: 0.97 of expected (820 / 846 MB above sgd), >= 0.9, MISS", True),
        ("sparsity_peak_rss: 1.2x, target < 2x, FAIL", False),
        ("warming up the embedded model: 300 SFT steps", False),
    ],
)
def test_result_line_format(line: str, ok: bool) -> None:
    assert bool(RESULT_LINE.match(line)) is ok


def test_verdict_prints_a_parseable_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = verdict("x_ratio", "1.50x (3 / 2 s)", ">= 2x", False)
    assert line == "x_ratio: 1.50x (3 / 2 s), >= 2x, MISS"
    assert capsys.readouterr().out.strip() == line
    assert RESULT_LINE.match(line)


def test_memory_benchmark_reports_every_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    runs = {name: [memory_bench.one_step(name, "tiny")] for name in memory_bench.OPTIMIZERS}
    n = runs["sgd"][0]["n_params"]
    # rlopt's accounting: exactly the textbook state, plus AdamW's and RMSProp's per-tensor 'step' scalars
    assert runs["sgd"][0]["state_bytes"] == 0
    assert runs["sgd+momentum"][0]["state_bytes"] == 4 * n
    assert 8 * n <= runs["adamw"][0]["state_bytes"] < 8 * n + 1024
    assert 4 * n <= runs["rmsprop"][0]["state_bytes"] < 4 * n + 1024
    lines = memory_bench.report(runs)  # in one process the RSS deltas mean nothing: only the shape is checked
    assert [RESULT_LINE.match(line)["name"] for line in lines] == [  # type: ignore[index]
        "optimizer_memory_adamw",
        "optimizer_memory_sgd_momentum",
        "optimizer_memory_rmsprop",
    ]
    assert "state_bytes" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cold_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return grpo_bench.prepare_model(tmp_path_factory.mktemp("bench") / "model", cold=True)


def worker_args(model: Path, out: Path, side: str) -> object:
    return grpo_bench.parse_args(
        ["--worker", side, "--model-dir", str(model), "--out", str(out), "--steps", "2", "--warmup", "1"]
    )


@pytest.mark.parametrize("side", ["rlopt", grpo_bench.ALL_ROWS])
def test_grpo_benchmark_rlopt_sides(cold_model: Path, tmp_path: Path, side: str) -> None:
    result = grpo_bench.run_rlopt(worker_args(cold_model, tmp_path, side))  # type: ignore[arg-type]
    assert len(result["step_s"]) == len(result["cpu_s"]) == 2
    assert all(t > 0 for t in result["step_s"] + result["cpu_s"])
    assert len(result["phases"]) == 2
    assert all(row["generate"] > 0 for row in result["phases"])
    if side == grpo_bench.ALL_ROWS:  # the default side skips the random model's all-zero-reward groups
        assert all(row["forward"] > 0 and row["backward"] > 0 for row in result["phases"])
    run = next(tmp_path.glob("*/config.toml")).read_text()
    assert f"skip_zero_advantage = {'false' if side == grpo_bench.ALL_ROWS else 'true'}" in run


def test_grpo_benchmark_trl_side_and_report(cold_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="trl is the bench extra: pip install -e '.[bench]'")
    trl = grpo_bench.run_trl(worker_args(cold_model, tmp_path / "trl", "trl"))  # type: ignore[arg-type]
    assert len(trl["step_s"]) == len(trl["cpu_s"]) == 2
    assert len(trl["phases"]) == len(trl["completion_len"]) == 2
    assert all(row["generate"] > 0 and row["forward"] > 0 and row["backward"] > 0 for row in trl["phases"])
    phase = dict.fromkeys(("generate", "forward", "backward", "step", "other"), 0.02)
    rlopt = {
        "step_s": [0.1, 0.1],
        "cpu_s": [0.1, 0.1],
        "phases": [phase, phase],
        "completion_len": [3.0, 3.0],
        "reward_mean": 0.0,
        "peak_rss": 1,
    }
    lines = grpo_bench.report({"trl": [trl], grpo_bench.ALL_ROWS: [rlopt], "rlopt": [rlopt]})
    assert [RESULT_LINE.match(line)["name"] for line in lines] == [  # type: ignore[index]
        "grpo_speedup_vs_trl",
        "grpo_cpu_speedup_vs_trl",
    ]


@pytest.mark.parametrize(("dtype", "as_int"), [("bf16", torch.int16), ("fp32", torch.int32)])
def test_sparsity_benchmark_pair_moves_one_ulp(tmp_path: Path, dtype: str, as_int: torch.dtype) -> None:
    from safetensors.torch import load_file

    a_file, b_file = tmp_path / "A.safetensors", tmp_path / "B.safetensors"
    largest = bench_sparsity.write_pair(a_file, b_file, 4e6, dtype)
    a, b = load_file(a_file), load_file(b_file)
    assert largest == max(t.numel() * t.element_size() for t in a.values())
    embed = "model.embed_tokens.weight"  # tensor 0: about 10% of its coordinates moved
    assert a[embed].dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    steps = b[embed].view(as_int).long() - a[embed].view(as_int).long()
    assert set(steps.unique().tolist()) == {0, 1}  # one ULP or nothing
    assert 0.09 < float((steps == 1).float().mean()) < 0.11


def test_grpo_benchmark_defaults_per_model() -> None:
    embedded = grpo_bench.parse_args([])
    real = grpo_bench.parse_args(["--model", "asset:smollm2-135m-instruct"])
    assert (embedded.max_new_tokens, embedded.temperature, embedded.lr, embedded.steps) == (6, 1.0, 0.003, 30)
    assert (real.max_new_tokens, real.temperature, real.lr, real.steps) == (128, 0.7, 0.001, 5)
    assert not real.cold  # a real model is loaded as it is
    assert grpo_bench.task_flags(embedded) == {"task.chat_template": False}
    assert grpo_bench.task_flags(real)["task.prompt_style"] == "instruct"


def test_grpo_benchmark_trl_reward_reads_conversational_completions() -> None:
    args = grpo_bench.parse_args(["--model", "some/folder"])
    rewards: list[float] = []
    lengths: list[float] = []
    reward = grpo_bench.trl_reward(args, rewards, lengths)
    completions = [
        [{"role": "assistant", "content": "47 + 38 = 85"}],
        [{"role": "assistant", "content": "85?"}],
    ]
    assert reward(completions, ["85", "84"], completion_ids=[[1, 2, 3], [4]]) == [1.0, 0.0]
    assert (rewards, lengths) == ([0.5], [2.0])


@pytest.mark.parametrize("side", ["trl", "rlopt"])
def test_grpo_benchmark_real_model_mode(tmp_path: Path, side: str) -> None:
    """The real-model mode on a tiny random Llama with a ChatML template: instruct prompts through the chat
    template on both sides (the TRL worker refuses prompt ids that differ from rlopt's), phases filed per step."""
    from tests.tiny_hf import byte_tokenizer, save_tiny_model

    if side == "trl":
        pytest.importorskip("trl", reason="trl is the bench extra: pip install -e '.[bench]'")
    folder = save_tiny_model(tmp_path / "model", "llama")
    args = grpo_bench.parse_args(
        [
            *("--worker", side, "--model", str(folder), "--model-dir", str(folder)),
            *("--out", str(tmp_path / "out"), "--steps", "1", "--warmup", "1", "--max-new-tokens", "4"),
        ]
    )
    ours, theirs = grpo_bench.chat_prompt_ids(
        byte_tokenizer(), ["Compute 47+38. Reply with just the result."]
    )
    assert ours == theirs and len(ours[0]) > 40  # the template's tokens and the instruct wording
    result = grpo_bench.run_trl(args) if side == "trl" else grpo_bench.run_rlopt(args)
    assert len(result["step_s"]) == len(result["phases"]) == len(result["completion_len"]) == 1
    assert 1 <= result["completion_len"][0] <= 4 and result["phases"][0]["generate"] > 0
    if side == "rlopt":
        run = next((tmp_path / "out").glob("*/config.toml")).read_text()
        assert 'prompt_style = "instruct"' in run and "chat_template = true" in run
