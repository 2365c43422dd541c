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

A real model (`--model asset:smollm2-135m-instruct`, or any local Hugging Face folder): both sides load its fp32
weights; the arithmetic task is worded for a chat model (`task.prompt_style=instruct`, the last integer is the
answer) and goes through the tokenizer's chat template on both sides: rlopt renders it as text, TRL gets
conversational prompts and applies it itself, and the worker checks that the two give the same prompt token ids
before it starts. 128 new tokens at most (`--max-new-tokens`), temperature 0.7 (rlopt's real-model demo), SGD lr
1e-3 (small, so the policy and its completion lengths barely move during the benchmark). Completions end at the
model's EOS, so their lengths are the model's: draws from one distribution on both sides.

Every measured step is also cut into phases, the same on both sides (`benchmarks/grpo_phases.py`): generation,
log-prob forward, backward, clip + optimizer step, other; the medians are printed per side.

Run: `python -m benchmarks.bench_grpo_vs_trl [--quick] [--model asset:smollm2-135m-instruct]`. TRL is the
`bench` extra (`pip install -e ".[bench]"`); without it only rlopt is measured and the ratio is not reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import grpo_phases
from benchmarks.common import emit, peak_rss_bytes, run_worker, verdict

TARGET_SPEEDUP = 2.0
PROMPTS_PER_STEP = 4
NUM_GENERATIONS = 8
MAX_NEW_TOKENS = 6
DEFAULT_LR = {"sgd": 0.003, "adamw": 3e-5}  # the demo's learning rates (README: measured at this size)
EMBEDDED = "embedded"
# A real model: `rlopt demo --model`'s temperature; completions of a realistic length (the model answers
# '47 + 38 = 85' in about 10 tokens, or explains at length, and stops at its EOS). Small learning rates, so that the
# policy barely moves during the benchmark and both sides keep sampling (about) the starting model's completion
# lengths, their workload. At the demo's SGD lr 0.1 (clipped steps of L2 norm 0.1) they drifted apart: over 2
# measured steps at 128 tokens, after one warm-up step, TRL's completions averaged 42 tokens and rlopt's 14.
REAL_LR = {"sgd": 1e-3, "adamw": 1e-6}
REAL_MAX_NEW_TOKENS = 128
REAL_TEMPERATURE = 0.7
REAL_N_EVAL = 8  # rlopt's untimed evals before step 1 and after the last: a few prompts, not 200
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
        "--model",
        default=EMBEDDED,
        help="'embedded' (default), or a real model: 'asset:smollm2-135m-instruct' or a local Hugging Face folder.",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"Tokens per completion at most (default {MAX_NEW_TOKENS}; {REAL_MAX_NEW_TOKENS} with a real model).",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per side (default 1: on a shared 2-core box, 2 OpenMP threads that lose their cores "
        "to other processes spin at every barrier and make step times erratic; 0 = torch's default).",
    )
    p.add_argument("--no-trl", action="store_true", help="Measure rlopt only.")
    p.add_argument(
        "--no-all-rows",
        action="store_true",
        help=f"Skip the third side ({ALL_ROWS}, information only): a third less time on a real model.",
    )
    # worker mode (internal): run one side and print one JSON line
    p.add_argument("--worker", choices=("trl", ALL_ROWS, "rlopt"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)  # the folder both sides load
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick, real = args.quick, args.model != EMBEDDED
    # a real model's step costs seconds, not tens of ms: fewer steps (TRL's step times vary less there, too)
    args.steps = args.steps or ((2 if quick else 5) if real else (5 if quick else 30))
    args.warmup = args.warmup if args.warmup is not None else (1 if real else 2 if quick else 3)
    args.rounds = args.rounds or (1 if quick else 2)
    # the quick mode must not pay for (or depend on) the warm-up; a real model has none
    args.cold = (args.cold or quick) and not real
    args.lr = args.lr or (REAL_LR if real else DEFAULT_LR)[args.optimizer]
    args.max_new_tokens = args.max_new_tokens or (REAL_MAX_NEW_TOKENS if real else MAX_NEW_TOKENS)
    args.temperature = REAL_TEMPERATURE if real else 1.0
    return args


def is_real(args: argparse.Namespace) -> bool:
    return bool(args.model != EMBEDDED)


def task_flags(args: argparse.Namespace) -> dict[str, Any]:
    """rlopt's task settings, shared by its run and by the prompts TRL is given."""
    if not is_real(args):  # the embedded model's tokenizer has no chat template (TRL prompts plain text too)
        return {"task.chat_template": False}
    return {"task.chat_template": True, "task.prompt_style": "instruct", "task.n_eval": REAL_N_EVAL}


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


def model_folder(args: argparse.Namespace, tmp: Path) -> Path:
    """The folder both sides load: the real model's (an asset is converted on first use), else the embedded
    model saved in fp32 under `tmp`."""
    if not is_real(args):
        return prepare_model(tmp / "model", args.cold)
    from rlopt_cli.models.assets import resolve_model_path

    return Path(resolve_model_path(args.model))


def step_examples(args: argparse.Namespace, total_steps: int) -> list[Any]:
    """The examples rlopt draws for steps 1..total_steps with train.seed 0, in order."""
    from rlopt_cli.config.recipes import load_config
    from rlopt_cli.tasks import build_task
    from rlopt_cli.training.steps import pick_examples

    task = build_task(load_config(None, None, task_flags(args)).task)
    return [e for s in range(1, total_steps + 1) for e in pick_examples(task.train, PROMPTS_PER_STEP, s, 0)]


def chat_prompt_ids(tokenizer: Any, prompts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt token ids as rlopt makes them (chat template rendered as text, then tokenized) and as TRL makes them
    from conversational prompts (`apply_chat_template(..., tokenize=True)` in `GRPOTrainer._tokenize_prompts`)."""
    from rlopt_cli.models.loading import render_prompts

    # templated text is encoded without the tokenizer's own special tokens, as `models.loading.encode_prompts` does
    ours = tokenizer(render_prompts(tokenizer, prompts, True), add_special_tokens=False)["input_ids"]
    theirs = tokenizer.apply_chat_template(
        conversation=[[{"role": "user", "content": p}] for p in prompts],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    return [list(ids) for ids in ours], [list(ids) for ids in theirs]


# ---------------------------------------------------------------------------------------------------------------
# the two sides, each run in its own process


def run_rlopt(args: argparse.Namespace) -> dict[str, Any]:
    from rlopt_cli.config.recipes import load_config
    from rlopt_cli.training import loop as trainer
    from rlopt_cli.training.tracking import read_metrics

    total = args.warmup + args.steps
    flags = task_flags(args) | {
        "model.name_or_path": args.model_dir,
        "grpo.batch_size": PROMPTS_PER_STEP * NUM_GENERATIONS,
        "grpo.num_generations": NUM_GENERATIONS,
        "grpo.max_completion_length": args.max_new_tokens,
        "grpo.temperature": args.temperature,
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
    clock = grpo_phases.PhaseClock()

    def timed_step(*a: Any, **kw: Any) -> dict[str, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        row = grpo_step(*a, **kw)
        cpu_s.append(time.process_time() - c0)
        clock.end_step(time.perf_counter() - t0, row["time/gen_s"])
        return row

    started = time.perf_counter()
    trainer.grpo_step = timed_step
    try:
        with grpo_phases.wrapped(clock, grpo_phases.rlopt_targets()):
            run_dir = trainer.train(load_config(None, None, flags), args.out, say=lambda *_: None)
    finally:  # the tests run workers in-process
        trainer.grpo_step = grpo_step
    wall = time.perf_counter() - started
    rows = [r for r in read_metrics(run_dir) if r["step"] > args.warmup]
    return {
        "step_s": [r["time/step_s"] for r in rows],
        "cpu_s": cpu_s[args.warmup :],
        "phases": clock.steps[args.warmup :],
        "completion_len": [r["train/completion_len"] for r in rows],
        "reward_mean": statistics.fmean(r["train/reward_mean"] for r in rows),
        "wall_s": wall,
        "peak_rss": peak_rss_bytes(),
    }


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from rlopt_cli.algo.optimizers import build_optimizer

    total = args.warmup + args.steps
    examples = step_examples(args, total)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.padding_side = "left"
    prompts: list[Any] = [e.prompt for e in examples]
    if is_real(args):  # conversational: TRL applies the chat template; it must give rlopt's token ids
        ours, theirs = chat_prompt_ids(tokenizer, prompts)
        if ours != theirs:
            raise SystemExit(
                "TRL's chat-template prompt ids differ from rlopt's: the comparison would not be fair"
            )
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    dataset = Dataset.from_dict({"prompt": prompts, "answer": [e.answer for e in examples]})
    batch_rewards: list[float] = []
    lengths: list[float] = []
    clock = grpo_phases.PhaseClock()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.cpu_s: list[float] = []

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.step_s.append(time.perf_counter() - self.t0)
            self.cpu_s.append(time.process_time() - self.c0)
            clock.end_step(self.step_s[-1])

    optimizer = build_optimizer(model.parameters(), args.optimizer, args.lr, 0.0, {})
    grpo_phases.hook_optimizer(optimizer, clock)
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward(args, batch_rewards, lengths),
        args=trl_config(args, total),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
        optimizers=(optimizer, None),
    )
    started = time.perf_counter()
    with grpo_phases.wrapped(clock, grpo_phases.trl_targets(trainer)):
        trainer.train()
    wall = time.perf_counter() - started
    return {
        "step_s": timer.step_s[args.warmup :],
        "cpu_s": timer.cpu_s[args.warmup :],
        "phases": clock.steps[args.warmup :],
        "completion_len": lengths[args.warmup :],
        "reward_mean": statistics.fmean(batch_rewards[args.warmup :]),
        "wall_s": wall,
        "peak_rss": peak_rss_bytes(),
    }


def trl_reward(args: argparse.Namespace, batch_rewards: list[float], lengths: list[float]) -> Any:
    """rlopt's arithmetic verifier (the bare or the instruct one) as a TRL reward function (list in, list out);
    it also files each batch's mean reward and mean completion length (tokens up to and including EOS)."""
    from rlopt_cli.tasks import Example
    from rlopt_cli.tasks.arithmetic import verify, verify_instruct

    check = verify_instruct if is_real(args) else verify

    def arithmetic_reward(
        completions: list[Any], answer: list[str], completion_ids: list[list[int]], **_: Any
    ) -> list[float]:
        # conversational prompts get conversational completions: [{"role": "assistant", "content": text}]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [
            check(text, Example(prompt="", answer=a, solution=a))
            for text, a in zip(texts, answer, strict=True)
        ]
        batch_rewards.append(sum(rewards) / len(rewards))
        lengths.append(sum(map(len, completion_ids)) / len(completion_ids))
        return rewards

    return arithmetic_reward


def trl_config(args: argparse.Namespace, total: int) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(Path(args.out) / "trl"),
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,  # completions per step
        num_generations=NUM_GENERATIONS,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,  # top_p 1, top_k 0, min_p None by default: plain sampling, as rlopt's
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


# ---------------------------------------------------------------------------------------------------------------
# the side-by-side run


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.worker:
        emit(run_trl(args) if args.worker == "trl" else run_rlopt(args))
        return []
    has_trl = importlib.util.find_spec("trl") is not None and not args.no_trl
    sides = ["trl"] if has_trl else []
    sides += ([] if args.no_all_rows else [ALL_ROWS]) + ["rlopt"]
    model = args.model if is_real(args) else f"{'random-init' if args.cold else 'warm'} embedded model"
    print(
        f"GRPO step throughput: {PROMPTS_PER_STEP} prompts x {NUM_GENERATIONS} generations, at most "
        f"{args.max_new_tokens} new tokens, temperature {args.temperature:g}, {args.optimizer} lr {args.lr:g}, "
        f"{model}, {args.warmup} + {args.steps} steps x {args.rounds} round(s) per side, "
        f"{args.threads or 'default'} torch thread(s)",
        flush=True,
    )
    if not has_trl:
        print("trl is not installed (pip install -e '.[bench]'): measuring rlopt only", flush=True)
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="rlopt-bench-grpo-") as tmp:
        model_dir = model_folder(args, Path(tmp))
        for r in range(args.rounds):
            for side in sides:
                worker_args = [
                    *("--worker", side, "--model", args.model, "--model-dir", str(model_dir)),
                    *("--out", str(Path(tmp) / f"{side}{r}")),
                    *("--steps", str(args.steps), "--warmup", str(args.warmup)),
                    *("--optimizer", args.optimizer, "--lr", str(args.lr)),
                    *("--max-new-tokens", str(args.max_new_tokens)),
                ]
                results[side].append(run_worker("benchmarks.bench_grpo_vs_trl", worker_args, args.threads))
    return report(results, "_real" if is_real(args) else "")


def report(results: dict[str, list[dict[str, Any]]], suffix: str = "") -> list[str]:
    """Per side: step times, throughput, reward, completion length, peak RSS, then the phase profile; the
    verdicts (named `grpo_speedup_vs_trl{suffix}`) compare TRL with rlopt as it runs by default."""
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
            f"{completions / wall[side]:.3g} completions/s wall, {completions / cpu[side]:.3g} per CPU s; "
            f"mean reward {statistics.fmean(run['reward_mean'] for run in runs):.3f}, "
            f"mean completion {statistics.fmean(n for run in runs for n in run['completion_len']):.1f} tokens "
            f"(per step: {' '.join(f'{n:.1f}' for run in runs for n in run['completion_len'])}), "
            f"peak RSS {max(run['peak_rss'] for run in runs) / 2**20:.0f} MiB",
            flush=True,
        )
    grpo_phases.print_profile(
        {side: [p for run in runs for p in run["phases"]] for side, runs in results.items()}
    )
    if "trl" not in wall:
        return []
    if ALL_ROWS in wall:
        print(
            f"without the zero-advantage skip rlopt is {wall['trl'] / wall[ALL_ROWS]:.2f}x TRL "
            f"({wall['trl']:.4f} / {wall[ALL_ROWS]:.4f} s per step; information, not a target)",
            flush=True,
        )
    lines = []
    for name, per_step, unit in (
        (f"grpo_speedup_vs_trl{suffix}", wall, "s"),
        (f"grpo_cpu_speedup_vs_trl{suffix}", cpu, "CPU s"),
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
