"""GRPO step throughput: rlopt's trainer against TRL's `GRPOTrainer` on the same model, prompts and settings.

Both sides load one fp32 copy of the embedded model (rlopt's warm-up checkpoint, or its random init with
`--cold`), see the same prompts in the same order (rlopt's seeded `pick_examples`), and run 4 prompts x 8
generations, 6 new tokens at temperature 1, beta 0, loss "dapo", group-scaled advantages, a constant learning
rate, clipping at 1.0 and the same optimizer built by `rlopt_cli.optimizers.build_optimizer`. TRL runs on CPU
with no vLLM, no logging, no gradient checkpointing, fp32. Each side runs in its own fresh process; sides
alternate over `--rounds` so slow phases of the shared machine hit both. A third side, rlopt with
`grpo.skip_zero_advantage=false` (every row forwarded, as TRL does), shows how much of the speed-up comes from
skipping the groups whose rewards are all equal.

Seconds per optimizer step: rlopt's `time/step_s` (metrics.jsonl; generation, scoring, the forward/backward, clip
and step, without eval and checkpoints) and, for TRL, on_step_begin -> on_step_end of a `TrainerCallback` (the
same work, without TRL's logging), in wall seconds and in CPU seconds of the process (`time.process_time`). Both
verdicts use medians over the measured steps (after `--warmup` steps), because other processes share the CPU and
produce outliers; on a busy machine the CPU-seconds ratio is the steadier of the two (the work each side does),
the wall ratio is what a user waits for.

Run: `python -m benchmarks.bench_grpo_vs_trl [--quick]`. TRL is the `bench` extra (`pip install -e ".[bench]"`);
without it only rlopt is measured and the ratio is not reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, peak_rss_bytes, run_worker, verdict

TARGET_SPEEDUP = 2.0
PROMPTS_PER_STEP = 4
NUM_GENERATIONS = 8
MAX_NEW_TOKENS = 6
DEFAULT_LR = {"sgd": 0.003, "adamw": 3e-5}  # the demo's learning rates (README: measured at this size)
# rlopt with grpo.skip_zero_advantage off, so every row is forwarded as TRL does: how much of the speed-up is the
# skip (information only; the target is rlopt as it runs by default).
ALL_ROWS = "rlopt-all-rows"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="Smoke mode: random-init model, 2 + 5 steps, 1 round."
    )
    p.add_argument("--steps", type=int, default=None, help="Measured steps per side and round (default 30).")
    p.add_argument("--warmup", type=int, default=None, help="Unmeasured first steps per run (default 3).")
    p.add_argument("--rounds", type=int, default=None, help="Alternating runs of each side (default 2).")
    p.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default="sgd")
    p.add_argument(
        "--lr", type=float, default=None, help="Learning rate (default: the demo's for the optimizer)."
    )
    p.add_argument("--cold", action="store_true", help="Random-init model instead of the warm-up checkpoint.")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per side (default 1: on a shared 2-core box, 2 OpenMP threads that lose their cores "
        "to other processes spin at every barrier and make step times erratic; 0 = torch's default).",
    )
    p.add_argument("--no-trl", action="store_true", help="Measure rlopt only.")
    # worker mode (internal): run one side and print one JSON line
    p.add_argument("--worker", choices=("trl", ALL_ROWS, "rlopt"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (5 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    args.rounds = args.rounds or (1 if quick else 2)
    args.cold = args.cold or quick  # the quick mode must not pay for (or depend on) the warm-up
    args.lr = args.lr or DEFAULT_LR[args.optimizer]
    return args


def prepare_model(folder: Path, cold: bool) -> Path:
    """Save the embedded model (warm or random) and its tokenizer as one fp32 folder both sides load."""
    import torch

    from rlopt_cli.config.recipes import load_config
    from rlopt_cli.models.loading import build_char_tokenizer, build_embedded_model, load_pretrained

    cfg = load_config()
    if cold:
        tokenizer = build_char_tokenizer()
        model = build_embedded_model(cfg.model, len(tokenizer), tokenizer)
    else:
        from rlopt_cli.training.loop import train
        from rlopt_cli.training.warmup import ensure_warm_model

        model, tokenizer = load_pretrained(ensure_warm_model(cfg, train), torch.device("cpu"))
    model.float().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def step_examples(total_steps: int) -> list[Any]:
    """The prompts rlopt draws for steps 1..total_steps with train.seed 0, in order."""
    from rlopt_cli.config.recipes import load_config
    from rlopt_cli.tasks import build_task
    from rlopt_cli.training.loop import pick_examples

    task = build_task(load_config().task)
    return [e for s in range(1, total_steps + 1) for e in pick_examples(task.train, PROMPTS_PER_STEP, s, 0)]


# ---------------------------------------------------------------------------------------------------------------
# the two sides, each run in its own process


def run_rlopt(args: argparse.Namespace) -> dict[str, Any]:
    from rlopt_cli.config.recipes import load_config
    from rlopt_cli.training import loop as trainer
    from rlopt_cli.training.tracking import read_metrics

    total = args.warmup + args.steps
    flags = {
        "model.name_or_path": args.model,
        "task.chat_template": False,  # the embedded model's tokenizer has none (TRL's side prompts plain text too)
        "grpo.batch_size": PROMPTS_PER_STEP * NUM_GENERATIONS,
        "grpo.num_generations": NUM_GENERATIONS,
        "grpo.max_completion_length": MAX_NEW_TOKENS,
        "grpo.temperature": 1.0,
        "grpo.beta": 0.0,
        "grpo.loss_type": "dapo",
        "grpo.scale_rewards": "group",
        "optimizer.name": args.optimizer,
        "optimizer.lr": args.lr,
        "optimizer.max_grad_norm": 1.0,
        "optimizer.schedule": "constant",
        "train.steps": total,
        "train.seed": 0,
        "train.eval_every": 0,  # eval runs only before step 1 and after the last; neither is timed
        "train.checkpoint_every": 0,
        "train.device": "cpu",
        "train.run_name": "rlopt",
        "log.progress": False,
        "grpo.skip_zero_advantage": args.worker != ALL_ROWS,
    }
    # CPU seconds are not in metrics.jsonl: wrap the step function the loop calls (by its module-global name)
    cpu_s: list[float] = []
    grpo_step = trainer.grpo_step

    def timed_step(*a: Any, **kw: Any) -> dict[str, float]:
        c0 = time.process_time()
        row = grpo_step(*a, **kw)
        cpu_s.append(time.process_time() - c0)
        return row

    trainer.grpo_step = timed_step
    started = time.perf_counter()
    run_dir = trainer.train(load_config(None, None, flags), args.out, say=lambda *_: None)
    wall = time.perf_counter() - started
    rows = [r for r in read_metrics(run_dir) if r["step"] > args.warmup]
    return {
        "step_s": [r["time/step_s"] for r in rows],
        "cpu_s": cpu_s[args.warmup :],
        "reward_mean": statistics.fmean(r["train/reward_mean"] for r in rows),
        "wall_s": wall,
        "peak_rss": peak_rss_bytes(),
    }


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlopt_cli.algo.optimizers import build_optimizer
    from rlopt_cli.tasks import Example
    from rlopt_cli.tasks.arithmetic import verify

    total = args.warmup + args.steps
    examples = step_examples(total)
    dataset = Dataset.from_dict(
        {"prompt": [e.prompt for e in examples], "answer": [e.answer for e in examples]}
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    batch_rewards: list[float] = []

    def arithmetic_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        """rlopt's verifier as a TRL reward function (list in, list out)."""
        rewards = [
            verify(c, Example(prompt="", answer=a, solution=a))
            for c, a in zip(completions, answer, strict=True)
        ]
        batch_rewards.append(sum(rewards) / len(rewards))
        return rewards

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.cpu_s: list[float] = []

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.step_s.append(time.perf_counter() - self.t0)
            self.cpu_s.append(time.process_time() - self.c0)

    config = GRPOConfig(
        output_dir=str(Path(args.out) / "trl"),
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,  # completions per step
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=total,
        shuffle_dataset=False,  # rlopt's prompt order
        seed=0,
        use_cpu=True,
        use_vllm=False,
        bf16=False,  # TRL defaults to bf16; rlopt's comparison runs fp32
        gradient_checkpointing=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )
    optimizer = build_optimizer(model.parameters(), args.optimizer, args.lr, 0.0, {})
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=arithmetic_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
        optimizers=(optimizer, None),
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return {
        "step_s": timer.step_s[args.warmup :],
        "cpu_s": timer.cpu_s[args.warmup :],
        "reward_mean": statistics.fmean(batch_rewards[args.warmup :]),
        "wall_s": wall,
        "peak_rss": peak_rss_bytes(),
    }


