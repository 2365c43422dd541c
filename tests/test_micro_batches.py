"""Micro-batching gives the whole batch's loss and gradient: SFT micro-batches (normalised by the whole batch's
tokens) and GRPO micro-batches packed under a token budget (normalised by the whole batch's counts), against
the whole batch and fixed-size micro-batches, on a tiny Qwen3 (GQA, q/k norms, tied embeddings).

Tolerance: fp32 summation order. Splitting a batch changes only the order in which per-row contributions to
each gradient entry are added (and, for SFT, one sum / n against per-part sums / n). fp32 summation error is
relative to the summed magnitudes, not to the result: an entry where contributions cancel can differ by
~1e-5 of itself (measured: 7e-5 relative, 3e-8 absolute, on entries of a tensor whose largest is ~5e-3). So
each gradient tensor is compared entrywise within 1e-5 x its own largest magnitude (+ rtol 1e-5): a wrong
normaliser (a micro-batch's own token count) is off by tens of percent, far outside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlopt_cli.algo import grpo, sft
from rlopt_cli.config.recipes import load_config
from rlopt_cli.rollout import Rollout
from rlopt_cli.tasks import Example
from rlopt_cli.training import loop as trainer
from rlopt_cli.training.tracking import read_metrics
from tests.conftest import first_of_each
from tests.tiny_hf import byte_tokenizer, tiny_model

RTOL = 1e-5


def grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def assert_same_grads(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=RTOL * float(y.abs().max()))


# ---- SFT ----


def test_sft_micro_batches_give_the_whole_batch_loss_and_gradient() -> None:
    tok = byte_tokenizer()
    model = tiny_model("qwen3")
    solutions = ["1", "22", "333333333", "4", "55555", "6", "7777777777777", "88"]  # uneven token counts
    examples = [Example(f"{i}+{i}=", s, s) for i, s in enumerate(solutions)]
    batch = sft.sft_batch(tok, [e.prompt for e in examples], examples, torch.device("cpu"))
    results = {}
    for micro in (0, 2, 4, 3):  # 3: a short last micro-batch
        model.zero_grad(set_to_none=True)
        loss = sft.sft_backward(model, batch, micro, "fp32")
        results[micro] = (loss, grads(model))
    whole_loss, whole_grads = results[0]
    for micro in (2, 4, 3):
        loss, g = results[micro]
        assert loss == pytest.approx(whole_loss, rel=RTOL)
        assert_same_grads(g, whole_grads)
    # the normaliser matters: each micro-batch's own mean, averaged, is a different gradient
    model.zero_grad(set_to_none=True)
    for start in (0, 4):
        part = Rollout(
            *(
                t[start : start + 4]
                for t in (
                    batch.prompt_ids,
                    batch.prompt_mask,
                    batch.completion_ids,
                    batch.completion_mask,
                    batch.truncated,
                )
            ),
            batch.texts[start : start + 4],
        )
        (sft.sft_loss(model, part) / 2).backward()
    with pytest.raises(AssertionError):
        assert_same_grads(grads(model), whole_grads)


# ---- GRPO: forming micro-batches ----


def masks(prompt_lens: list[int], completion_lens: list[int], p: int = 8, length: int = 10):
    prompt = torch.zeros(len(prompt_lens), p, dtype=torch.long)
    completion = torch.zeros(len(completion_lens), length, dtype=torch.long)
    for i, n in enumerate(prompt_lens):
        prompt[i, p - n :] = 1  # left padding
    for i, n in enumerate(completion_lens):
        completion[i, :n] = 1
    return prompt, completion


def packed(prompt_lens, completion_lens, carries, budget, group=2) -> list[list[int]]:
    prompt, completion = masks(prompt_lens, completion_lens)
    flags = torch.tensor(carries, dtype=torch.bool)
    return [r.tolist() for r in grpo.micro_batch_rows(prompt, completion, flags, group, 0, budget)]


# G = 2, prompts of 2 tokens; group widths 2 + (4, 3, 10, 2) = 6, 5, 12, 4; widest first: groups 2, 0, 1, 3
LENS = [4, 1, 3, 3, 10, 2, 1, 2]


@pytest.mark.parametrize(
    ("carries", "budget", "expected"),
    [
        ([1] * 8, 24, [[4, 5], [0, 1, 2, 3], [6, 7]]),  # 2 x 12 alone; 4 x 6 = 24 fits; 6 x 6 does not
        ([1] * 8, 36, [[4, 5], [0, 1, 2, 3, 6, 7]]),  # 6 x 6 = 36
        ([1] * 8, 10, [[4, 5], [0, 1], [2, 3], [6, 7]]),  # 2 x 12 > 10: alone all the same
        ([1] * 8, 100, [[4, 5, 0, 1, 2, 3, 6, 7]]),
        # the wide group carries no gradient: it is not forwarded, so it costs nothing and goes last
        ([1, 1, 1, 1, 0, 0, 1, 1], 24, [[0, 1, 2, 3], [6, 7], [4, 5]]),
        ([0] * 8, 1, [[0, 1, 2, 3, 4, 5, 6, 7]]),  # nothing forwarded: one micro-batch that the loop skips
    ],
)
def test_token_budget_micro_batches(carries, budget, expected) -> None:
    assert packed([2] * 8, LENS, carries, budget) == expected


def test_the_budget_counts_the_longest_prompt_plus_the_longest_completion() -> None:
    # group 0: prompt 6 + completion 1; group 1: prompt 1 + completion 6. Each row is 7 tokens, but together
    # they pad to 6 + 6 = 12 columns: 4 x 12 = 48 > 30, so they go apart.
    assert packed([6, 6, 1, 1], [1, 1, 6, 6], [1] * 4, 30) == [[0, 1], [2, 3]]
    assert packed([6, 6, 1, 1], [1, 1, 6, 6], [1] * 4, 48) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("seed", range(5))
def test_budget_micro_batches_are_whole_groups_within_the_budget(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    group, rows, budget = 4, 256, 3000
    prompt_lens = torch.randint(10, 100, (rows // group,), generator=gen).repeat_interleave(group)
    completion_lens = torch.exp(torch.randn(rows, generator=gen) + 4).clamp(1, 600).long()  # long-tailed
    prompt, completion = masks(prompt_lens.tolist(), completion_lens.tolist(), 100, 600)
    carries = torch.rand(rows // group, generator=gen).repeat_interleave(group) > 0.3
    micro = grpo.micro_batch_rows(prompt, completion, carries, group, 0, budget)
    assert sorted(torch.cat(micro).tolist()) == list(range(rows))  # every row once
    for idx in micro:
        groups = idx.view(-1, group)  # whole groups, each of G consecutive rows
        assert torch.equal(groups, groups[:, :1] + torch.arange(group)) and (groups[:, 0] % group == 0).all()
        forwarded = carries[idx]
        assert forwarded.all() or not forwarded.any()  # the idle groups go apart
        n = int(forwarded.sum())
        if n > group:  # more than one forwarded group: within the budget, as trim pads it
            cost = n * (int(prompt_lens[idx].max()) + int(completion_lens[idx].max()))
            assert cost <= budget


def test_fixed_micro_batches_are_unchanged() -> None:
    prompt, completion = masks([2] * 8, [1] * 8)
    carries = torch.ones(8, dtype=torch.bool)
    rows = grpo.micro_batch_rows(prompt, completion, carries, 2, 0, 0)
    assert [r.tolist() for r in rows] == [list(range(8))]
    rows = grpo.micro_batch_rows(prompt, completion, carries, 2, 4, 0)
    assert [r.tolist() for r in rows] == [[0, 1, 2, 3], [4, 5, 6, 7]]


# ---- GRPO: the gradient does not depend on the partition ----


def rollout(group: int = 2, groups: int = 4, seed: int = 0):
    """Groups of G rows sharing a left-padded prompt, completions of uneven lengths (right-padded)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = [3, 7, 2, 5][:groups]
    completion_lens = [6, 2, 1, 9, 3, 3, 12, 4][: group * groups]
    p_max, l_max = max(prompt_lens), max(completion_lens)
    prompt_ids = torch.zeros(group * groups, p_max, dtype=torch.long)
    completion_ids = torch.zeros(group * groups, l_max, dtype=torch.long)
    prompt_mask, completion_mask = masks(
        [n for n in prompt_lens for _ in range(group)], completion_lens, p_max, l_max
    )
    for g, n in enumerate(prompt_lens):
        prompt_ids[g * group : (g + 1) * group, p_max - n :] = torch.randint(3, 250, (n,), generator=gen)
    completion_ids[completion_mask.bool()] = torch.randint(
        3, 250, (int(completion_mask.sum()),), generator=gen
    )
    advantages = torch.randn(group * groups, generator=gen)
    return prompt_ids, prompt_mask, completion_ids, completion_mask, advantages


