"""Batched sampling with the live transformers model and its KV cache.

One prefill over the distinct left-padded prompts, then one batched forward per new token over the distinct
prefixes of the rows still generating (samples of one prompt that drew the same tokens so far share a row and
its KV cache until they differ); no per-sample Python loops. Sampling draws from an explicit
`torch.Generator` seeded per call, so a seed fixes every completion. Temperature 0 means greedy.

With `prompt_seeds` (rollout.seed_scope = "prompt") each prompt's completions draw from their own generator
instead: its uniforms, pre-drawn [n, max_new_tokens] on the host, pick each token by inverse CDF, so a
completion does not depend on which other prompts share the call (or the process, in a sharded run). Under
FSDP every forward is collective: `agree` (all ranks finished?) keeps a rank whose rows all finished forwarding
a one-token dummy until every rank's rows finished.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlopt_cli.models.loading import cache_argument, custom_attention_mask, encode_prompts, returned_cache
from rlopt_cli.rollout.base import Rollout


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
    templated: bool = False,
    uniforms: torch.Tensor | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> Rollout:
    """n completions of each prompt. `templated`: the prompts went through the chat template (`encode_prompts`);
    `uniforms` [N, max_new_tokens]: each row's own draws (inverse-CDF sampling) instead of `generator`;
    `agree(done)`: whether every rank is done (a sharded run), else this call's own `done`."""
    device = next(model.parameters()).device
    enc = encode_prompts(tokenizer, prompts, templated)
    prompt_ids = enc.input_ids.repeat_interleave(n, 0).to(device)  # [N, P]
    prompt_mask = enc.attention_mask.repeat_interleave(n, 0).to(device)  # [N, P]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    batch = prompt_ids.shape[0]

    cache_arg = cache_argument(model)
    # The model forwards one row per distinct prefix, a node: first each distinct prompt (prefilled once for its n
    # samples), then each distinct (node, sampled token) pair among the rows still generating. Rows that sampled
    # the same tokens so far have the same inputs, so their logits are computed once; finished rows are dropped.
    # Sampling still draws for every row (a finished row's draw is discarded), so the generator advances as it
    # would with every row forwarded on its own, and a seed fixes the completions.
    attention = enc.attention_mask.to(device)  # [U, P+t] per node
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [U, P]: left padding shifts positions
    out = model(
        input_ids=enc.input_ids.to(device),  # [U, P]
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = returned_cache(out)
    step_logits = out.logits[:, -1, :]  # [U, V]
    vocab = step_logits.shape[-1]
    node = torch.arange(len(prompts), device=device).repeat_interleave(n)  # [N] each row's node
    logits = torch.zeros(batch, vocab, device=device)  # [N, V]; finished rows keep their last
    tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)  # [N, L]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # [N]
    for t in range(max_new_tokens):
        live = ~finished  # [N]
        logits[live] = step_logits[node[live]].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            if uniforms is None:
                next_tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [N]
            else:
                next_tok = inverse_cdf(probs, uniforms[:, t])  # [N]
        else:
            next_tok = logits.argmax(-1)
        next_tok = torch.where(finished, torch.full_like(next_tok, pad), next_tok)
        tokens[:, t] = next_tok
        finished |= next_tok == eos
        done = bool(finished.all())
        if (done if agree is None else agree(done)) or t == max_new_tokens - 1:
            tokens = tokens[:, : t + 1]
            break
        if done:  # other ranks still sample: join the forward whose all-gathers they wait on
            model(input_ids=tokens[:1, :1], use_cache=False)
            continue
        live = ~finished
        # the next nodes: distinct (node, token) pairs of the live rows, each extending its parent's cache
        pairs, node_of_live = torch.unique(node[live] * vocab + next_tok[live], return_inverse=True)  # [U']
        parent = pairs // vocab  # [U']
        node[live] = node_of_live
        if not torch.equal(parent, torch.arange(len(attention), device=device)):  # a node split or finished
            cache.batch_select_indices(parent)  # copies the cache: skipped while every node just extends
            attention, positions = attention[parent], positions[parent]
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1  # [U', 1]
        # One query per node sees every real key: handing the model that 4D mask ready-made skips transformers'
        # mask building at every token (same logits). Flash attention takes the padding mask as it is.
        ready = custom_attention_mask(model, attention.bool()[:, None, :])  # [U', 1, 1, P+t+1]
        out = model(
            input_ids=(pairs % vocab)[:, None],  # [U', 1]
            attention_mask=attention if ready is None else ready,
            position_ids=positions,
            use_cache=True,
            **{cache_arg: cache},
        )
        cache = returned_cache(out)
        step_logits = out.logits[:, -1, :]  # [U', V]
    mask = completion_mask(tokens, eos)
    texts = tokenizer.batch_decode(tokens.masked_fill(tokens == eos, pad), skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, tokens, mask, truncated=~finished, texts=texts)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [N, V], uniforms [N] in [0, 1) -> the token whose CDF interval holds each uniform: [N]."""
    cdf = probs.cumsum(-1)  # [N, V]
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)  # [N, 1]: scaled, as the CDF may end a hair off 1
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def prompt_uniforms(prompt_seeds: list[int], n: int, max_new_tokens: int) -> torch.Tensor:
    """[len(prompt_seeds) * n, max_new_tokens] uniforms: prompt i's n rows from its own host generator."""
    return torch.cat(
        [torch.rand(n, max_new_tokens, generator=torch.Generator().manual_seed(s)) for s in prompt_seeds]
    )


class HFBackend:
    """Generation with the trainer's own model object: its weights are always the current ones. `templated`:
    the prompts it is given went through the chat template (`models.loading.uses_chat_template`); `agree`: the
    all-ranks-finished vote of a sharded run (rlopt_cli/runtime/distributed.py), None in one process."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        templated: bool = False,
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.templated, self.agree = model, tokenizer, templated, agree

    def generate(
        self,
        prompts: list[str],
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        prompt_seeds: list[int] | None = None,
    ) -> Rollout:
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        uniforms = None
        if prompt_seeds is not None and temperature > 0:
            uniforms = prompt_uniforms(prompt_seeds, n, max_new_tokens).to(device)  # [N, L]
        was_training = self.model.training
        self.model.eval()
        try:
            rollout = sample(
                self.model,
                self.tokenizer,
                prompts,
                n,
                max_new_tokens,
                temperature,
                generator,
                self.templated,
                uniforms,
                self.agree,
            )
            return rollout.normal_tensors()
        finally:
            self.model.train(was_training)

    def sync_weights(self, model: Any) -> None:
        """Nothing to do: this backend samples with the live model."""

    def close(self) -> None:
        """Nothing to release: the model is the trainer's."""