# ---------------------------------------------------------------------------------------------------------------
# the side-by-side run


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.worker:
        emit(run_trl(args) if args.worker == "trl" else run_rlopt(args))
        return []
    has_trl = importlib.util.find_spec("trl") is not None and not args.no_trl
    sides = ["trl", ALL_ROWS, "rlopt"] if has_trl else [ALL_ROWS, "rlopt"]
    print(
        f"GRPO step throughput: {PROMPTS_PER_STEP} prompts x {NUM_GENERATIONS} generations, {MAX_NEW_TOKENS} "
        f"new tokens, {args.optimizer} lr {args.lr:g}, {'random-init' if args.cold else 'warm'} embedded model, "
        f"{args.warmup} + {args.steps} steps x {args.rounds} round(s) per side, "
        f"{args.threads or 'default'} torch thread(s)",
        flush=True,
    )
    if not has_trl:
        print("trl is not installed (pip install -e '.[bench]'): measuring rlopt only", flush=True)
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="rlopt-bench-grpo-") as tmp:
        model_dir = prepare_model(Path(tmp) / "model", args.cold)
        for r in range(args.rounds):
            for side in sides:
                worker_args = [
                    *("--worker", side, "--model", str(model_dir), "--out", str(Path(tmp) / f"{side}{r}")),
                    *("--steps", str(args.steps), "--warmup", str(args.warmup)),
                    *("--optimizer", args.optimizer, "--lr", str(args.lr)),
                ]
                results[side].append(run_worker("benchmarks.bench_grpo_vs_trl", worker_args, args.threads))
    return report(results)


