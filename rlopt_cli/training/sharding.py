"""One run across several processes (torchrun): FSDP2 sharding and the loop's sharded pieces (gradient clipping,
evaluation, the update-sparsity view); its checkpoints (DCP) are in sharded_checkpoint.py. Everything here is
PyTorch's own engines: `fully_shard` (FSDP2, DTensor parameters) and DTensor's collectives.

How a sharded run stays the single-process run (rlopt_cli/training/loop.py and steps.py):
- every rank samples its contiguous share of the step's prompts, each completion's randomness seeded per
  (run seed, step, global prompt index, sample index) (`rollout.seed_scope = "prompt"`), so the completions do
  not depend on how the prompts are split;
- rewards and advantages are computed on the gathered global batch (groups never straddle ranks), the loss
  normalisers (`num_tokens`, `num_sequences`) are global, and FSDP sums the ranks' gradients (divide factor 1),
  so the gradient is the one-process gradient up to float summation order;
- under FSDP every forward all-gathers: ranks must run the same forwards, so the sampler runs until every
  rank's rows finished (`World.all_true`), the log-prob pass trims each micro-batch to columns agreed by all
  ranks (same route, same chunking everywhere), and a micro-batch whose groups all have zero advantage is
  skipped only when it is so on every rank (else the rank forwards it whole: zero-advantage rows add exactly 0);
- SFT: every rank trains on its contiguous share of the step's examples, its summed NLL divided by the token
  count of the whole step (summed over ranks), in as many micro-batches as every other rank (`check_sharded`);
  SFT's log-prob pass is one decoder and one lm_head call per micro-batch whatever its shape, so ranks may pad
  their shares to their own widths. The embedded model's warm-up (an SFT run itself) stays one process.

Rollouts: the hf sampler on the sharded model (`ShardedHFBackend`), or a colocated vLLM engine per rank
(rlopt_cli/rollout/vllm.py, vLLM's torchrun mode `external_launcher`, tensor parallelism 1): each engine samples
its rank's prompts alone, every request seeded by its prompt's seed; it starts from weights gathered after
sharding, and after every optimizer step (and a resume) the shards are gathered one parameter at a time
(`DTensor.full_tensor`) and pushed into every engine, so no rank holds two copies of the model.

Deliberate simplifications (refused with a one-line error, `check_sharded`): SFT evaluates with hf rollouts,
no probe, no update-norm logging, no token-budget micro-batches; the KL reference (beta > 0) is sharded like the
policy, in the same units, and stays on the device (no `grpo.ref_offload`). Evaluation is split by rank and the
correct counts summed. The in-training update sparsity gathers one full parameter at a time on every rank.
`optim/state_bytes` needs nothing: a DTensor's numel is its global size, so every rank counts the whole run's. The
sampler log-prob gap is taken over every rank's gradient-carrying tokens; `train/skipped_frac` counts the rows no
rank forwarded.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from rlopt_cli.algo.grpo import trim_columns
from rlopt_cli.config.schema import RunConfig
from rlopt_cli.errors import RloptError
from rlopt_cli.models.loading import render_prompts
from rlopt_cli.rollout import Backend, Rollout
from rlopt_cli.rollout.hf import HFBackend
from rlopt_cli.runtime.distributed import World
from rlopt_cli.tasks import Task


def check_sharded(cfg: RunConfig, nproc: int, per_host: int | None = None) -> None:
    """One-line errors, before any process starts, for what a run of `nproc` processes cannot do; `per_host`:
    how many of them run on this host (all of them unless the run spans several machines)."""
    if nproc < 1:
        raise RloptError(f"--nproc = {nproc} must be >= 1")
    if nproc == 1:
        return
    g, s = cfg.grpo, cfg.sft
    grpo_run = cfg.train.objective == "grpo"
    why = [  # (refused, why), checked in this order
        (
            not grpo_run and cfg.rollout.backend != "hf",
            "a sharded SFT run evaluates with rollout.backend='hf' (its steps do not sync a vLLM engine); "
            "set rollout.backend=hf",
        ),
        (
            cfg.rollout.backend == "vllm" and per_host is not None and per_host < nproc,
            "rollout.backend = 'vllm' runs sharded on one machine only (rank 0 writes the engines' starting "
            "folder in its own temporary directory); use rollout.backend='hf' over several machines",
        ),
        (
            grpo_run and cfg.rollout.seed_scope != "prompt",
            "a sharded run needs rollout.seed_scope='prompt' (sampling seeded per prompt, so the completions "
            "do not depend on the number of processes)",
        ),
        (
            grpo_run and g.prompts_per_step % nproc != 0,
            f"--nproc {nproc} must divide the prompts per step (grpo.batch_size / grpo.num_generations = "
            f"{g.prompts_per_step})",
        ),
        (
            not grpo_run and s.batch_size % nproc != 0,
            f"--nproc {nproc} must divide the examples per step (sft.batch_size = {s.batch_size})",
        ),
        (
            grpo_run and g.beta > 0 and g.ref_offload,
            "grpo.ref_offload moves a whole reference model; sharded, each process holds 1/N of it: drop it",
        ),
        (
            grpo_run and g.micro_batch_tokens > 0,
            "grpo.micro_batch_tokens packs each process's groups its own way, and FSDP's forwards must match "
            "across processes; use grpo.micro_batch_size with --nproc",
        ),
        (bool(cfg.probe.steps), "probe.steps is not supported in a sharded run; drop it or --nproc"),
        (cfg.log.update_norm, "log.update_norm is not supported in a sharded run; drop it or --nproc"),
    ]
    for bad, message in why:
        if bad:
            raise RloptError(message)
    # every rank must run as many forwards as the others (FSDP's are collective): micro-batches split evenly
    micro, rows, key = g.micro_batch_size, "completions", "grpo"
    if not grpo_run:
        micro, rows, key = s.micro_batch_size, "examples", "sft"
    local = (g.batch_size if grpo_run else s.batch_size) // nproc
    if micro and local % micro:
        raise RloptError(
            f"{key}.micro_batch_size = {micro} must divide each process's {local} {rows} "
            f"({key}.batch_size / --nproc)"
        )
    device = cfg.train.device
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        available = torch.cuda.device_count()
        if per_host is not None and per_host != nproc:  # several machines: their GPUs are not this host's
            if per_host > available:
                raise RloptError(
                    f"{per_host} processes on this host but it has {available} CUDA devices (one per process)"
                )
        elif nproc > available:
            raise RloptError(f"--nproc {nproc} but this host has {available} CUDA devices (one per process)")


def shard_model(model: Any, device: torch.device) -> Any:
    """`fully_shard` each decoder block, then the parts the loss calls on their own, then the root.

    The log-prob pass calls the decoder (`model.get_decoder()`) and lm_head directly, not the root, so each
    must be a unit of its own that all-gathers its parameters in its own forward: the decoder holds the
    embedding and the final norm, lm_head its weight (or, tied, shares the embedding's unit). On CUDA the
    blocks compute in bf16 and gradients are reduced in fp32; on CPU (gloo has no bf16) everything is fp32.
    Gradients are summed over ranks, not averaged: each rank's loss is already its share of the global loss."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "embed_tokens"):
        raise RloptError(
            f"{type(model).__name__} has no decoder.layers to shard; use a Llama/Qwen-family model"
        )
    for block in layers:
        fully_shard(block, mp_policy=policy)
    if head.weight is decoder.embed_tokens.weight:  # tied: one parameter, so one unit for both modules
        fully_shard([decoder.embed_tokens, head], mp_policy=policy)
    else:
        fully_shard(head, mp_policy=policy)
    fully_shard(decoder, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    with torch.no_grad():  # the first forward through the root makes it FSDP's root (the loss skips it)
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    return model


def clip_grad_norm(model: Any, max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over the model's gradients, sharded (DTensor) or not; returns the global norm.

    One process: exactly torch's `clip_grad_norm_`. Sharded: the norm of the DTensor gradients, made whole
    (one all-reduce), then the same clipping; as torchtitan does."""
    params = [p for p in model.parameters() if p.grad is not None]
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class ShardedHFBackend(HFBackend):
    """The hf sampler on a sharded model: each FSDP unit all-gathers its weights at the call's first forward
    and keeps them until the call ends, instead of once per generated token (FSDP's own advice for evals:
    `set_reshard_after_forward(False)`); they are resharded before training. Peak memory per rank during
    sampling is then the whole model's, as in one process. `agree` is the all-ranks-finished vote."""

    def generate(self, *args: Any, **kwargs: Any) -> Rollout:
        self.model.set_reshard_after_forward(False)
        try:
            return super().generate(*args, **kwargs)
        finally:
            from torch.distributed.fsdp import FSDPModule

            self.model.set_reshard_after_forward(True)
            for module in self.model.modules():  # `reshard` is per unit, not recursive
                if isinstance(module, FSDPModule):
                    module.reshard()


class Gathered:
    """A sharded model seen as whole weights, one parameter at a time (`UpdateReference` reads it)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def named_parameters(self) -> Any:
        from torch.distributed.tensor import DTensor

        for name, param in self.model.named_parameters():
            yield name, param.full_tensor() if isinstance(param, DTensor) else param


SHARED_WAIT_ENV = "RLOPT_SHARED_WAIT_S"  # how long a rank waits to see a file rank 0 wrote (default 60 s)


def check_shared(world: World, path: Path, what: str) -> None:
    """The same one-line error on every rank when some rank cannot see `path`, which rank 0 wrote: ranks on
    several machines read rank 0's files, so those must be on a filesystem every machine shares. A rank that
    does not see it yet waits (a network filesystem may cache "absent" for seconds); then one all-reduce, so
    every rank raises and none waits at a later collective. Nothing in one process."""
    if not world.sharded:
        return
    deadline = time.monotonic() + float(os.environ.get(SHARED_WAIT_ENV, "60"))
    while not visible(path) and time.monotonic() < deadline:
        time.sleep(0.5)
    missing = int(world.sum([0.0 if visible(path) else 1.0])[0])
    if missing:
        raise RloptError(
            f"{missing} of {world.size} processes cannot see {what}, {path}, which rank 0 wrote: a run over "
            "several machines needs it on a filesystem they all share"
        )


def visible(path: Path) -> bool:
    try:  # listing the folder makes a network filesystem (NFS) revalidate it, instead of a cached "absent"
        os.listdir(path.parent)
    except OSError:
        pass
    return path.exists()


class NullMetrics:
    """metrics.jsonl on ranks other than 0: rank 0 alone writes the run folder."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def evaluate_split(backend: Backend, tokenizer: Any, task: Task, cfg: RunConfig, world: World) -> float:
    """Greedy accuracy on the eval split, each rank decoding its contiguous share and the correct counts summed.

    Every rank makes the same generate calls with the same number of prompts (FSDP forwards are collective):
    a short share is padded with copies of the first problem, which are decoded and not counted."""
    examples = list(task.eval)
    per = -(-len(examples) // world.size)
    mine = examples[world.rank * per : (world.rank + 1) * per]
    padded = mine + [examples[0]] * (per - len(mine))
    correct = 0.0
    batch = cfg.rollout.eval_batch_size
    for start in range(0, per, batch):
        chunk = padded[start : start + batch]
        prompts = render_prompts(tokenizer, [e.prompt for e in chunk], cfg.task.chat_template)
        greedy = backend.generate(prompts, 1, cfg.grpo.max_completion_length, 0.0, 0)
        real = max(0, min(len(chunk), len(mine) - start))
        correct += sum(task.rewards(greedy.texts[:real], chunk[:real]))
    return world.sum([correct])[0] / len(examples)


def gap_metrics(gaps: list[torch.Tensor], world: World) -> dict[str, float]:
    """Mean and max of |trainer - sampler| log-prob over every rank's gradient-carrying tokens (none: no row).

    A collective: every rank calls it, whether or not its own rows carried a gradient."""
    gap = torch.cat(gaps).double() if gaps else torch.zeros(0, dtype=torch.float64)  # [T] this rank's tokens
    total, count = world.sum([float(gap.sum()), float(gap.numel())])
    (top,) = world.max_float([float(gap.max()) if gap.numel() else 0.0])  # gaps are >= 0
    if count == 0:
        return {}
    return {"train/sampler_logp_gap": total / count, "train/sampler_logp_gap_max": top}


def pad_prompts(rollout: Rollout, world: World, pad_id: int) -> Rollout:
    """The rollout with its left-padded prompts widened to the widest of any rank's (each rank's tokenizer
    padded to its own longest prompt), so `agreed_columns` cuts every rank's micro-batches alike."""
    width = rollout.prompt_ids.shape[1]
    extra = world.max([width])[0] - width
    if extra == 0:
        return rollout
    ids = torch.nn.functional.pad(rollout.prompt_ids, (extra, 0), value=pad_id)  # [b, P']
    mask = torch.nn.functional.pad(rollout.prompt_mask, (extra, 0), value=0)  # [b, P']
    return dataclasses.replace(rollout, prompt_ids=ids, prompt_mask=mask)


def agreed_columns(prompt_mask: torch.Tensor, completion_mask: torch.Tensor, world: World) -> tuple[int, int]:
    """The (first prompt column, completion columns) to keep in a micro-batch: `grpo.trim`'s choice made over
    every rank's rows, so every rank forwards the same shapes (and takes the same route)."""
    first, last = trim_columns(prompt_mask, completion_mask)
    neg_first, last = world.max([-first, last])
    return -neg_first, last
