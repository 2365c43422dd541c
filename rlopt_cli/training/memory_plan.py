"""How much device memory a GRPO run needs, itemized, from the model's shape and the run's config alone.

`rlopt plan RECIPE --gpu h100-80gb` prints it. Pure arithmetic (no torch): every item is bytes = count x size,
with the counts read off what the code keeps (rlopt_cli/algo/lm_head.py, rlopt_cli/training/reference.py,
loop.py) and validated on CPU against measured peaks for three model shapes (benchmarks/bench_memory_plan.py).

The run's phases and what each holds on the device:
- training (one micro-batch's forward/backward): fp32 weights, fp32 gradients, optimizer state, the reference
  model unless offloaded, activations (with gradient checkpointing: each layer's input, plus one layer's
  activations recomputed in backward), the log-prob pass (one chunk's logits, see `logprob_pass_bytes`);
- optimizer step: weights, gradients, state, and AdamW's one parameter-sized temporary (foreach=False);
- rollout: weights, state (gradients are freed right after the step), the reference unless offloaded, and the
  vLLM engine's share of the card (`rollout.gpu_memory_utilization`: its weights, then KV cache).
With `rollout.vllm_sleep_mode` the engine frees its share while the trainer steps; without it the share is
held throughout. A fixed 1 GiB covers the CUDA context and allocator slack (an assumption, not measured here).

Sharded over N processes (`rlopt train --nproc N`, FSDP2, one GPU each): the fp32 weights, gradients, optimizer
state and reference are split N ways (`fully_shard` cuts every tensor along its first dimension); each rank forwards
its own micro-batches, so activations and the log-prob pass are those of one micro-batch as before; FSDP adds the
parameters it gathers (in the compute dtype: the embedding/lm_head unit and two decoder blocks, the one running and
the one prefetched) and one unsharded fp32 gradient before its reduce-scatter (the embedding's, or a block's); each
rank's colocated vLLM engine holds the whole model. These FSDP terms follow FSDP2's documented behaviour and are
not measured here (no GPU; the CPU tests run fp32 on two processes).

Simplifications: prompts are assumed `prompt_tokens` long (recipes do not bound them); attention is assumed to
use a memory-efficient kernel (no tokens^2 term: true of sdpa on CUDA and of flash attention); vLLM's own
activation reserve is a fixed 1.5 GiB; bf16-autocast byte counts follow the same accounting with bf16 linear
outputs but are validated on CPU in fp32 only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlopt_cli.config.optimizers import expected_state_bytes_per_param
from rlopt_cli.errors import RloptError

GIB = 1024**3
CONTEXT_BYTES = 1 * GIB  # CUDA context + allocator slack (assumed)
VLLM_RESERVE_BYTES = int(1.5 * GIB)  # vLLM's activation/sampler reserve inside its share (assumed)
# Usable memory per card as nvidia-smi reports it (MiB).
GPUS = {
    "h100-80gb": 81_559 * 2**20,
    "a100-80gb": 81_920 * 2**20,
    "a100-40gb": 40_960 * 2**20,
    "l40s-48gb": 46_068 * 2**20,
    "rtx4090-24gb": 24_564 * 2**20,
}


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer (Llama/Qwen family) as its config.json describes it."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's queries and keys
    attn_bias: bool = False  # Qwen2/2.5: q/k/v biases

    @property
    def params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h  # attention, MLP, two norms
        layer += (q + 2 * kv) * self.attn_bias + 2 * self.head_dim * self.qk_norm
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def kv_bytes_per_token(self, size: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * size

    def layer_elements_per_token(self) -> tuple[int, int]:
        """What autograd keeps for one decoder layer, per token, without checkpointing: (fp32 elements, elements
        in the compute dtype). fp32: the residual stream and the RMSNorms' fp32 internals (input, normalised);
        compute dtype: q/k/v, their rotated copies (rotate_half and the result), attention's output and its
        contiguous copy, the norms' outputs, the MLP's gate, up, act(gate) and product."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        fp32 = 2 * (2 * h)  # per RMSNorm: its input and the normalised value
        compute = 2 * h  # the two norms' outputs (the linears' inputs)
        compute += q + 2 * kv  # q, k, v
        compute += 2 * q + 2 * kv  # rotate_half(q), q rotated, the same for k
        compute += 2 * q  # attention output and its contiguous copy (o_proj's input)
        compute += 4 * self.intermediate  # gate, up, act(gate), act(gate) * up
        if self.qk_norm:
            fp32 += 2 * (q + kv)  # per-head RMSNorm: input and normalised value, for q and k
        return fp32, compute