def report(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    completions = PROMPTS_PER_STEP * NUM_GENERATIONS
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for side, runs in results.items():
        times = [t for run in runs for t in run["step_s"]]
        wall[side] = statistics.median(times)
        cpu[side] = statistics.median(t for run in runs for t in run["cpu_s"])
        print(
            f"{side:>14}: {wall[side]:.4f} s/step wall (median; mean {statistics.fmean(times):.4f}, "
            f"min {min(times):.4f}, {len(times)} steps), {cpu[side]:.4f} CPU s/step (median), "
            f"{completions / wall[side]:.0f} completions/s wall, {completions / cpu[side]:.0f} per CPU s; "
            f"mean reward {statistics.fmean(run['reward_mean'] for run in runs):.3f}, "
            f"peak RSS {max(run['peak_rss'] for run in runs) / 2**20:.0f} MiB",
            flush=True,
        )
    if "trl" not in wall:
        return []
    print(
        f"without the zero-advantage skip rlopt is {wall['trl'] / wall[ALL_ROWS]:.2f}x TRL "
        f"({wall['trl']:.4f} / {wall[ALL_ROWS]:.4f} s per step; information, not a target)",
        flush=True,
    )
    lines = []
    for name, per_step, unit in (
        ("grpo_speedup_vs_trl", wall, "s"),
        ("grpo_cpu_speedup_vs_trl", cpu, "CPU s"),
    ):
        speedup = per_step["trl"] / per_step["rlopt"]
        lines.append(
            verdict(
                name,
                f"{speedup:.2f}x ({per_step['trl']:.4f} / {per_step['rlopt']:.4f} {unit} per step)",
                f">= {TARGET_SPEEDUP:g}x",
                speedup >= TARGET_SPEEDUP,
            )
        )
    return lines


if __name__ == "__main__":
    main()
