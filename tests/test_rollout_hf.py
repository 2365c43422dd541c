"""The transformers sampler (`rollout.hf.sample`): batched KV-cache decoding against transformers' `generate`."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_decoding_of_left_padded_prompts_matches_generate(attention: str) -> None:
    # Prompts of three lengths (left padding up to 3 tokens), a random model so that completions run to the
    # length limit: our prefill-once, finished-rows-dropped, ready-4D-mask decoding must give generate's tokens.
    from rlopt_cli.config import ModelConfig
    from rlopt_cli.models import build_char_tokenizer, build_embedded_model
    from rlopt_cli.rollout.hf import HFBackend

    tok = build_char_tokenizer()
    model = build_embedded_model(
        ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, init_seed=3),
        len(tok),
        tok,
    ).eval()
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