def shape_from_config(config: dict[str, Any]) -> Shape:
    """A Shape from a Hugging Face config.json (text config of a multimodal one)."""
    c = config.get("text_config", config)
    try:
        heads = int(c["num_attention_heads"])
        return Shape(
            vocab=int(c["vocab_size"]),
            hidden=int(c["hidden_size"]),
            intermediate=int(c["intermediate_size"]),
            layers=int(c["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
            tied=bool(c.get("tie_word_embeddings", False)),
            qk_norm=c.get("model_type") == "qwen3",
            attn_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise RloptError(f"config.json lacks a decoder shape field ({err}); is it a causal LM?") from None


# The models the recipes name, from their config.json files (no hub access here).
KNOWN_SHAPES = {
    "qwen3-0.6b": Shape(151_936, 1024, 3072, 28, 16, 8, 128, tied=True, qk_norm=True),
    "qwen3-1.7b": Shape(151_936, 2048, 6144, 28, 16, 8, 128, tied=True, qk_norm=True),
    "qwen3-4b": Shape(151_936, 2560, 9728, 36, 32, 8, 128, tied=True, qk_norm=True),
    "qwen3-8b": Shape(151_936, 4096, 12288, 36, 32, 8, 128, tied=False, qk_norm=True),
    "qwen2.5-0.5b": Shape(151_936, 896, 4864, 24, 14, 2, 64, tied=True, attn_bias=True),
    "qwen2.5-1.5b": Shape(151_936, 1536, 8960, 28, 12, 2, 128, tied=True, attn_bias=True),
    "smollm2-135m": Shape(49_152, 576, 1536, 30, 9, 3, 64, tied=True),
}


def resolve_shape(name_or_path: str) -> Shape:
    """config.json of a local folder, else the known shape of the folder's or hub id's last part
    (`-Instruct`/`-Base` ignored), else an error listing the known ones."""
    folder = Path(name_or_path)
    if (folder / "config.json").is_file():
        return shape_from_config(json.loads((folder / "config.json").read_text()))
    key = folder.name.lower().removesuffix("-instruct").removesuffix("-base")
    if key in KNOWN_SHAPES:
        return KNOWN_SHAPES[key]
    raise RloptError(
        f"no config.json in {name_or_path} and no known shape for {folder.name!r}; known: "
        f"{', '.join(KNOWN_SHAPES)} (or point model.name_or_path at a folder with config.json)"
    )


def activation_parts(
    shape: Shape,
    tokens: int,
    compute_size: int,
    checkpointing: bool,
    prompt_kv_tokens: int = 0,
    forwards: int = 1,
) -> tuple[int, int]:
    """One micro-batch's decoder activations over `tokens` forwarded tokens: (kept from forward until backward
    reaches them, transient in backward).

    Kept: with checkpointing each layer's fp32 input, without it every layer's activations; around the layers
    the final norm's input and normalised value, the hidden states handed to lm_head and the residual gradient
    (4 x H fp32 per token); and, on the KV-cache route, the prompts' keys/values repeated over each group
    (`prompt_kv_tokens` = rows x prompt tokens). Transient: with checkpointing one layer's activations,
    recomputed in backward, and the MLP's gradients in flight (two of [tokens, I] at once); or, at the end, the
    embedding's dense [V, H] fp32 gradient, one per decoder forward (`forwards`: 2 on the KV-cache route),
    whichever is larger (measured: at a 151,936-token vocabulary and width 128 the embedding's wins)."""
    fp32, compute = shape.layer_elements_per_token()
    layer = tokens * (4 * fp32 + compute_size * compute)
    around = 4 * tokens * shape.hidden * 4
    prompt_kv = prompt_kv_tokens * shape.kv_bytes_per_token(compute_size)
    in_flight = 2 * tokens * shape.intermediate * compute_size
    embedding = forwards * shape.vocab * shape.hidden * 4
    if checkpointing:
        kept = shape.layers * tokens * shape.hidden * 4 + around + prompt_kv
        return kept, max(layer + in_flight, embedding)
    return shape.layers * layer + around + prompt_kv, max(in_flight, embedding)


def logprob_pass_bytes(shape: Shape, positions: int, chunk: int, compute_size: int) -> int:
    """Peak of the log-prob pass (rlopt_cli/algo/lm_head.py) over `positions` positions, `chunk` at a time (0:
    all at once). Backward holds three fp32 [chunk, V] tensors at once (the log-softmax output, its gradient and
    the logits' gradient), plus the compute-dtype logits under autocast, plus lm_head's weight-gradient
    temporary [V, H] before it is added into the gradient (fp32, and a bf16 one under autocast)."""
    rows = positions if chunk <= 0 else min(chunk, positions)
    extra = compute_size if compute_size != 4 else 0
    return rows * shape.vocab * (12 + extra) + shape.vocab * shape.hidden * (4 + extra)


def micro_batch_peak(shape: Shape, kept: int, transient: int, logprob_pass: int) -> int:
    """A micro-batch's forward/backward peak above weights and gradients: lm_head's backward comes first, the
    decoder's after, so their transients do not add up. With tied embeddings autograd sums lm_head's weight
    gradient in a [V, H] fp32 buffer until the embedding's gradient arrives, at the decoder's end: that buffer
    stays through the decoder's backward (measured, benchmarks/bench_memory_plan.py)."""
    tied_buffer = shape.vocab * shape.hidden * 4 if shape.tied else 0
    return kept + max(transient + tied_buffer, logprob_pass)


@dataclass(frozen=True)
class Plan:
    items: dict[str, int]  # component -> bytes
    phases: dict[str, int]  # phase -> peak bytes on the device
    card: int
    vllm_kv_tokens: int
    sequence_tokens: int

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.card and self.vllm_kv_tokens >= self.sequence_tokens


def fsdp_buffers(shape: Shape, compute_size: int) -> int:
    """What FSDP2 holds beyond the shards at its peak: gathered parameters in the compute dtype (the
    embedding's unit, or lm_head's, and two decoder blocks: the one running and the one prefetched) and one
    unsharded fp32 gradient awaiting its reduce-scatter (the embedding's is the largest)."""
    block = (
        shape.params - shape.vocab * shape.hidden * (1 if shape.tied else 2) - shape.hidden
    ) // shape.layers
    embedding = shape.vocab * shape.hidden
    return compute_size * (embedding + 2 * block) + 4 * max(block, embedding)


def plan(cfg: Any, shape: Shape, optimizer: str, card: int, prompt_tokens: int, world_size: int = 1) -> Plan:
    """The itemized estimate for `cfg` (a RunConfig) with `optimizer` ('sgd' or 'adamw', its recipe arguments
    otherwise) on one of `world_size` cards of `card` bytes (FSDP2 over world_size > 1 processes)."""
    g, p = cfg.grpo, shape.params
    shard = -(-p // world_size)  # parameters per rank: FSDP2 pads every tensor's shards to equal sizes
    compute = 2 if cfg.train.precision == "bf16-autocast" else 4
    rows, group, length = g.micro_batch_size or g.batch_size, g.num_generations, g.max_completion_length
    grouped = g.share_prompt_forward and rows % group == 0
    packed = grouped and prompt_tokens + group * (length - 1) <= g.pack_max_tokens
    if packed:
        tokens, kv_tokens = rows // group * (prompt_tokens + group * (length - 1)), 0
    elif grouped:
        tokens, kv_tokens = rows // group * prompt_tokens + rows * (length - 1), rows * prompt_tokens
    else:
        tokens, kv_tokens = rows * (prompt_tokens + length), 0
    extra = cfg.optimizer.extra_args if cfg.optimizer.name == optimizer else {}
    forwards = 2 if kv_tokens else 1
    kept, transient = activation_parts(
        shape, tokens, compute, cfg.model.gradient_checkpointing, kv_tokens, forwards
    )
    largest = max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate)  # AdamW's sqrt temporary
    ref_size = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}[g.ref_dtype]
    vllm_share = int(cfg.rollout.gpu_memory_utilization * card) if cfg.rollout.backend == "vllm" else 0
    vllm_size = 4 if cfg.rollout.vllm_dtype == "float32" else 2
    items = {
        "weights (fp32 master)": 4 * shard,
        "gradients (fp32)": 4 * shard,
        "optimizer state": expected_state_bytes_per_param(optimizer, extra) * shard,
        "optimizer step temporary": 0 if optimizer == "sgd" else 4 * -(-largest // world_size),
        "reference model": ref_size * shard if g.beta > 0 else 0,
        "FSDP gathered + unreduced": fsdp_buffers(shape, compute) if world_size > 1 else 0,
        "activations": kept + transient,
        "log-prob pass": logprob_pass_bytes(shape, rows * length, g.logprob_chunk_tokens, compute),
        "vLLM weights": vllm_size * p if vllm_share else 0,
        "vLLM KV cache": max(0, vllm_share - vllm_size * p - VLLM_RESERVE_BYTES) if vllm_share else 0,
        "vLLM reserve": min(VLLM_RESERVE_BYTES, vllm_share),
        "CUDA context + slack": CONTEXT_BYTES,
    }
    resident_ref = items["reference model"] if not g.ref_offload else 0
    base = items["weights (fp32 master)"] + items["optimizer state"] + items["CUDA context + slack"]
    asleep = cfg.rollout.vllm_sleep_mode and cfg.rollout.backend == "vllm"
    engine = 0 if asleep else vllm_share
    phases = {
        "training": base
        + items["gradients (fp32)"]
        + resident_ref
        + items["FSDP gathered + unreduced"]
        + micro_batch_peak(shape, kept, transient, items["log-prob pass"])
        + engine,
        "optimizer step": base
        + items["gradients (fp32)"]
        + items["optimizer step temporary"]
        + resident_ref
        + engine,
        "reference pass": base + items["reference model"] + items["FSDP gathered + unreduced"] + engine,
        "rollout": base + resident_ref + vllm_share,
    }
    kv_tokens_held = items["vLLM KV cache"] // shape.kv_bytes_per_token(vllm_size) if vllm_share else 0
    return Plan(items, phases, card, kv_tokens_held if vllm_share else 10**12, prompt_tokens + length)
