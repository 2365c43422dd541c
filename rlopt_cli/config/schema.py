"""Run configuration: frozen dataclasses, one per section, validated in `__post_init__`.

Data flows one way: a recipe (TOML) plus overrides becomes a `RunConfig` (rlopt_cli/config_io.py), the
trainer reads it, and the fully resolved config is written beside the results as `config.toml`. Nothing
mutates a config after it is built; derived values are properties. This module imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rlopt_cli.config.optimizers import OPTIMIZERS, check_optimizer_args
from rlopt_cli.errors import RloptError, close_matches
from rlopt_cli.runtime.cpu_kernels import CPU_ISAS

OBJECTIVES = ("grpo", "sft")
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
PRECISIONS = ("fp32", "bf16-autocast")
SAVE_DTYPES = ("bfloat16", "float32", "float16")
SCHEDULES = ("constant", "cosine")
ATTENTION = ("auto", "eager", "sdpa", "flash_attention_2", "flex_attention")
# apply_chat_template arguments that rlopt sets itself: a recipe may not override them
TEMPLATE_ARGS_SET = (
    "conversation",
    "tokenize",
    "add_generation_prompt",
    "return_dict",
    "continue_final_message",
)


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise RloptError(
            f"{key} = {value!r} is not one of {', '.join(choices)}{close_matches(value, choices)}"
        )


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    # `not value >= 0` is also true for nan; inf passes every bound but trains nothing, so it is refused too
    if not math.isfinite(value) or not value >= 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise RloptError(f"{key} = {value} must be a finite number {bound}")


# The embedded model is for small, fast studies; past this it would take hours to warm up or exhaust memory.
MAX_EMBEDDED_PARAMS = 1_000_000_000


def plain_name(name: str) -> bool:
    """A single folder name: no separators, not hidden, not '.' or '..', so every path stays inside --out."""
    separators = ("/", "\\", "\0")
    return (
        0 < len(name.encode()) <= 255 and not any(c in name for c in separators) and not name.startswith(".")
    )


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "embedded"
    """'embedded': build the tiny Qwen2 from the dims below (no download); 'asset:NAME': a real model that
    `rlopt fetch NAME` converts into the cache (fetched on first use); else a local HF folder or hub id."""
    hidden_size: int = 128
    """Embedded model: width. 128 x 4 layers with the 53-token vocabulary is about 1.06M parameters."""
    intermediate_size: int = 512
    """Embedded model: MLP width (4x hidden, as in the reference TRL baseline)."""
    num_layers: int = 4
    """Embedded model: transformer blocks."""
    num_heads: int = 4
    """Embedded model: attention heads (and key/value heads: no GQA at this size)."""
    init_seed: int = 0
    """Embedded model: seed of the random initialisation that the warm-up starts from."""
    warmup_steps: int = 300
    """Embedded model: SFT steps (AdamW) that bring it to a middling accuracy (~50%) so RL has headroom;
    0 = random init. Measured: 0.5% at 100 steps, 24% at 275, 50% at 300, 70% at 400."""
    warmup_lr: float = 1e-3
    """Embedded model: AdamW learning rate of the warm-up."""
    warmup_batch_size: int = 64
    """Embedded model: examples per warm-up step."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (real models on a GPU)."""
    attn_implementation: str = "auto"
    """The transformers attention kernel of the trained model (and its reference): auto = transformers' choice
    (sdpa where the model supports it), eager, sdpa, flash_attention_2 (CUDA and the flash-attn package), or
    flex_attention (CUDA). vLLM rollouts pick their own kernel."""

    def __post_init__(self) -> None:
        _choice(self.attn_implementation, ATTENTION, "model.attn_implementation")
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "warmup_batch_size"):
            _positive(getattr(self, key), f"model.{key}")
        _positive(self.warmup_steps, "model.warmup_steps", allow_zero=True)
        _positive(self.warmup_lr, "model.warmup_lr")
        if self.hidden_size % self.num_heads:
            raise RloptError(
                f"model.hidden_size = {self.hidden_size} must be divisible by model.num_heads = {self.num_heads}"
            )
        if self.is_embedded and self.embedded_params > MAX_EMBEDDED_PARAMS:
            raise RloptError(
                f"model.hidden_size/intermediate_size/num_layers make an embedded model of "
                f"~{self.embedded_params:.2g} parameters (at most {MAX_EMBEDDED_PARAMS:.0e}); for a big model set "
                "model.name_or_path to a Hugging Face folder"
            )

    @property
    def embedded_params(self) -> int:
        """About how many parameters the embedded model has (attention + MLP per layer; embeddings are small)."""
        h, i = self.hidden_size, self.intermediate_size
        return self.num_layers * (4 * h * h + 3 * h * i) + 2 * 64 * h

    @property
    def is_embedded(self) -> bool:
        return self.name_or_path == "embedded"


