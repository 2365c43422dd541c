"""GRPO math against numbers computed by hand (the comments show the arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from rlopt_cli.algo import grpo


def test_group_advantages_group_scaling() -> None:
    # group 1: rewards (1, 0): mean 0.5, unbiased std sqrt(0.5) = 0.70711 -> +-0.5 / (0.70711 + 1e-4)
    # group 2: rewards (1, 1): mean 1, std 0 -> 0 / (0 + 1e-4) = 0
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, "group")
    expected = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert adv.tolist() == pytest.approx([expected, -expected, 0.0, 0.0], abs=1e-6)


def test_group_advantages_batch_and_none() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # none: only centred within each group
    assert grpo.group_advantages(rewards, 2, "none").tolist() == [0.5, -0.5, 0.0, 0.0]
    # batch: std of all four rewards: mean 0.75, squares .0625+.5625+.0625+.0625 = .75, /3 -> std 0.5
    batch = grpo.group_advantages(rewards, 2, "batch")
    assert batch.tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError):
        grpo.group_advantages(rewards, 2, "nope")


def test_per_token_loss_clipping_cases() -> None:
    # columns: (A=+1, rho=1.5) (A=-1, rho=0.5) (A=+1, rho=0.5) (A=-1, rho=1.5), epsilon 0.2
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    adv = torch.tensor([1.0])
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    old = torch.zeros(1, 4)
    # vary the advantage per token by scaling: run each column as its own sequence
    out = grpo.per_token_loss(torch.log(ratios).T, old.T, None, (adv * signs).flatten(), 0.2, 0.2, 0.0)
    # +1*1.5 clipped to 1.2 -> -1.2 ; -1*0.5: min(-0.5, -0.8) = -0.8 -> 0.8 ; +1*0.5 -> -0.5 ; -1*1.5 -> 1.5
    assert out.loss.flatten().tolist() == pytest.approx([-1.2, 0.8, -0.5, 1.5], abs=1e-6)
    assert out.clipped.flatten().tolist() == [True, True, False, False]
    assert out.kl.abs().sum() == 0


def test_epsilon_high_is_separate() -> None:
    out = grpo.per_token_loss(
        torch.log(torch.tensor([[1.25]])), torch.zeros(1, 1), None, torch.tensor([1.0]), 0.2, 0.28, 0.0
    )
    assert float(out.loss) == pytest.approx(-1.25)  # 1.25 < 1.28: not clipped with epsilon_high = 0.28
    assert not bool(out.clipped)


def test_k3_kl_penalty() -> None:
    # ref - logp = log 2 -> k3 = 2 - log 2 - 1 = 0.306853 ; ratio 1 and A = 0 -> surrogate 0
    logp = torch.log(torch.tensor([[0.25]]))
    ref = torch.log(torch.tensor([[0.5]]))
    out = grpo.per_token_loss(logp, logp, ref, torch.tensor([0.0]), 0.2, 0.2, beta=0.1)
    assert float(out.kl) == pytest.approx(2 - math.log(2) - 1, abs=1e-6)
    assert float(out.loss) == pytest.approx(0.1 * (2 - math.log(2) - 1), abs=1e-6)


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("grpo", (1.5 + 4.0) / 2),  # per-sequence means 1.5 and 4, then their mean
        ("bnpo", 7 / 3),  # 7 over 3 active tokens
        ("dr_grpo", 7 / (2 * 3)),  # 7 over B * max_completion_length
        ("dapo", 7 / 3),  # 7 over the batch's active tokens
    ],
)
def test_aggregation_modes(loss_type: str, expected: float) -> None:
    value = grpo.aggregate(LOSS, MASK, loss_type, num_sequences=2, num_tokens=3, max_completion_length=3)
    assert float(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [("grpo", 2.75), ("dr_grpo", 7 / 6), ("dapo", 7 / 3), ("bnpo", (3 / 2 + 4 / 1) / 2)],
)
def test_micro_batches_add_up(loss_type: str, expected: float) -> None:
    # grpo, dr_grpo and dapo normalise by whole-batch counts, so two micro-batches sum to the full loss;
    # bnpo normalises each micro-batch by its own tokens (TRL's definition), which differs.
    parts = [
        grpo.aggregate(
            LOSS[i : i + 1],
            MASK[i : i + 1],
            loss_type,
            num_sequences=2,
            num_tokens=3,
            max_completion_length=3,
            num_micro_batches=2,
        )
        for i in range(2)
    ]
    assert float(sum(parts)) == pytest.approx(expected)


def test_token_logprobs_match_a_manual_forward() -> None:
    from rlopt_cli.config.schema import ModelConfig
    from rlopt_cli.models.loading import build_char_tokenizer, build_embedded_model

    tok = build_char_tokenizer()
    model = build_embedded_model(
        ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2), len(tok), tok
    ).eval()
    enc = tok(["1+2=", "12+34="], return_tensors="pt", padding=True)  # first row is left-padded
    completion = torch.tensor([[7, 2, 0], [8, 9, 2]])
    cmask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = grpo.token_logprobs(model, enc.input_ids, enc.attention_mask, completion, cmask)
    # row 1 without any padding, scored directly
    ids = torch.cat([enc.input_ids[1], completion[1]])[None]
    logits = model(input_ids=ids).logits[0, enc.input_ids.shape[1] - 1 : -1]
    want = torch.log_softmax(logits, -1).gather(-1, completion[1][:, None]).squeeze(-1)
    assert torch.allclose(got[1], want, atol=1e-5)
    # row 0: strip its left padding and compare too
    real = enc.input_ids[0][enc.attention_mask[0].bool()]
    ids0 = torch.cat([real, completion[0, :2]])[None]
    logits0 = model(input_ids=ids0).logits[0, len(real) - 1 : -1]
    want0 = torch.log_softmax(logits0, -1).gather(-1, completion[0, :2][:, None]).squeeze(-1)
    assert torch.allclose(got[0, :2], want0, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(("path", "pack_max_tokens", "forwards"), [("cache", 0, 2), ("packed", 512, 1)])
@pytest.mark.parametrize("length", [1, 2, 4])
def test_shared_prompt_forward_gives_the_same_logprobs_and_gradients(
    length: int, path: str, pack_max_tokens: int, forwards: int, attention: str
) -> None:
    # Three prompts of different lengths (left padding), G = 3 completions each, some ending early (EOS, pad):
    # forwarding each prompt once, through a repeated KV cache or packed with its group's completions under a
    # shared-prefix mask, must reproduce the per-row forward exactly.
    from rlopt_cli.config.schema import ModelConfig
    from rlopt_cli.models.loading import build_char_tokenizer, build_embedded_model

    tok = build_char_tokenizer()
    model = build_embedded_model(
        ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2), len(tok), tok
    )
    model.config._attn_implementation = attention
    group = 3
    enc = tok(["1+2=", "12+34=", "7+55="], return_tensors="pt", padding=True)
    prompt_ids = enc.input_ids.repeat_interleave(group, 0)  # [9, P]
    prompt_mask = enc.attention_mask.repeat_interleave(group, 0)
    gen = torch.Generator().manual_seed(0)
    completion = torch.randint(3, len(tok), (9, length), generator=gen)  # [9, L]
    cmask = torch.ones_like(completion)
    if length > 1:
        cmask[1, 1:] = 0  # ended early: the rest is padding
        cmask[5, 1:] = 0
    if length > 2:
        cmask[1, 2:] = 0
    calls: list[int] = []
    model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))  # one per forward

    def run(group_size: int, pack: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        calls.clear()
        logps = grpo.token_logprobs(model, prompt_ids, prompt_mask, completion, cmask, 0.7, group_size, pack)
        (logps * cmask * torch.linspace(-1, 1, 9)[:, None]).sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters()]

    plain, plain_grads = run(1, 0)
    shared, shared_grads = run(group, pack_max_tokens)
    assert len(calls) == (1 if length == 1 else forwards)  # the path named was the one taken
    assert torch.isfinite(shared).all()
    assert torch.allclose(shared * cmask, plain * cmask, atol=1e-5)
    for a, b in zip(shared_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert max(float(g.abs().max()) for g in plain_grads) > 1e-3  # the gradients compared are not all zero


def test_groups_longer_than_pack_max_tokens_go_through_the_cache() -> None:
    # P + G x (L-1) = 7 + 2 x 3 = 13 tokens: packed at 13, two forwards (prompt, then completions) at 12; the
    # same holds for a sliding window shorter than the packed group, and for flash attention (padding masks only).
    from rlopt_cli.config.schema import ModelConfig
    from rlopt_cli.models.loading import build_char_tokenizer, build_embedded_model, custom_attention_mask

    tok = build_char_tokenizer()
    model = build_embedded_model(
        ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2), len(tok), tok
    )
    enc = tok(["12+34="], return_tensors="pt")  # P = 7 with [BOS]
    prompt_ids, prompt_mask = enc.input_ids.repeat(2, 1), enc.attention_mask.repeat(2, 1)
    completion = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    calls: list[int] = []
    model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))  # one per forward

    def forwards(pack_max_tokens: int) -> int:
        calls.clear()
        ones = torch.ones_like(completion)
        grpo.token_logprobs(model, prompt_ids, prompt_mask, completion, ones, 1.0, 2, pack_max_tokens)
        return len(calls)

    assert (forwards(13), forwards(12), forwards(0)) == (1, 2, 2)
    model.config.sliding_window = 12
    assert forwards(13) == 2
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"  # packing falls back, as with the window above
    assert custom_attention_mask(model, torch.ones(1, 2, 2, dtype=torch.bool)) is None


def test_shared_prompt_forward_refuses_rows_that_are_not_groups() -> None:
    from rlopt_cli.config.schema import ModelConfig
    from rlopt_cli.models.loading import build_char_tokenizer, build_embedded_model

    tok = build_char_tokenizer()
    model = build_embedded_model(
        ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2), len(tok), tok
    )
    enc = tok(["1+2=", "3+4="], return_tensors="pt", padding=True)  # two prompts, one row each
    completion = torch.tensor([[5, 6], [7, 8]])
    with pytest.raises(ValueError, match="groups of 2"):
        grpo.token_logprobs(
            model, enc.input_ids, enc.attention_mask, completion, torch.ones_like(completion), 1.0, 2
        )


@pytest.mark.parametrize("group_size", [1, 3])
def test_a_micro_batch_is_trimmed_to_its_own_longest_row(group_size: int) -> None:
    # The same rows with two more columns of left padding on every prompt and three more of right padding on
    # every completion (as when the micro-batch's rows are all shorter than the rollout's longest): the trimmed
    # pass gives the numbers and gradients of the untrimmed one, and 0 past the rows' longest completion.
    from rlopt_cli.config.schema import ModelConfig
    from rlopt_cli.models.loading import build_char_tokenizer, build_embedded_model

    tok = build_char_tokenizer()
    model = build_embedded_model(
        ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2), len(tok), tok
    )
    enc = tok(["1+2=", "12+34="], return_tensors="pt", padding=True)
    prompt_ids = enc.input_ids.repeat_interleave(3, 0)  # [6, P]
    prompt_mask = enc.attention_mask.repeat_interleave(3, 0)
    completion = torch.randint(3, len(tok), (6, 4), generator=torch.Generator().manual_seed(0))  # [6, 4]
    cmask = torch.ones_like(completion)
    cmask[2, 2:] = 0
    pad = tok.pad_token_id
    wide = (
        torch.cat([torch.full((6, 2), pad), prompt_ids], 1),
        torch.cat([torch.zeros(6, 2, dtype=prompt_mask.dtype), prompt_mask], 1),
        torch.cat([completion, torch.full((6, 3), pad)], 1),
        torch.cat([cmask, torch.zeros(6, 3, dtype=cmask.dtype)], 1),
    )
    assert grpo.trim(*wide)[0].shape == prompt_ids.shape and grpo.trim(*wide)[2].shape == completion.shape

    def plain() -> tuple[torch.Tensor, list[torch.Tensor]]:
        # the untrimmed computation: the model's full logits over the wide batch
        model.zero_grad(set_to_none=True)
        attention = torch.cat([wide[1], wide[3]], 1)
        logits = model(
            input_ids=torch.cat([wide[0], wide[2]], 1),
            attention_mask=attention,
            position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        ).logits[:, wide[0].shape[1] - 1 : -1]
        logps = torch.log_softmax(logits.float(), -1).gather(-1, wide[2][..., None]).squeeze(-1) * wide[3]
        (logps * torch.linspace(-1, 1, 6)[:, None]).sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters()]

    def trimmed() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logps = grpo.token_logprobs(model, *wide, 1.0, group_size, 0, 4)  # [6, 7]
        assert logps.shape == (6, 7) and not logps[:, 4:].any()  # the trimmed columns score 0
        logps = logps * wide[3]
        (logps * torch.linspace(-1, 1, 6)[:, None]).sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters()]

    (want, want_grads), (got, grads) = plain(), trimmed()
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(grads, want_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_sampler_weights_truncate_or_mask_the_trainer_to_engine_ratio() -> None:
    """pi_trainer / pi_sampler per token (or per completion, the product), capped or cut at the bound as TRL's
    vllm_importance_sampling modes; tokens past the mask weigh 1."""
    trainer = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))  # [2, 3]
    sampler = torch.log(torch.tensor([[0.25, 0.5, 0.9], [0.1, 0.5, 0.5]]))  # ratios 2, 1, 5/9 | 5, 1, 1
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w = grpo.sampler_weights(trainer, sampler, mask, "token_truncate", 3.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, 5 / 9], [3.0, 1.0, 1.0]]))
    w = grpo.sampler_weights(trainer, sampler, mask, "token_mask", 3.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, 5 / 9], [0.0, 1.0, 1.0]]))
    w = grpo.sampler_weights(
        trainer, sampler, mask, "sequence_truncate", 3.0
    )  # rows: 2 * 5/9 = 10/9 | 5 -> 3
    assert torch.allclose(w, torch.tensor([[10 / 9] * 3, [3.0] * 3]))
    w = grpo.sampler_weights(trainer, sampler, mask, "sequence_mask", 3.0)
    assert torch.allclose(w, torch.tensor([[10 / 9] * 3, [0.0] * 3]))
    assert not grpo.sampler_weights(
        trainer.requires_grad_(), sampler, mask, "token_truncate", 3.0
    ).requires_grad
