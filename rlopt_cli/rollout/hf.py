"""Batched sampling with the live transformers model and its KV cache.

One prefill over the distinct left-padded prompts, whose KV cache is repeated n times, then one batched forward
per new token over the rows still generating; no per-sample Python loops. Sampling draws from an explicit
`torch.Generator` seeded per call, so a seed fixes every completion. Temperature 0 means greedy.
"""

from __future__ import annotations

from typing import Any

import torch

from rlopt_cli.models import cache_argument, custom_attention_mask, returned_cache
from rlopt_cli.rollout import Rollout


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on tokens up to and including the first EOS of each row, 0 after it."""
    is_eos = (completion_ids == eos_id).int()  # [N, L]
    eos_before = is_eos.cumsum(-1) - is_eos  # [N, L] EOS tokens strictly before each position
    return (eos_before == 0).int()


@torch.inference_mode()  # lighter than no_grad: no version counters or view tracking on the many small ops
def sample(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    n: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
) -> Rollout:
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    prompt_ids = enc.input_ids.repeat_interleave(n, 0).to(device)  # [N, P]
    prompt_mask = enc.attention_mask.repeat_interleave(n, 0).to(device)  # [N, P]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    batch = prompt_ids.shape[0]

    cache_arg = cache_argument(model)
    # Prefill each distinct prompt once, then repeat its KV cache n times: n x less prefill compute.
    unique_ids, unique_mask = enc.input_ids.to(device), enc.attention_mask.to(device)  # [N/n, P]
    out = model(
        input_ids=unique_ids,
        attention_mask=unique_mask,
        position_ids=(unique_mask.cumsum(-1) - 1).clamp(min=0),  # left padding shifts positions
        use_cache=True,
        logits_to_keep=1,
    )
    cache = returned_cache(out)
    cache.batch_repeat_interleave(n)
    step_logits = out.logits[:, -1, :].repeat_interleave(n, 0)  # [N, V]
    # The model forwards only the rows still generating: `rows` maps them back to the batch. Sampling still
    # draws for every row (a finished row's draw is discarded), so the generator advances as with all rows.
    rows = torch.arange(batch, device=device)  # [A]
    attention = prompt_mask  # [A, P+t]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [A, P]
    logits = torch.zeros(batch, step_logits.shape[-1], device=device)  # [N, V]; finished rows keep their last
    tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)  # [N, L]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # [N]
    for t in range(max_new_tokens):
        logits[rows] = step_logits.float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [N]
        else:
            next_tok = logits.argmax(-1)
        next_tok = torch.where(finished, torch.full_like(next_tok, pad), next_tok)
        tokens[:, t] = next_tok
        finished |= next_tok == eos
        if finished.all() or t == max_new_tokens - 1:
            tokens = tokens[:, : t + 1]
            break
        still = (~finished[rows]).nonzero().squeeze(1)  # [A'] positions among the forwarded rows
        if still.numel() < rows.numel():  # drop the rows that just finished, from the cache too
            cache.batch_select_indices(still)
            rows, attention, positions = rows[still], attention[still], positions[still]
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        # One query per row sees every real key: handing the model that 4D mask ready-made skips transformers'
        # mask building at every token (same logits). Flash attention takes the padding mask as it is.
        ready = custom_attention_mask(model, attention.bool()[:, None, :])  # [A, 1, 1, P+t+1]
        out = model(
            input_ids=next_tok[rows, None],
            attention_mask=attention if ready is None else ready,
            position_ids=positions,
            use_cache=True,
            **{cache_arg: cache},
        )
        cache = returned_cache(out)
        step_logits = out.logits[:, -1, :]  # [A, V]
    mask = completion_mask(tokens, eos)
    texts = tokenizer.batch_decode(tokens.masked_fill(tokens == eos, pad), skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, tokens, mask, truncated=~finished, texts=texts)


class HFBackend:
    """Generation with the trainer's own model object: its weights are always the current ones."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def generate(
        self, prompts: list[str], n: int, max_new_tokens: int, temperature: float, seed: int
    ) -> Rollout:
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        was_training = self.model.training
        self.model.eval()
        try:
            rollout = sample(self.model, self.tokenizer, prompts, n, max_new_tokens, temperature, generator)
            return rollout.normal_tensors()
        finally:
            self.model.train(was_training)

    def sync_weights(self, model: Any) -> None:
        """Nothing to do: this backend samples with the live model."""
