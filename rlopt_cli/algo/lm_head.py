"""Log-probs of given tokens from a causal LM's final hidden states, a chunk of positions at a time, exactly.

Why: the logits of a micro-batch are [tokens, vocab] floats. At the paper's setting (8 rows x 3,072 tokens,
Qwen3's 151,936-token vocabulary) that is 15 GB in fp32, and autograd keeps the fp32 log-softmax output (and, in
backward, its gradient) beside it. Here lm_head, the temperature, log_softmax and the gather run over `chunk`
positions at a time, each chunk under `torch.utils.checkpoint`: a chunk's logits live only while that chunk is
computed, forward and again in backward, which recomputes them instead of keeping them. The pass then holds about
4 x chunk x vocab floats at its peak however long the micro-batch, for one extra lm_head matmul in backward.

Exact: every position goes through the same ops as in the plain computation (`chunk = 0`); only lm_head's weight
gradient is summed chunk by chunk, so it agrees to float rounding (tests/test_real_archs.py). Tied embeddings
need nothing special: lm_head's weight is the embedding's Parameter, and its two gradients add up in autograd.

Simplification: models whose logits are more than lm_head(hidden) (Gemma's soft-capping, Cohere's logit scale)
are refused rather than reproduced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from rlopt_cli.errors import RloptError

# Config attributes that make a model's logits differ from lm_head(hidden): refused, not silently mis-scored.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def output_head(model: Any) -> Any:
    """The module that turns final hidden states into logits (`lm_head`, tied or not)."""
    config = model.config.get_text_config(decoder=True)
    for name in LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise RloptError(
                f"{type(model).__name__} transforms its logits ({name}), which rlopt's log-prob pass does "
                "not reproduce; use a Llama/Qwen-family model"
            )
    return model.get_output_embeddings()


def gathered_logprobs(h: torch.Tensor, ids: torch.Tensor, head: Any, temperature: float) -> torch.Tensor:
    """log softmax(head(h) / temperature)[ids]: h [C, H], ids [C] -> [C], fp32."""
    logits = head(h).float()  # [C, V]; a new tensor under bf16 autocast, lm_head's own output in fp32
    if temperature != 1.0:
        # In place: neither lm_head nor the cast keeps its output for backward, so this saves a [C, V] copy.
        logits = logits.div_(temperature)
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [C]


def token_logprobs_from_hidden(
    hidden: torch.Tensor, ids: torch.Tensor, head: Any, temperature: float, chunk: int
) -> torch.Tensor:
    """hidden [N, L, H] (the state that predicts each of ids [N, L]) -> log-probs [N, L] in fp32.

    `chunk` > 0: positions in chunks of that many, each checkpointed when gradients are on; 0: all at once, the
    plain computation (autograd keeps the whole fp32 log-softmax)."""
    n, length, width = hidden.shape
    flat = hidden.reshape(n * length, width)  # [N*L, H]
    flat_ids = ids.reshape(n * length)  # [N*L]
    if chunk <= 0:
        return gathered_logprobs(flat, flat_ids, head, temperature).view(n, length)
    needs_graph = torch.is_grad_enabled() and (flat.requires_grad or head.weight.requires_grad)
    parts = []
    for start in range(0, n * length, chunk):
        h, t = flat[start : start + chunk], flat_ids[start : start + chunk]  # [C, H], [C]
        if needs_graph:  # backward replays this chunk's logits; lm_head draws no random numbers
            part = checkpoint(
                gathered_logprobs, h, t, head, temperature, use_reentrant=False, preserve_rng_state=False
            )
        else:
            part = gathered_logprobs(h, t, head, temperature)
        parts.append(part)
    return torch.cat(parts).view(n, length)  # [N, L]
