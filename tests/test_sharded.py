"""One run across several processes (FSDP2 under torchrun, gloo on CPU) against the one-process run.

The equality test launches `rlopt train --nproc 2` as a user does (a subprocess that starts torchrun), kills it
after a step (both ranks, `RLOPT_TEST_KILL_AT`), resumes it once on 2 processes and once, from a copy of the
killed folder, in 1 process, and compares both with an uninterrupted 1-process run with the same config.

What must be equal, and why only some of it bit for bit: the completions are drawn per prompt
(`rollout.seed_scope = "prompt"`), so they, the rewards, the completion lengths and the eval accuracy are the
same exactly. The gradient is the same sum taken in another order (each rank's share of the global loss, then
FSDP's reduce-scatter), so losses and gradient norms agree to fp32 rounding (measured over the three resumed
runs: losses within 3e-8 absolute, 2.6e-6 relative; gradient norms within 1.6e-7 relative), and the bf16-saved
weights almost always round alike (measured: all of them, at steps 2 and 4).

SFT sharded the same way (each rank its share of the examples, the NLL over the global token count) is tested
against the same tolerances, and its 2-process run is the one killed on one rank only (rank 1, inside a DCP save).
Measured, 2 processes against 1, 4 steps, SGD with momentum: with one 4-example micro-batch per rank (the test),
every micro-batch is the same forward as in one process, so the losses are equal to the bit and the gradient norms
within 6.1e-8 relative; with whole per-rank batches (`sft.micro_batch_size = 0`, each rank padded to its own
widths) losses within 1.4e-7 and gradient norms within 1.9e-7 relative. Eval accuracy equal, every bf16 weight
equal at steps 2 and 4, in both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rlopt_cli.cli import app
from rlopt_cli.config.recipes import load_config
from rlopt_cli.runtime.kill_points import ENV
from rlopt_cli.training import loop as trainer
from rlopt_cli.training.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
# SGD with momentum: optimizer state that a resume must restore, and a step linear in the gradient. AdamW divides
# by sqrt(v), which blows fp32 summation-order noise on near-zero gradient coordinates up to visible steps
# (measured with AdamW lr 1e-3: grad norms 1.1e-5 apart by step 4).
SHARDED = [
    "rollout.seed_scope='prompt'",
    "optimizer.momentum=0.9",
    "grpo.micro_batch_size=4",  # one process: 2 micro-batches; two: one per rank
    "grpo.num_iterations=2",  # the frozen log-prob pass of the sampling policy too
    "train.steps=4",
    "train.run_name=run",
]
EXACT = (
    "train/reward_mean",
    "train/reward_std",
    "train/frac_reward_zero_std",
    "train/completion_len",
    "train/truncated_frac",
    "eval/accuracy",
)


def quiet(message: str) -> None:
    pass


def launch(overrides: list[str], out: Path, nproc: int, kill_at: str = "") -> subprocess.CompletedProcess:
    """`rlopt train --nproc N` as a user runs it, in a fresh interpreter; one intra-op thread per process."""
    args = [a for o in overrides for a in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if k != ENV} | ({ENV: kill_at} if kill_at else {})
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rlopt_cli.cli", "train", "--nproc", str(nproc), "--out", str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def assert_same_run(one: Path, other: Path, steps: int = 4) -> None:
    """Run `other` (sharded) is run `one` (one process): exact rollout metrics, losses and gradient norms to fp32
    rounding (the module docstring's tolerances), the last checkpoint's bf16 weights, the summaries."""
    a, b = read_metrics(one), read_metrics(other)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(steps + 1))
    for ra, rb in zip(a, b, strict=True):
        for key in EXACT:
            assert ra.get(key) == rb.get(key), (ra["step"], key)
        if ra["step"] > 0:
            assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5, abs=1e-7)
            assert rb["train/grad_norm"] == pytest.approx(ra["train/grad_norm"], rel=1e-5)
    last = f"checkpoints/step-{steps:06d}/model.safetensors"
    x, y = load_file(one / last), load_file(other / last)
    assert x.keys() == y.keys()
    equal = sum(int((x[k].view(torch.int16) == y[k].view(torch.int16)).sum()) for k in x)
    assert equal / sum(v.numel() for v in x.values()) > 0.999
    summaries = [json.loads((run / "summary.json").read_text()) for run in (one, other)]
    for key in ("steps", "n_params", "state_bytes", "state_bytes_by_key", "final_accuracy"):
        assert summaries[0][key] == summaries[1][key], key  # the whole run's optimizer state, not a shard's


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_on_any_count(tmp_path: Path, tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, *SHARDED]
    cfg = load_config(None, overrides)
    one = trainer.train(cfg, tmp_path / "one", quiet)  # also warms the session's cache for the ranks

    killed = launch(overrides, tmp_path / "two", 2, kill_at="step-3")  # both ranks, after step 3 is logged
    assert killed.returncode != 0
    two = tmp_path / "two" / "run"
    assert not (two / "summary.json").exists()
    ckpt = two / "checkpoints/step-000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["format"] == "dcp" and state["world_size"] == 2
    assert len(list((ckpt / "trainer_state").glob("*.distcp"))) == 2  # one shard file per rank
    shutil.copytree(tmp_path / "two", tmp_path / "two-then-one")
    shutil.copytree(tmp_path / "one", tmp_path / "one-then-two")  # as if killed after its step-2 checkpoint
    (tmp_path / "one-then-two/run/summary.json").unlink()
    shutil.rmtree(tmp_path / "one-then-two/run/checkpoints/step-000004")

    resumed = launch(overrides, tmp_path / "two", 2)  # 2 processes from DCP shards
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(one, two)
    assert json.loads((two / "meta.json").read_text())["world_size"] == 2
    for row in read_metrics(two)[1:]:  # each rank holds its half of the momentum, give or take a row
        total, per_rank = row["optim/state_bytes"], row["optim/state_bytes_rank_max"]
        assert total / 2 <= per_rank < 0.55 * total
    # the paper study's analysis reads the sharded trainer state as it reads the one-process one
    from rlopt_cli.study.paper_analysis import weight_update

    whole, sharded = weight_update(one), weight_update(two)
    assert sharded.n == whole.n > 0
    assert sharded.update_l2 == pytest.approx(whole.update_l2, rel=1e-5) and whole.update_l2 > 0
    assert sharded.changed_bf16 == pytest.approx(whole.changed_bf16, abs=1e-3)
    # 1 process from the 2 processes' DCP shards, and 2 processes from a 1-process checkpoint
    assert_same_run(one, trainer.train(cfg, tmp_path / "two-then-one", quiet))
    resumed = launch(overrides, tmp_path / "one-then-two", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(one, tmp_path / "one-then-two/run")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(two / "checkpoints/step-000004")  # a plain HF folder
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_two_processes_with_a_sharded_kl_reference_equal_one(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """beta > 0: the frozen reference is sharded in the policy's units; its no-grad pass and the k3 KL are the
    one-process ones up to float summation order."""
    overrides = [*tiny_overrides, *SHARDED, "grpo.beta=0.04"]
    one = trainer.train(load_config(None, overrides), tmp_path / "one", quiet)
    run = launch(overrides, tmp_path / "two", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(one, tmp_path / "two" / "run")
    a, b = read_metrics(one), read_metrics(tmp_path / "two" / "run")
    kls = [(ra["train/kl"], rb["train/kl"]) for ra, rb in zip(a[1:], b[1:], strict=True)]
    assert max(k for k, _ in kls) > 0  # the policy moves away from its reference
    for k1, k2 in kls:
        assert k2 == pytest.approx(k1, rel=1e-4, abs=1e-9)


SFT = [
    "train.objective='sft'",
    "sft.batch_size=8",
    "sft.micro_batch_size=4",  # one process: 2 micro-batches; two: one per rank
    "optimizer.momentum=0.9",
    "train.steps=4",
    "train.run_name=run",
]


@pytest.mark.slow
def test_sft_on_two_processes_equals_one_and_resumes_after_one_rank_is_killed(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """Rank 1 alone is kill -9ed inside checkpoint 4's DCP save, its shard written, while rank 0 waits there for
    it: torchrun tears rank 0 down, the run exits in one line, checkpoint 4 stays a .tmp folder that no resume
    reads, and the rerun resumes from checkpoint 2 to the uninterrupted one-process run."""
    overrides = [*tiny_overrides, *SFT]
    one = trainer.train(load_config(None, overrides), tmp_path / "one", quiet)

    killed = launch(overrides, tmp_path / "two", 2, kill_at="shard-4@rank1")
    assert killed.returncode == 2, killed.stderr[-3000:]
    assert killed.stderr.splitlines()[-1] == (
        "error: a rank of the 2-process run failed (torchrun exit 1); see its error above"
    )
    two = tmp_path / "two" / "run"
    ckpts = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert ckpts == ["step-000000", "step-000002", "step-000004.tmp"]  # 4 never renamed: not whole
    half = two / "checkpoints/step-000004.tmp"
    # rank 1's shard is written (rank 0's too, unless torchrun's SIGTERM beat its write), and yet:
    assert (half / "trainer_state/__1_0.distcp").is_file()
    assert not (half / "trainer_state/.metadata").exists() and not (half / "trainer_state.json").exists()
    assert [r["step"] for r in read_metrics(two)] == [0, 1, 2, 3, 4]  # rank 0 logged step 4 before the save
    assert not (two / "summary.json").exists()

    resumed = launch(overrides, tmp_path / "two", 2)  # the lock died with rank 0: the rerun takes the folder
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming run from step 2" in resumed.stderr
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "step-000000",
        "step-000002",
        "step-000004",
    ]
    assert_same_run(one, two)


def assert_prompt_seeded(backend: Any) -> None:
    """With `prompt_seeds`, a prompt's completions depend on its seed only, not on the batch around it (a
    sharded run's ranks each sample their share and must draw what one process draws for the whole batch)."""
    prompts, seeds = ["1+2=", "7+8=", "9+9=", "3+4="], [11, 12, 13, 14]

    def draw(ps: list[str], ss: list[int]) -> list[str]:
        return backend.generate(ps, 4, 6, 1.0, seed=0, prompt_seeds=ss).texts

    whole = draw(prompts, seeds)
    assert draw(prompts[:2], seeds[:2]) + draw(prompts[2:], seeds[2:]) == whole  # split as over 2 processes
    assert draw(prompts[::-1], seeds[::-1]) == [t for i in (3, 2, 1, 0) for t in whole[4 * i : 4 * i + 4]]
    assert len(set(whole)) > 4  # the draws are random, not all alike
    assert draw(prompts, [s + 100 for s in seeds]) != whole


def test_prompt_seed_scope_ignores_the_batch_around_a_prompt(tiny_overrides: list[str]) -> None:
    from rlopt_cli.models.loading import load_policy
    from rlopt_cli.rollout.hf import HFBackend

    cfg = load_config(None, [*tiny_overrides, "model.warmup_steps=0"])  # random init: varied completions
    model, tokenizer = load_policy(cfg, torch.device("cpu"), None)
    assert_prompt_seeded(HFBackend(model, tokenizer))


@pytest.mark.parametrize(
    ("uniform", "token"),
    [(0.0, 0), (0.1, 0), (0.25, 1), (0.6, 1), (0.75, 3), (0.999, 3)],
)
def test_inverse_cdf_picks_the_interval_holding_the_uniform(uniform: float, token: int) -> None:
    from rlopt_cli.rollout.hf import inverse_cdf

    probs = torch.tensor([[0.25, 0.5, 0.0, 0.25]])  # CDF 0.25, 0.75, 0.75, 1: token 2 can never be drawn
    assert inverse_cdf(probs, torch.tensor([uniform])).tolist() == [token]


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


PROMPT = ["--set", "rollout.seed_scope='prompt'"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "2"], "needs rollout.seed_scope='prompt'"),
        (["--nproc", "3", *PROMPT], "--nproc 3 must divide the prompts per step (grpo.batch_size"),
        (["--nproc", "2", "--set", "rollout.backend='vllm'"], "needs rollout.seed_scope='prompt'"),
        (["--nproc", "0"], "--nproc = 0 must be >= 1"),
        (
            ["--nproc", "2", *PROMPT, "--set", "grpo.beta=0.04", "--set", "grpo.ref_offload=true"],
            "grpo.ref_offload moves a whole reference model",
        ),
        (["--nproc", "2", *PROMPT, "--set", "grpo.micro_batch_tokens=64"], "use grpo.micro_batch_size with"),
        (
            ["--nproc", "3", "--objective", "sft"],
            "--nproc 3 must divide the examples per step (sft.batch_size",
        ),
        (
            ["--nproc", "2", "--objective", "sft", "--set", "sft.micro_batch_size=64"],
            "sft.micro_batch_size = 64 must divide each process's 32 examples",
        ),
        (
            ["--nproc", "2", "--objective", "sft", "--set", "rollout.backend='vllm'"],
            "a sharded SFT run evaluates with rollout.backend='hf'",
        ),
        (
            ["--set", "rollout.backend='vllm'", "--set", "rollout.vllm_request_seeds=false", *PROMPT],
            "it needs rollout.vllm_request_seeds = true",
        ),
    ],
)
def test_sharded_bad_input_fails_before_any_process_starts(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = runner.invoke(app, ["train", "--out", str(tmp_path), *args])
    assert message in one_line_error(result)
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for more GPUs than this host has none of")
def test_more_processes_than_gpus(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train", "--out", str(tmp_path), "--nproc", "2", *PROMPT, "--set", "train.device='cuda'"]
    )
    assert "--nproc 2 but this host has 0 CUDA devices" in one_line_error(result)


def test_vllm_per_rank_refuses_several_machines(tiny_overrides: list[str]) -> None:
    from rlopt_cli.errors import RloptError
    from rlopt_cli.training.sharding import check_sharded

    cfg = load_config(None, [*tiny_overrides, "rollout.backend=vllm", "rollout.seed_scope='prompt'"])
    check_sharded(cfg, 2, per_host=2)  # one machine: taken
    with pytest.raises(RloptError, match="runs sharded on one machine only"):
        check_sharded(cfg, 2, per_host=1)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_8b_recipes_pass_the_sharded_checks(optimizer: str) -> None:
    """The paper's 8B recipes carry its flags (vLLM rollouts in sleep mode, a KL term): `--nproc 4` takes them,
    one vLLM engine per rank; on a host without 4 GPUs only the device count stops them."""
    from rlopt_cli.errors import RloptError
    from rlopt_cli.training.sharding import check_sharded

    cfg = load_config(f"recipes/paper/qwen3_8b_math_grpo_{optimizer}.toml", [])
    assert cfg.rollout.backend == "vllm" and cfg.rollout.vllm_sleep_mode and cfg.grpo.beta > 0
    if torch.cuda.device_count() >= 4:
        check_sharded(cfg, 4)
    else:
        with pytest.raises(RloptError, match="--nproc 4 but this host has"):
            check_sharded(cfg, 4)
    check_sharded(replace(cfg, train=replace(cfg.train, device="cpu")), 4)  # every other check passes
