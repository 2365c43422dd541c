"""A tiny end-to-end run of the real trainer: run-folder files, metric keys, changed parameters, a checkpoint
that transformers loads, exact resume, and seeded determinism.

Every assertion here must hold on any trajectory (`make test` reruns these tests on other CPU kernels): a test
that needs a learning signal forces one (`forced_rewards`: every group's rewards vary by construction) instead
of hoping the sampled completions score unevenly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlopt_cli.config.recipes import load_config
from rlopt_cli.training import loop as trainer
from rlopt_cli.training.tracking import read_metrics
from tests.conftest import first_of_each

pytestmark = [pytest.mark.slow, pytest.mark.trajectory]

CHECKPOINT_FILES = {
    "config.json",
    "model.safetensors",
    "rlopt.toml",
    "tokenizer.json",
    "tokenizer_config.json",
    "trainer_state.json",
    "trainer_state.safetensors",
}
STEP_KEYS = {
    "train/reward_mean",
    "train/reward_std",
    "train/loss",
    "train/kl",
    "train/clip_frac",
    "train/completion_len",
    "train/grad_norm",
    "optim/lr",
    "optim/state_bytes",
    "time/step_s",
    "mem/peak_bytes",
}
EVAL_KEYS = {"eval/accuracy", "sparsity/bitwise_frac", "sparsity/atol_frac"}


class SimulatedCrash(Exception):
    pass


def quiet(message: str) -> None:
    pass


def tiny(tiny_overrides: list[str], *extra: str):
    return load_config(None, [*tiny_overrides, "train.steps=4", *extra])


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]


def test_run_folder_metrics_and_checkpoints(
    tmp_path: Path, tiny_overrides: list[str], forced_rewards
) -> None:
    forced_rewards(first_of_each(4))  # every step has a gradient, so every parameter must move
    cfg = tiny(tiny_overrides, "optimizer.name='adamw'", "optimizer.lr=1e-3")
    run = trainer.train(cfg, tmp_path, quiet)
    assert run == tmp_path / "arithmetic__grpo__adamw__lr0.001__s0"
    assert {p.name for p in run.iterdir()} == {
        ".lock",  # the owner's pid; the OS lock on it went with the process
        "config.toml",
        "meta.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints",
    }
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-000000", "step-000002", "step-000004"]
    for step in steps:
        assert CHECKPOINT_FILES <= {p.name for p in (run / "checkpoints" / step).iterdir()}

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows[1:]:
        assert STEP_KEYS <= row.keys()
        assert row["optim/state_bytes"] > 8 * 1_000  # AdamW holds two fp32 moments
    for row in (rows[0], rows[2], rows[4]):
        assert EVAL_KEYS <= row.keys()
    assert rows[0]["sparsity/bitwise_frac"] == 0.0

    summary = json.loads((run / "summary.json").read_text())
    n = summary["n_params"]
    assert summary["state_bytes_by_key"]["exp_avg"] == 4 * n
    assert summary["state_bytes_by_key"]["exp_avg_sq"] == 4 * n
    assert summary["steps"] == 4 and summary["final_accuracy"] == rows[4]["eval/accuracy"]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["finished"] and meta["sessions"][0]["versions"]["torch"]

    # every parameter tensor moved (fp32 master weights), as TRL's tiny training test asserts
    start = load_file(run / "checkpoints/step-000000/trainer_state.safetensors")
    end = load_file(run / "checkpoints/step-000004/trainer_state.safetensors")
    masters = [k for k in start if k.startswith("master.")]
    assert (
        len(masters) == 2 * 12 + 3
    )  # per layer q,k,v (+biases), o, gate, up, down, 2 norms; embed, norm, head
    unchanged = [k for k in masters if torch.equal(start[k], end[k])]
    assert not unchanged

    # the checkpoint is a plain Hugging Face folder, saved in bf16
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = run / "checkpoints/step-000004"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert load_file(ckpt / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    prompts = ["1+2=", "7+8=", "9+9="]
    out = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=4, do_sample=False)
    theirs = tok.batch_decode(out[:, 5:], skip_special_tokens=True)  # [BOS] d + d = is 5 tokens
    from rlopt_cli.rollout.hf import HFBackend

    ours = HFBackend(model, tok).generate(prompts, 1, 4, 0.0, seed=0).texts
    assert ours == theirs  # our batched KV-cache greedy decoding agrees with transformers' generate


def test_rerunning_a_finished_run_does_nothing(tmp_path: Path, tiny_overrides: list[str]) -> None:
    cfg = tiny(tiny_overrides, "train.steps=2")
    run = trainer.train(cfg, tmp_path, quiet)
    before = (run / "metrics.jsonl").read_text()
    said: list[str] = []
    trainer.train(cfg, tmp_path, said.append)
    assert "already finished" in said[0]
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_does_exactly_the_remaining_steps(
    tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch, forced_rewards
) -> None:
    forced_rewards(
        first_of_each(4)
    )  # real updates at every step, so the resumed state has something to match
    cfg = tiny(tiny_overrides, "optimizer.name='adamw'", "optimizer.lr=1e-3")
    straight = trainer.train(cfg, tmp_path / "a", quiet)

    real_step = trainer.grpo_step
    calls: list[int] = []
    crash_at = [3]

    def counted_step(*args, **kwargs):
        step = args[-1]
        if step in crash_at:
            raise SimulatedCrash  # like a kill after the step-2 checkpoint
        calls.append(step)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "grpo_step", counted_step)
    with pytest.raises(SimulatedCrash):
        trainer.train(cfg, tmp_path / "b", quiet)
    assert calls == [1, 2]
    assert not (tmp_path / "b" / straight.name / "summary.json").exists()

    calls.clear()
    crash_at.clear()
    resumed = trainer.train(cfg, tmp_path / "b", quiet)
    assert calls == [3, 4]  # only the remaining steps
    a = load_file(straight / "checkpoints/step-000004/trainer_state.safetensors")
    b = load_file(resumed / "checkpoints/step-000004/trainer_state.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "rng.torch")
    assert deterministic(read_metrics(straight)) == deterministic(read_metrics(resumed))


def test_same_seed_same_metrics_other_seed_differs(
    tmp_path: Path, tiny_overrides: list[str], forced_rewards
) -> None:
    forced_rewards(
        first_of_each(4)
    )  # a gradient every step: the other seed's samples must give other updates
    first = trainer.train(tiny(tiny_overrides), tmp_path / "a", quiet)
    second = trainer.train(tiny(tiny_overrides), tmp_path / "b", quiet)
    other = trainer.train(tiny(tiny_overrides, "train.seed=1"), tmp_path / "c", quiet)
    assert deterministic(read_metrics(first)) == deterministic(read_metrics(second))
    assert deterministic(read_metrics(first)) != deterministic(read_metrics(other))


@pytest.mark.parametrize(
    "extra",
    [
        # random init: a warm model can sample 4 identical completions, whose forced advantages cancel exactly
        # (no gradient, so no KL), on some CPU kernels' trajectory; a random one samples distinct ones
        (
            "grpo.beta=0.04",
            "grpo.num_iterations=2",
            "grpo.micro_batch_size=4",
            "grpo.loss_type='grpo'",
            "model.warmup_steps=0",
        ),
        ("train.objective='sft'", "sft.batch_size=8", "optimizer.name='rmsprop'", "optimizer.lr=1e-4"),
        (
            "grpo.mask_truncated_completions=true",
            "grpo.scale_rewards='none'",
            "train.precision='bf16-autocast'",
        ),
    ],
    ids=["kl-iterations-micro", "sft-rmsprop", "masking-bf16"],
)
def test_other_modes_run(
    tmp_path: Path, tiny_overrides: list[str], extra: tuple[str, ...], forced_rewards
) -> None:
    forced_rewards(first_of_each(4))  # GRPO steps carry a gradient by construction
    run = trainer.train(tiny(tiny_overrides, "train.steps=2", *extra), tmp_path, quiet)
    rows = read_metrics(run)
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows[1:])
    assert all(r["train/grad_norm"] > 0 for r in rows[1:])
    if "grpo.beta=0.04" in extra:
        # step 1's first update starts at the reference; its second (num_iterations = 2) and step 2's see the
        # policy that the forced gradient moved away from it
        assert rows[1]["train/kl"] > 0 and rows[2]["train/kl"] > 0


def test_wandb_offline_holds_history_and_config(tmp_path: Path, tiny_overrides: list[str]) -> None:
    from tests.wandb_log import history_and_config

    cfg = tiny(tiny_overrides, "train.steps=2", "log.wandb=true")
    run = trainer.train(cfg, tmp_path, quiet)
    meta = json.loads((run / "meta.json").read_text())
    files = list((run / "wandb").glob(f"offline-run-*-{meta['wandb_id']}/run-{meta['wandb_id']}.wandb"))
    assert len(files) == 1
    history, config = history_and_config(files[0])
    logged = [h for h in history if "train/reward_mean" in h]
    assert len(logged) == 2
    assert [h["train/reward_mean"] for h in logged] == [r["train/reward_mean"] for r in read_metrics(run)[1:]]
    assert config["optimizer"]["name"] == "sgd" and config["grpo"]["num_generations"] == 4


def test_probe_reads_moments_without_changing_the_run(
    tmp_path: Path, tiny_overrides: list[str], forced_rewards
) -> None:
    forced_rewards(first_of_each(4))  # gradients at steps 1-3: AdamW's moments hold a history by step 3
    adamw = ("optimizer.name='adamw'", "optimizer.lr=1e-3")
    plain = trainer.train(tiny(tiny_overrides, *adamw), tmp_path / "a", quiet)
    probed = trainer.train(tiny(tiny_overrides, *adamw, "probe.steps=[1, 3]"), tmp_path / "b", quiet)
    rows = read_metrics(probed)
    without_probe = [{k: v for k, v in r.items() if not k.startswith("probe/")} for r in rows]
    assert deterministic(without_probe) == deterministic(read_metrics(plain))
    a = load_file(plain / "checkpoints/step-000004/trainer_state.safetensors")
    b = load_file(probed / "checkpoints/step-000004/trainer_state.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    step3 = json.loads((probed / "probe/step-000003.json").read_text())
    # the paper's recovery of m_{t-1} from m_t and g_t agrees with the snapshot taken before the step
    assert step3["cos_m_prev_g"] == pytest.approx(step3["cos_m_prev_g_snapshot"], abs=1e-4)
    assert -1 <= step3["cos_m_prev_g"] <= 1 and step3["history_ratio"] > 0 and step3["sqrt_v_std"] > 0
    assert sum(step3["hist_sqrt_v"]["counts"]) + step3["hist_sqrt_v"]["zeros"][0] == step3["n"]
    assert rows[3]["probe/cos_m_prev_g"] == step3["cos_m_prev_g"]
    # at the first step AdamW's m_0 is zero: the recovered m_{t-1} is ~0
    step1 = json.loads((probed / "probe/step-000001.json").read_text())
    assert step1["history_ratio"] < 1e-5


def test_warm_model_is_built_once_per_key(tiny_overrides: list[str]) -> None:
    from rlopt_cli.training.warmup import ensure_warm_model, warm_key

    cfg = tiny(tiny_overrides)
    first = ensure_warm_model(cfg, trainer.train, quiet)
    said: list[str] = []
    again = tiny(tiny_overrides, "log.progress=true", "train.seed=5")
    assert ensure_warm_model(again, trainer.train, said.append) == first
    assert said == []  # reused from the cache, not trained again
    assert warm_key(tiny(tiny_overrides, "task.digits=2")) != warm_key(cfg)
    summary = json.loads((first.parents[1] / "summary.json").read_text())
    assert summary["objective"] == "sft" and summary["optimizer"] == "adamw" and summary["steps"] == 100


# G = 2, rows 0-7 in groups of two. Half of the groups score (1, 0) and half (0, 0), so half are skipped at every
# step; in the second case every group scores alike after the first step, so every later step is all-skipped.
HALF_SKIPPED = lambda call, row: float(row % 4 == 0)  # noqa: E731
ALL_SKIPPED_AFTER_ONE = lambda call, row: float(call == 1 and row % 4 == 0)  # noqa: E731


@pytest.mark.parametrize(
    ("pattern", "all_skipped_steps"),
    [(HALF_SKIPPED, 0), (ALL_SKIPPED_AFTER_ONE, 3)],
    ids=["some-groups-skipped", "all-skipped-after-one"],
)
def test_skipping_and_sharing_do_not_change_the_run(
    tmp_path: Path, tiny_overrides: list[str], forced_rewards, pattern, all_skipped_steps: int
) -> None:
    # Zero-advantage groups skipped and prompts forwarded once per group, against every row forwarded on its
    # own: the same updates, with micro-batches and bnpo's per-micro-batch normaliser. SGD with momentum is
    # linear in the gradient, and its state must still advance on a step where every group was skipped.
    forced_rewards(pattern)
    extra = ("optimizer.name='sgd'", "optimizer.momentum=0.9", "optimizer.lr=0.05", "grpo.num_generations=2")
    extra += ("grpo.micro_batch_size=4", "grpo.loss_type='bnpo'")
    fast = trainer.train(tiny(tiny_overrides, *extra), tmp_path / "fast", quiet)
    off = ("grpo.skip_zero_advantage=false", "grpo.share_prompt_forward=false")
    full = trainer.train(tiny(tiny_overrides, *extra, *off), tmp_path / "full", quiet)
    fast_rows, full_rows = read_metrics(fast)[1:], read_metrics(full)[1:]
    assert fast_rows[0]["train/skipped_frac"] == 0.5
    assert sum(r["train/skipped_frac"] == 1.0 for r in fast_rows) == all_skipped_steps
    assert all(r["train/skipped_frac"] == 0 for r in full_rows)
    for a, b in zip(fast_rows, full_rows, strict=True):
        assert a["train/reward_mean"] == b["train/reward_mean"]
        for key in ("train/loss", "train/grad_norm", "train/clip_frac"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    a = load_file(fast / "checkpoints/step-000004/trainer_state.safetensors")
    b = load_file(full / "checkpoints/step-000004/trainer_state.safetensors")
    masters = [k for k in a if k.startswith("master.")]
    assert masters and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in masters)
    # momentum kept moving the weights through the all-skipped steps
    c = load_file(fast / "checkpoints/step-000002/trainer_state.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in masters)


@pytest.mark.parametrize("objective", ["grpo", "sft"])
def test_update_norm_is_the_step_sgd_takes(
    tmp_path: Path, tiny_overrides: list[str], objective: str, forced_rewards
) -> None:
    """Plain SGD moves the weights by lr x the clipped gradient: the logged step norm must say exactly that,
    clipped (at 0.1) and unclipped. A random-init model, so the forced groups' completions differ and carry
    a gradient; steps whose expected move is below 1e-3 are not compared (fp32 weights cannot resolve a step
    spread over 1M coordinates that small), and each case must compare at least one step."""
    forced_rewards(first_of_each(4))
    for lr, max_norm in ((1.0, 0.1), (0.1, 0.0)):
        cfg = tiny(
            tiny_overrides,
            "train.steps=2",
            f"train.objective={objective}",
            "model.warmup_steps=0",
            "optimizer.name=sgd",
            f"optimizer.lr={lr}",
            f"optimizer.max_grad_norm={max_norm}",
            "log.update_norm=true",
        )
        rows = read_metrics(trainer.train(cfg, tmp_path / f"clip{max_norm}", quiet))[1:]
        compared = 0
        for row in rows:
            taken = min(row["train/grad_norm"], max_norm) if max_norm > 0 else row["train/grad_norm"]
            if lr * taken >= 1e-3:
                assert row["train/update_norm"] == pytest.approx(lr * taken, rel=1e-3)
                compared += 1
        assert compared >= 1, rows
    off = read_metrics(trainer.train(tiny(tiny_overrides, "train.steps=1"), tmp_path / "off", quiet))
    assert "train/update_norm" not in off[1]