def accumulated_grads(
    model, data, micro_rows, loss_type: str, group: int
) -> tuple[float, list[torch.Tensor]]:
    """The loop's accumulation (training/loop.py grpo_step), num_iterations = 1, beta = 0."""
    prompt_ids, prompt_mask, completion_ids, mask, advantages = data
    model.zero_grad(set_to_none=True)
    total = 0.0
    for s in micro_rows:
        logps = grpo.token_logprobs(
            model, prompt_ids[s], prompt_mask[s], completion_ids[s], mask[s], 1.0, group, 512, 16
        )
        token = grpo.per_token_loss(logps, logps.detach(), None, advantages[s], 0.2, 0.2, 0.0)
        loss = grpo.aggregate(
            token.loss,
            mask[s],
            loss_type,
            num_sequences=len(advantages),
            num_tokens=int(mask.sum()),
            max_completion_length=mask.shape[1],
            num_micro_batches=len(micro_rows),
            micro_batch_tokens=int(mask[s].sum()),
        )
        loss.backward()
        total += loss.item()
    return total, grads(model)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])  # bnpo: refused with a budget (config)
def test_token_budget_micro_batches_give_the_fixed_size_gradient(loss_type: str) -> None:
    model = tiny_model("qwen3")
    data = rollout()
    prompt_ids, prompt_mask, completion_ids, mask, advantages = data
    carries = torch.ones(len(advantages), dtype=torch.bool)
    fixed = grpo.micro_batch_rows(prompt_mask, mask, carries, 2, 2, 0)
    budget = grpo.micro_batch_rows(prompt_mask, mask, carries, 2, 0, 64)
    # group widths 9, 16, 5, 17: widest first 3, 1 (4 x 17 > 64: apart), then 1 + 0 (4 x 16), 2 alone
    assert [r.tolist() for r in budget] == [[6, 7], [2, 3, 0, 1], [4, 5]]  # uneven, reordered
    whole_loss, whole = accumulated_grads(model, data, [torch.arange(len(advantages))], loss_type, 2)
    for micro_rows in (fixed, budget):
        loss, g = accumulated_grads(model, data, micro_rows, loss_type, 2)
        assert loss == pytest.approx(whole_loss, rel=RTOL, abs=1e-7)
        assert_same_grads(g, whole)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_token_budget_trains_as_fixed_micro_batches(
    tmp_path: Path, tiny_overrides: list[str], forced_rewards, loss_type: str
) -> None:
    forced_rewards(first_of_each(4))
    common = [*tiny_overrides, "train.steps=2", f"grpo.loss_type='{loss_type}'", "grpo.pack_max_tokens=0"]
    fixed = trainer.train(load_config(None, [*common, "grpo.micro_batch_size=4"]), tmp_path / "a", print)
    packed = trainer.train(load_config(None, [*common, "grpo.micro_batch_tokens=40"]), tmp_path / "b", print)
    for a, b in zip(read_metrics(fixed)[1:], read_metrics(packed)[1:], strict=True):
        assert a["train/reward_mean"] == b["train/reward_mean"]
        for key in ("train/loss", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    from safetensors.torch import load_file

    wa = load_file(fixed / "checkpoints/step-000002/trainer_state.safetensors")
    wb = load_file(packed / "checkpoints/step-000002/trainer_state.safetensors")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa if k.startswith("master."))
