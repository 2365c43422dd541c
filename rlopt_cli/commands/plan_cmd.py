"""`rlopt plan RECIPE [--gpu h100-80gb] [--nproc N]`: the run's device memory per GPU, itemized, for SGD and AdamW,
whether it fits, and the per-GPU peak sharded over 1, 2, 4 and 8 GPUs.

Pure arithmetic over the recipe and the model's shape (rlopt_cli/training/memory_plan.py): no torch, no model
loaded, no GPU needed.
"""

from __future__ import annotations

from pathlib import Path

import typer

from rlopt_cli.commands._common import friendly_errors


@friendly_errors
def plan(
    recipe: Path = typer.Argument(
        ..., help="A recipe TOML (e.g. recipes/paper/qwen3_1p7b_math_grpo_sgd.toml)."
    ),
    gpu: str = typer.Option(
        "h100-80gb", "--gpu", help="The card: h100-80gb, a100-80gb, a100-40gb, l40s-48gb, rtx4090-24gb."
    ),
    prompt_tokens: int = typer.Option(
        512, "--prompt-tokens", help="Prompt length to assume (recipes do not bound it)."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override a config key, e.g. grpo.micro_batch_size=4."
    ),
    nproc: int = typer.Option(1, "--nproc", help="GPUs the run is sharded over (FSDP2), one process each."),
) -> None:
    """Print the estimated peak device memory of a GRPO run, per component, for SGD and AdamW."""
    from rlopt_cli.config.recipes import load_config
    from rlopt_cli.errors import RloptError, close_matches
    from rlopt_cli.training.memory_plan import GIB, GPUS, resolve_shape
    from rlopt_cli.training.memory_plan import plan as make_plan

    if gpu not in GPUS:
        raise RloptError(f"--gpu {gpu!r} is not one of {', '.join(GPUS)}{close_matches(gpu, tuple(GPUS))}")
    if prompt_tokens < 1:
        raise RloptError(f"--prompt-tokens {prompt_tokens} must be >= 1")
    if nproc < 1:
        raise RloptError(f"--nproc {nproc} must be >= 1")
    cfg = load_config(recipe, overrides)
    if cfg.model.is_embedded:
        raise RloptError("the embedded model needs no plan (a few MB); plan a recipe with model.name_or_path")
    if cfg.train.objective != "grpo":
        raise RloptError("rlopt plan covers GRPO runs (train.objective = 'grpo')")
    shape = resolve_shape(cfg.model.name_or_path)
    plans = {name: make_plan(cfg, shape, name, GPUS[gpu], prompt_tokens, nproc) for name in ("sgd", "adamw")}
    g = cfg.grpo
    sharded = f", sharded over {nproc} GPUs (per GPU)" if nproc > 1 else ""
    typer.echo(
        f"{cfg.model.name_or_path}: {shape.params / 1e9:.2f}B parameters, vocab {shape.vocab:,}; micro-batch "
        f"{g.micro_batch_size or g.batch_size} x ({prompt_tokens} prompt + {g.max_completion_length} completion) "
        f"tokens, {cfg.train.precision}, checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}, "
        f"log-prob chunk {g.logprob_chunk_tokens or 'off'}; {gpu} ({GPUS[gpu] / GIB:.1f} GiB){sharded}"
    )
    width = max(len(k) for k in plans["sgd"].items) + 2
    typer.echo(f"{'GiB':<{width}}{'SGD':>9}{'AdamW':>9}")
    for key in plans["sgd"].items:
        typer.echo(f"{key:<{width}}" + "".join(f"{p.items[key] / GIB:>9.2f}" for p in plans.values()))
    typer.echo("peak by phase")
    for key in plans["sgd"].phases:
        typer.echo(f"  {key:<{width - 2}}" + "".join(f"{p.phases[key] / GIB:>9.2f}" for p in plans.values()))
    typer.echo(f"{'peak':<{width}}" + "".join(f"{p.peak / GIB:>9.2f}" for p in plans.values()))
    for name, p in plans.items():
        kv = (
            f"; the engine's KV cache holds {p.vllm_kv_tokens:,} tokens "
            f"({p.vllm_kv_tokens // p.sequence_tokens} sequences of {p.sequence_tokens:,})"
            if cfg.rollout.backend == "vllm"
            else ""
        )
        verdict = "fits" if p.fits else "does NOT fit"
        typer.echo(f"{name}: {verdict} ({p.peak / GIB:.1f} of {p.card / GIB:.1f} GiB){kv}")
    typer.echo("per-GPU peak, GiB, sharded over N GPUs:")
    for n in (1, 2, 4, 8):
        row = {name: make_plan(cfg, shape, name, GPUS[gpu], prompt_tokens, n) for name in ("sgd", "adamw")}
        cells = "".join(f"{p.peak / GIB:>9.2f}{'' if p.fits else '*':<1}" for p in row.values())
        typer.echo(f"  N = {n:<{width - 6}}{cells}")
    typer.echo("  (* does not fit)")