@dataclass(frozen=True)
class TaskConfig:
    name: str = "arithmetic"
    """Which task (see rlopt_cli/tasks): its data, answer extraction and verifier."""
    digits: int = 2
    """Arithmetic: digits per operand (the difficulty knob)."""
    prompt_style: str = "bare"
    """Arithmetic: 'bare' prompts '47+38=' and reads the completion's leading integer (the embedded model's
    format); 'instruct' asks 'Compute 47+38. Reply with just the result.' and reads the last integer, since a
    chat model answers '47 + 38 = 85'."""
    n_eval: int = 200
    """Size of the held-out eval split (arithmetic), or a cap on the eval file's rows (0 = all)."""
    split_seed: int = 0
    """Seed of the task's generator and of its train/eval split; fixed across runs so every run sees one split."""
    train_file: str = ""
    """File-backed tasks: path of the train split (JSONL or Parquet)."""
    eval_file: str = ""
    """File-backed tasks: path of the eval split (JSONL or Parquet)."""
    answer_mode: str = "flexible"
    """GSM8K: 'strict' takes the number after '####', 'flexible' the last number in the completion."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one (the embedded tokenizer has none)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    """Extra variables for the chat template (transformers' apply_chat_template kwargs), e.g.
    {enable_thinking = false} for Qwen3's non-thinking mode; empty = the template's defaults."""

    def __post_init__(self) -> None:
        if self.chat_template_kwargs and not self.chat_template:
            raise RloptError(
                "task.chat_template_kwargs is set but task.chat_template = false, so no template reads it: "
                "remove task.chat_template_kwargs or set task.chat_template=true"
            )
        if taken := sorted(set(self.chat_template_kwargs) & set(TEMPLATE_ARGS_SET)):
            raise RloptError(
                f"task.chat_template_kwargs may not set {', '.join(taken)} (rlopt sets it: a user turn with the "
                "generation prompt); remove it"
            )
        _positive(self.digits, "task.digits")
        _positive(self.n_eval, "task.n_eval", allow_zero=True)
        _choice(self.answer_mode, ("strict", "flexible"), "task.answer_mode")
        _choice(self.prompt_style, ("bare", "instruct"), "task.prompt_style")


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO knobs, named as in TRL's GRPOConfig (README maps them to verl and OpenRLHF)."""

    num_generations: int = 8
    """G: completions sampled per prompt; the group that advantages are normalised within."""
    batch_size: int = 32
    """Completions per optimizer step (prompts per step = batch_size / num_generations)."""
    micro_batch_size: int = 0
    """Completions per forward/backward pass (gradient accumulation); 0 = the whole batch at once."""
    micro_batch_tokens: int = 0
    """Instead of micro_batch_size: micro-batches of whole groups, packed greedily in order while their padded
    size (rows x longest prompt + completion) stays within this many tokens; a group bigger than that goes
    alone. Same gradient as fixed-size micro-batches (the loss normalisers stay the whole batch's; bnpo, a
    per-micro-batch mean, is refused). 0 = off."""
    max_completion_length: int = 6
    """Tokens generated per completion at most (a 2-digit sum needs at most 4 with EOS)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    beta: float = 0.0
    """KL coefficient (k3 estimator against a frozen reference); 0 = no reference model is loaded."""
    epsilon: float = 0.2
    """Lower clip bound of the importance ratio: 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clip bound: 1 + epsilon_high (DAPO's clip-higher uses 0.28); unset = epsilon."""
    num_iterations: int = 1
    """Policy updates per generated batch (PPO epochs, verl's ppo_epochs)."""
    scale_rewards: str = "group"
    """Divide advantages by the reward std of the 'group', the whole 'batch', or 'none' (Dr. GRPO)."""
    loss_type: str = "dapo"
    """Loss aggregation: grpo (per-sequence mean), bnpo (per micro-batch token mean), dr_grpo (/ B*L_max), dapo."""
    mask_truncated_completions: bool = False
    """Exclude completions that hit max_completion_length without EOS from the loss (DAPO)."""
    skip_zero_advantage: bool = True
    """Skip the forward/backward of groups whose rewards are all equal: with beta = 0 their loss and gradient
    are exactly zero (their tokens still count in the loss normalisers). Off: every row is forwarded."""
    share_prompt_forward: bool = True
    """Forward each prompt once per group in the log-prob pass and repeat its KV cache over the G completions
    (same log-probs and gradients; used when micro-batches hold whole groups). Off: one forward per row."""
    pack_max_tokens: int = 512
    """With share_prompt_forward: a group whose prompt + G x (L-1) completion tokens fit this many is forwarded
    as one sequence under a shared-prefix mask (one forward instead of two; attention O(tokens^2) per group, so
    only for short groups); longer groups share the prompt through its KV cache. 0: never pack."""
    ref_dtype: str = "auto"
    """dtype of the KL reference model (beta > 0): auto = bfloat16 on CUDA (half an fp32 copy; KL within 0.5% of
    the fp32 copy's, measured on tiny models), float32 on CPU (bf16 matmuls are emulated on most CPUs: slow)."""
    ref_offload: bool = False
    """Keep the reference model in host memory and move it to the device for its one no-grad pass per step
    (3.4 GB over PCIe at Qwen3-1.7B in bf16); ignored on CPU."""
    logprob_chunk_tokens: int = 512
    """Positions per chunk of the log-prob pass (lm_head, log_softmax, gather; rlopt_cli/algo/lm_head.py), each
    recomputed in backward: the pass holds ~4 x this x vocab fp32 floats (1.2 GB at Qwen3's 151,936) instead of a
    micro-batch's whole fp32 logits (15 GB at 8 x 3,072 tokens). Same numbers. 0: all positions at once."""
    sampler_correction: str = "none"
    """Correct the loss for the rollout engine sampling from other numbers than the trainer's (vLLM: bf16, other
    kernels), by the ratio pi_trainer / pi_sampler of the sampled tokens (TRL's vllm_importance_sampling_*):
    token_truncate (each token's ratio capped at sampler_correction_max, truncated IS), token_mask (tokens
    whose ratio exceeds it drop out), sequence_truncate / sequence_mask (one ratio per completion, the product
    of its tokens'). Needs an engine that returns its log-probs (vllm); the gap itself is logged
    whenever it does (train/sampler_logp_gap). none: no correction (the hf backend samples with the trainer)."""
    sampler_correction_max: float = 3.0
    """The cap (truncate modes) or cut-off (mask modes) of the sampler correction's ratio; TRL's default."""

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise RloptError(
                f"grpo.num_generations = {self.num_generations} must be >= 2 (advantages need a group)"
            )
        _positive(self.batch_size, "grpo.batch_size")
        if self.batch_size % self.num_generations:
            raise RloptError(
                f"grpo.batch_size = {self.batch_size} is not divisible by grpo.num_generations = "
                f"{self.num_generations}; set a batch_size that is a multiple of it"
            )
        _positive(self.micro_batch_size, "grpo.micro_batch_size", allow_zero=True)
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise RloptError(
                f"grpo.batch_size = {self.batch_size} is not divisible by grpo.micro_batch_size = "
                f"{self.micro_batch_size}"
            )
        _positive(self.micro_batch_tokens, "grpo.micro_batch_tokens", allow_zero=True)
        if self.micro_batch_tokens and self.micro_batch_size:
            raise RloptError(
                f"grpo.micro_batch_tokens = {self.micro_batch_tokens} and grpo.micro_batch_size = "
                f"{self.micro_batch_size} are both set; set one of them to 0"
            )
        if self.micro_batch_tokens and self.loss_type == "bnpo":
            raise RloptError(
                "grpo.micro_batch_tokens with grpo.loss_type = 'bnpo' would make the loss depend on how "
                "micro-batches are packed (bnpo averages each one's tokens); use grpo.micro_batch_size"
            )
        _positive(self.max_completion_length, "grpo.max_completion_length")
        _positive(self.temperature, "grpo.temperature")
        _positive(self.beta, "grpo.beta", allow_zero=True)
        _positive(self.epsilon, "grpo.epsilon", allow_zero=True)
        if self.epsilon_high is not None:
            _positive(self.epsilon_high, "grpo.epsilon_high", allow_zero=True)
        _positive(self.num_iterations, "grpo.num_iterations")
        _positive(self.pack_max_tokens, "grpo.pack_max_tokens", allow_zero=True)
        _positive(self.logprob_chunk_tokens, "grpo.logprob_chunk_tokens", allow_zero=True)
        _choice(self.ref_dtype, ("auto", "bfloat16", "float32", "float16"), "grpo.ref_dtype")
        _choice(self.sampler_correction, SAMPLER_CORRECTIONS, "grpo.sampler_correction")
        if not self.sampler_correction_max > 1:
            raise RloptError(
                f"grpo.sampler_correction_max = {self.sampler_correction_max} must be > 1 (a ratio cap; TRL uses 3)"
            )
        _choice(self.scale_rewards, SCALE_REWARDS, "grpo.scale_rewards")
        _choice(self.loss_type, LOSS_TYPES, "grpo.loss_type")

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.num_generations

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass(frozen=True)
class SFTConfig:
    batch_size: int = 64
    """Examples per optimizer step; the loss is the mean NLL of the reference completion's tokens (+ EOS)."""
    micro_batch_size: int = 0
    """Examples per forward/backward pass (gradient accumulation, normalised by the whole batch's tokens, so the
    same loss and gradient up to rounding); 0 = the whole batch at once."""

    def __post_init__(self) -> None:
        _positive(self.batch_size, "sft.batch_size")
        _positive(self.micro_batch_size, "sft.micro_batch_size", allow_zero=True)
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise RloptError(
                f"sft.batch_size = {self.batch_size} is not divisible by sft.micro_batch_size = "
                f"{self.micro_batch_size}"
            )


@dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer with explicit arguments. Unset (None) arguments take the registry's defaults; an
    argument the optimizer does not have is an error (never silently dropped, unlike transformers#44075)."""

    name: str = "sgd"
    """sgd | adamw | rmsprop (see rlopt_cli/optimizers.py)."""
    lr: float = 0.01
    """Learning rate. At the embedded size SGD wants ~1e-2 and AdamW ~1e-5 (measured, README)."""
    weight_decay: float = 0.0
    """Decoupled for adamw, coupled L2 for sgd/rmsprop; explicit 0 by default for every optimizer."""
    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm to this (0 = no clipping). With clipping active SGD is normalised SGD."""
    momentum: float | None = None
    """sgd, rmsprop: momentum factor (default 0: no state)."""
    nesterov: bool | None = None
    """sgd: Nesterov momentum (default false)."""
    betas: tuple[float, float] | None = None
    """adamw: (beta1, beta2), default (0.9, 0.999)."""
    eps: float | None = None
    """adamw, rmsprop: denominator epsilon, default 1e-8."""
    alpha: float | None = None
    """rmsprop: smoothing constant of the squared-gradient average, default 0.99."""
    schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant (the paper's) or cosine to 0."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise RloptError(
                f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}"
                f"{close_matches(self.name, OPTIMIZERS)}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RloptError(f"optimizer.lr = {self.lr} must be a positive number, e.g. --lr 0.01")
        _positive(self.weight_decay, "optimizer.weight_decay", allow_zero=True)
        _positive(self.max_grad_norm, "optimizer.max_grad_norm", allow_zero=True)
        _choice(self.schedule, SCHEDULES, "optimizer.schedule")
        _positive(self.warmup_steps, "optimizer.warmup_steps", allow_zero=True)
        check_optimizer_args(self.name, self.extra_args)

    @property
    def extra_args(self) -> dict[str, Any]:
        """The optimizer-specific arguments the user set."""
        keys = ("momentum", "nesterov", "betas", "eps", "alpha")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "grpo"
    """grpo (RL from the verifier's reward) or sft (next-token loss on the task's reference solutions)."""
    steps: int = 100
    """Optimizer steps."""
    seed: int = 0
    """Seeds prompt order and sampling (explicit per-step generators), so a run repeats exactly on CPU."""
    eval_every: int = 25
    """Evaluate (greedy accuracy on the eval split) every this many steps, before step 1 and at the end."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many steps, and always at the end."""
    keep_checkpoints: int = 0
    """After each save keep only the newest this many checkpoints (plus step-000000, the sparsity reference,
    which is never deleted); 0 = keep all. Resume needs only the newest."""
    precision: str = "fp32"
    """fp32, or bf16-autocast (bf16 compute, fp32 master weights)."""
    save_dtype: str = "bfloat16"
    """dtype of model.safetensors in checkpoints (HF exports are bf16; sparsity is judged on it)."""
    device: str = "auto"
    """auto (cuda if available), cpu, or cuda[:N]."""
    run_name: str = ""
    """Folder name under the output dir; empty = derived from task, objective, optimizer, lr and seed."""
    cpu_isa: str = "avx2"
    """CPU kernels' instruction set (rlopt_cli/runtime/cpu_kernels.py): avx2 gives the same numbers on every x86-64 CPU
    with AVX2, with or without AVX-512; avx512, baseline, or native (torch picks, numbers vary by CPU)."""

    def __post_init__(self) -> None:
        _choice(self.objective, OBJECTIVES, "train.objective")
        _positive(self.steps, "train.steps")
        _positive(self.eval_every, "train.eval_every", allow_zero=True)
        _positive(self.checkpoint_every, "train.checkpoint_every", allow_zero=True)
        _positive(self.keep_checkpoints, "train.keep_checkpoints", allow_zero=True)
        _choice(self.precision, PRECISIONS, "train.precision")
        _choice(self.save_dtype, SAVE_DTYPES, "train.save_dtype")
        _choice(self.cpu_isa, CPU_ISAS, "train.cpu_isa")


@dataclass(frozen=True)
class RolloutConfig:
    backend: str = "hf"
    """Generation backend: hf (transformers forward with KV cache) or vllm (optional extra)."""
    gpu_memory_utilization: float = 0.3
    """vllm: fraction of GPU memory the colocated engine may take."""
    vllm_dtype: str = "auto"
    """vllm: engine dtype; auto = bfloat16 on CUDA, float32 on CPU (where log-probs then match the trainer's)."""
    vllm_sleep_mode: bool = False
    """vllm on CUDA: free the engine's GPU memory while the trainer steps (sleep level 2); ignored on CPU."""
    eval_batch_size: int = 256
    """Prompts per generation call during evaluation."""
    vllm_max_model_len: int = 0
    """vllm: longest prompt + completion the engine serves; 0 = the model's own (40,960 for Qwen3, which only
    makes vLLM check that one such sequence fits its KV cache). The paper recipes set prompt cap + completion."""
    vllm_max_num_seqs: int = 0
    """vllm: sequences decoded at once; 0 = vLLM's default. A batch of 1,024 completions fills it many times."""
    vllm_max_num_batched_tokens: int = 0
    """vllm: tokens one engine step may process (prefill chunks + decodes); 0 = vLLM's default for the device."""
    vllm_request_seeds: bool = True
    """vllm: give every prompt its own seed (its n samples seed + j), so a step's completions depend on the step
    alone: a resumed run draws what an uninterrupted one would. The price: vLLM draws the noise of seeded requests
    one request at a time (a Python loop per decoded token over up to max_num_seqs requests). false: one seeded
    engine draws for the whole batch at once (faster on big batches; a resumed run then samples otherwise)."""
    seed_scope: str = "batch"
    """Sampling randomness of a training step: 'batch', one generator per step (the original runs); 'prompt',
    one per (seed, step, prompt, sample), so completions do not depend on the batch's split over processes
    (required by `rlopt train --nproc N` with N > 1; vllm: each request seeded by its prompt's seed)."""

    def __post_init__(self) -> None:
        _choice(self.backend, ("hf", "vllm"), "rollout.backend")
        _positive(self.vllm_max_num_batched_tokens, "rollout.vllm_max_num_batched_tokens", allow_zero=True)
        _positive(self.vllm_max_model_len, "rollout.vllm_max_model_len", allow_zero=True)
        _positive(self.vllm_max_num_seqs, "rollout.vllm_max_num_seqs", allow_zero=True)
        _choice(self.vllm_dtype, ("auto", "bfloat16", "float16", "float32"), "rollout.vllm_dtype")
        _positive(self.eval_batch_size, "rollout.eval_batch_size")
        _choice(self.seed_scope, ("batch", "prompt"), "rollout.seed_scope")
        if self.seed_scope == "prompt" and self.backend == "vllm" and not self.vllm_request_seeds:
            raise RloptError(
                "rollout.seed_scope = 'prompt' seeds every vLLM request by its prompt: "
                "it needs rollout.vllm_request_seeds = true"
            )


@dataclass(frozen=True)
class LogConfig:
    wandb: bool = False
    """Also log to Weights & Biases (offline mode when no API key is set)."""
    wandb_project: str = "rlopt"
    """W&B project."""
    wandb_group: str = ""
    """W&B group (a sweep sets it to the sweep's name)."""
    progress: bool = True
    """Show a rich progress bar."""
    update_norm: bool = False
    """Log train/update_norm, the L2 norm of each step's weight change; costs a transient fp32 copy of the
    weights at every step, so it is off unless asked for."""


@dataclass(frozen=True)
class ProbeConfig:
    steps: tuple[int, ...] = ()
    """Steps at which to record the gradient and optimizer moments (rlopt_cli/probe.py); read-only."""

    def __post_init__(self) -> None:
        if any(s < 1 for s in self.steps):
            raise RloptError(f"probe.steps = {list(self.steps)} must hold step numbers >= 1")


@dataclass(frozen=True)
class RunConfig:
    """Every section of a run. The run name becomes a folder under --out, so it must be a plain name."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    log: LogConfig = field(default_factory=LogConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if not plain_name(self.run_name):
            raise RloptError(
                f"run name {self.run_name!r} must be a plain folder name (no '/', not starting with '.'); "
                "set train.run_name=NAME (folders go under --out)"
            )
        if self.grpo.sampler_correction != "none" and self.rollout.backend != "vllm":
            raise RloptError(
                f"grpo.sampler_correction = {self.grpo.sampler_correction!r} corrects for a rollout engine's "
                f"numbers, but rollout.backend = {self.rollout.backend!r} samples with the trainer's own model: "
                "set rollout.backend=vllm or grpo.sampler_correction=none"
            )

    @property
    def run_name(self) -> str:
        """`{task}__{objective}__{optimizer}__lr{lr}__s{seed}`: the axes of a comparison, stable across resumes."""
        if self.train.run_name:
            return self.train.run_name
        return (
            f"{self.task.name}__{self.train.objective}__{self.optimizer.name}"
            f"__lr{self.optimizer.lr:g}__s{self.train.seed}"
        )
