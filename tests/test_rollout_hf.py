"""The transformers sampler (`rollout.hf.sample`): batched KV-cache decoding against transformers' `generate`."""

from __future__ import annotations

from typing import Any

import pytest
import torch


def tiny_model(init_seed: int) -> tuple[Any, Any]:
    """A random 2-layer embedded model in eval mode, and its tokenizer."""
    from rlopt_cli.config.schema import ModelConfig
    from rlopt_cli.models.loading import build_char_tokenizer, build_embedded_model

    tok = build_char_tokenizer()
    config = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, init_seed=init_seed)
    return build_embedded_model(config, len(tok), tok).eval(), tok


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_decoding_of_left_padded_prompts_matches_generate(attention: str) -> None:
    # Prompts of three lengths (left padding up to 3 tokens), a random model so that completions run to the
    # length limit: our prefill-once, finished-rows-dropped, ready-4D-mask decoding must give generate's tokens.
    from rlopt_cli.rollout.hf import HFBackend

    model, tok = tiny_model(init_seed=3)
    model.config._attn_implementation = attention
    prompts = ["1+2=", "12+34=", "7+55=", "9+9="]
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    theirs = out[:, enc.input_ids.shape[1] :]  # [4, <=8]
    ours = HFBackend(model, tok).generate(prompts, 2, 8, 0.0, seed=0)
    assert ours.completion_ids.shape[1] == 8  # some row ran to the limit: every decode step was exercised
    for i in range(len(prompts)):
        want = theirs[i][: int(ours.completion_mask[2 * i].sum())]
        assert ours.completion_ids[2 * i, : len(want)].tolist() == want.tolist()
        assert torch.equal(ours.completion_ids[2 * i], ours.completion_ids[2 * i + 1])  # greedy: both samples


def reference_sample(
    model: Any, tok: Any, prompts: list[str], n: int, max_new_tokens: int, generator: torch.Generator
) -> torch.Tensor:
    """The sampler with nothing shared: every row's whole prefix forwarded at every step, no cache."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, attention = enc.input_ids.repeat_interleave(n, 0), enc.attention_mask.repeat_interleave(n, 0)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    finished = torch.zeros(len(ids), dtype=torch.bool)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, -1]
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
            token = torch.where(finished, torch.full_like(token, pad), token)
            out.append(token)
            finished |= token == eos
            if finished.all():
                break
            ids = torch.cat([ids, token[:, None]], 1)
            attention = torch.cat([attention, torch.ones_like(token)[:, None]], 1)
    return torch.stack(out, 1)


def test_sampling_with_shared_prefixes_draws_what_unshared_sampling_draws() -> None:
    # A sharp policy (weights scaled up) so that samples of one prompt often agree on their first tokens and share
    # a prefix node, then split; some finish early. Same seed: the same tokens as the sampler that shares nothing.
    from rlopt_cli.rollout.hf import sample

    model, tok = tiny_model(init_seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
        model.lm_head.weight[tok.eos_token_id] += 0.3  # some rows end early
    prompts = ["1+2=", "12+34=", "7+55="]
    seen_split = 0
    for seed in range(6):
        ours = sample(model, tok, prompts, 6, 7, 1.0, torch.Generator().manual_seed(seed))
        theirs = reference_sample(model, tok, prompts, 6, 7, torch.Generator().manual_seed(seed))
        assert ours.completion_ids.tolist() == theirs.tolist()
        for group in ours.completion_ids.view(3, 6, -1).tolist():
            for i, a in enumerate(group):
                for b in group[i + 1 :]:
                    seen_split += a[0] == b[0] and a != b  # shared a prefix node, then split
    assert seen_split > 0  # samples shared a prefix node, then split
    assert (ours.completion_mask.sum(1) < ours.completion_ids.shape[1]).any()  # and some rows finished early
