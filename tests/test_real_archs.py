"""Every log-prob route on tiny random models of the real architectures, under every flag the recipes use.

`grpo.token_logprobs` has three routes (one forward per row; a group packed into one sequence; the prompt's KV
cache shared by its group). Each must give the log-probs and gradients of a plain per-row forward, with gradient
checkpointing off and on, in fp32 and under bf16 autocast, with gradients and without (the reference and old
log-probs). Llama with GQA and tied embeddings, Qwen2.5 (attention biases) and Qwen3 (q/k norms).
SFT and the transformers sampler are checked under gradient checkpointing too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from rlopt_cli.algo import grpo
from tests.tiny_hf import ARCHS, tiny_model

GROUP, PROMPT_LENS, LENGTH = 3, (5, 9), 6
ROUTES = {"per_row": (1, 0), "cache": (GROUP, 0), "packed": (GROUP, 512)}  # group_size, pack_max_tokens


def group_batch(vocab: int) -> tuple[torch.Tensor, ...]:
    """Two prompts of different lengths (left padding), G completions each, some ending early."""
    gen = torch.Generator().manual_seed(1)
    width = max(PROMPT_LENS)
    prompt_ids = torch.zeros(len(PROMPT_LENS), width, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, n in enumerate(PROMPT_LENS):
        prompt_ids[i, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        prompt_mask[i, width - n :] = 1
    rows = len(PROMPT_LENS) * GROUP
    completion = torch.randint(3, vocab, (rows, LENGTH), generator=gen)  # [N, L]
    cmask = torch.ones_like(completion)
    cmask[1, 2:] = 0  # ended early: the rest is padding
    cmask[4, 4:] = 0
    return prompt_ids.repeat_interleave(GROUP, 0), prompt_mask.repeat_interleave(GROUP, 0), completion, cmask


def enable_checkpointing(model: Any) -> list[int]:
    """Turn checkpointing on as `rlopt` does; returns a list that grows by one per checkpointed layer call."""
    from rlopt_cli.models.loading import enable_checkpointing as enable

    enable(model)
    calls: list[int] = []
    for layer in model.model.layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: (calls.append(1), _f(*a, **k))[1]
    return calls


def logps_and_grads(
    model: Any, batch: tuple[torch.Tensor, ...], route: str, bf16: bool = False, chunk: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    group_size, pack = ROUTES[route]
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logps = grpo.token_logprobs(model, *batch, 0.7, group_size, pack, chunk)  # [N, L]
    weights = torch.linspace(-1, 1, len(logps))[:, None]  # mixed signs, as advantages have
    (logps * batch[3] * weights).sum().backward()
    return logps.detach() * batch[3], [p.grad.clone() for p in model.parameters()]


# 0: lm_head over the whole micro-batch at once; 5: five positions at a time (36 positions: a short last chunk)
CHUNKS = {"whole": 0, "chunked": 5}


def plain_logps_and_grads(
    model: Any, batch: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The textbook computation, independent of rlopt's routes: the causal LM's full logits over each row's
    prompt + completion, divided by the temperature, fp32 log_softmax, gather."""
    prompt_ids, prompt_mask, completion, cmask = batch
    model.zero_grad(set_to_none=True)
    attention = torch.cat([prompt_mask, cmask], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=torch.cat([prompt_ids, completion], 1), attention_mask=attention, position_ids=positions
    ).logits[:, prompt_ids.shape[1] - 1 : -1]  # [N, L, V]
    logps = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, completion[..., None]).squeeze(-1)
    weights = torch.linspace(-1, 1, len(logps))[:, None]  # as in logps_and_grads
    (logps * cmask * weights).sum().backward()
    return logps.detach() * cmask, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_route_matches_a_plain_per_row_forward(
    arch: str, route: str, checkpointing: bool, chunk: str
) -> None:
    model = tiny_model(arch)
    batch = group_batch(model.config.vocab_size)
    # plain: the model's own logits (no checkpointing, a forward per row, the whole vocabulary at every position)
    want, want_grads = plain_logps_and_grads(model, batch)
    calls = enable_checkpointing(model) if checkpointing else []
    forwards: list[int] = []
    model.get_decoder().register_forward_pre_hook(lambda *_: forwards.append(1))
    got, grads = logps_and_grads(model, batch, route, chunk=CHUNKS[chunk])
    assert len(forwards) == {"per_row": 1, "cache": 2, "packed": 1}[route]  # the route named was taken
    layers_checkpointed = 2 if checkpointing else 0  # both layers, in every forward
    assert len(calls) == layers_checkpointed * len(forwards)
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in model.modules())  # flag restored
    assert torch.allclose(got, want, atol=1e-5)
    for name, a, b in zip([n for n, _ in model.named_parameters()], grads, want_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), name
    assert min(float(g.abs().max()) for g in want_grads) > 1e-4  # every parameter gets a gradient to compare

    # Without gradients (the old log-probs with num_iterations > 1, in train mode; the reference with beta > 0,
    # a frozen eval copy): nothing is checkpointed and the route still gives the same numbers.
    group_size, pack = ROUTES[route]
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    checkpointed_before = len(calls)
    with torch.no_grad():
        for m in (model, ref):
            logps = grpo.token_logprobs(m, *batch, 0.7, group_size, pack, CHUNKS[chunk])  # [N, L]
            assert torch.allclose(logps * batch[3], want, atol=1e-5)
    assert len(calls) == checkpointed_before


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_autocast_routes_with_checkpointing(arch: str, route: str) -> None:
    # Under bf16 autocast, checkpointing replays the same bf16 ops: its numbers are those without it. Against
    # the fp32 per-row forward they agree to bf16 precision.
    model = tiny_model(arch)
    batch = group_batch(model.config.vocab_size)
    fp32, fp32_grads = logps_and_grads(model, batch, "per_row")
    plain, plain_grads = logps_and_grads(model, batch, route, bf16=True)
    enable_checkpointing(model)
    got, grads = logps_and_grads(model, batch, route, bf16=True)
    assert torch.allclose(got, plain, atol=1e-6)
    for a, b in zip(grads, plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    # Chunked, lm_head runs on 5 positions at a time: the same log-probs. Autocast computes lm_head's weight
    # gradient in bf16, once per chunk, so the chunks' bf16-rounded parts add up to the plain gradient to bf16
    # rounding of the parts (2^-8 of their size), no closer; every other gradient is identical.
    chunked, chunked_grads = logps_and_grads(model, batch, route, bf16=True, chunk=5)
    assert torch.allclose(chunked, plain, atol=1e-6)
    head = model.get_output_embeddings().weight
    for p, a, b in zip(model.parameters(), chunked_grads, plain_grads, strict=True):
        bound = 2**-7 * float(b.abs().max()) if p is head else 1e-6
        assert float((a - b).abs().max()) <= bound
    assert float((got - fp32).abs().max()) < 0.1  # bf16 keeps 8 bits of mantissa: log-probs move by ~1e-2
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in fp32_grads]), 0
    )
    assert float(cos) > 0.99


def test_reentrant_checkpointing_is_refused_rather_than_losing_gradients() -> None:
    # Reentrant checkpointing runs the layer under no_grad: the prompt's keys/values would reach the completion
    # pass without their graph and the prompt's share of the gradient would silently vanish.
    from rlopt_cli.errors import RloptError

    model = tiny_model("llama")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RloptError, match="reentrant"):
        grpo.token_logprobs(model, *group_batch(model.config.vocab_size), 1.0, GROUP, 0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sft_loss_is_the_same_with_checkpointing(arch: str) -> None:
    from rlopt_cli.algo.sft import sft_loss
    from rlopt_cli.rollout import Rollout

    model = tiny_model(arch)
    prompt_ids, prompt_mask, completion, cmask = group_batch(model.config.vocab_size)
    batch = Rollout(prompt_ids, prompt_mask, completion, cmask, torch.zeros(len(cmask), dtype=torch.bool), [])

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = sft_loss(model, batch)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters()]

    want, want_grads = loss_and_grads()
    calls = enable_checkpointing(model)
    got, grads = loss_and_grads()
    assert calls and got == pytest.approx(want, abs=1e-6)
    for a, b in zip(grads, want_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generation_keeps_the_kv_cache_under_checkpointing(arch: str) -> None:
    # Generation runs under inference_mode, so checkpointing (which drops the cache) must not engage, even on a
    # model left in train mode: each decode step forwards one token per row on top of the cache, and would give
    # other tokens without it.
    from rlopt_cli.rollout.hf import HFBackend, sample
    from tests.tiny_hf import byte_tokenizer

    tok = byte_tokenizer()
    model = tiny_model(arch, vocab_size=len(tok))
    prompts = ["Hi there", "What is 2+3?"]
    want = HFBackend(model, tok).generate(prompts, 2, 12, 1.0, seed=4)
    calls = enable_checkpointing(model)
    got = HFBackend(model, tok).generate(prompts, 2, 12, 1.0, seed=4)
    in_train_mode = sample(model.train(), tok, prompts, 2, 12, 1.0, torch.Generator().manual_seed(4))
    assert not calls
    assert got.completion_ids.tolist() == want.completion_ids.tolist()
    assert in_train_mode.completion_ids.tolist() == want.completion_ids.tolist()
    assert want.completion_ids.shape[1] == 12  # a random model rarely stops: every decode step ran


RUNS = {  # name -> overrides; every run must train exactly as the first
    "plain": ["model.gradient_checkpointing=false", "grpo.pack_max_tokens=0"],
    "cache": ["grpo.pack_max_tokens=0"],
    "packed": ["grpo.pack_max_tokens=4096"],
    "per_row": ["grpo.share_prompt_forward=false"],
}


@pytest.mark.slow
@pytest.mark.trajectory
def test_training_is_the_same_with_checkpointing_on_every_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GRPO on a local tiny Llama folder (GQA, tied embeddings: the SmolLM2 architecture) with a chat
    # template, micro-batches, beta > 0 and num_iterations = 2, so the policy, old and reference log-probs all
    # run: with checkpointing on, each route trains as the plain run does (same losses, KL, gradient norms, weights).
    from safetensors.torch import load_file

    from rlopt_cli.config.recipes import load_config
    from rlopt_cli.training.checkpoint import step_dir
    from rlopt_cli.training.loop import train
    from rlopt_cli.training.tracking import read_metrics
    from tests.tiny_hf import reward_spread, save_tiny_model

    reward_spread(monkeypatch)
    folder = save_tiny_model(tmp_path / "tiny-llama", "llama")
    base = [
        f"model.name_or_path={folder}",
        "model.gradient_checkpointing=true",
        "task.digits=1",
        "task.n_eval=4",
        "grpo.num_generations=4",
        "grpo.batch_size=8",
        "grpo.micro_batch_size=4",
        "grpo.max_completion_length=8",
        "grpo.beta=0.01",
        "grpo.num_iterations=2",
        "grpo.temperature=1.0",
        "optimizer.name=sgd",  # AdamW would amplify rounding noise in coordinates whose gradient is ~0
        "optimizer.lr=0.05",
        "train.steps=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.device=cpu",
        "log.progress=false",
    ]
    runs = {}
    for name, overrides in RUNS.items():
        run_dir = train(
            load_config(None, base + overrides + [f"train.run_name={name}"]), tmp_path, say=lambda *_: None
        )
        weights = load_file(str(step_dir(run_dir, 2) / "trainer_state.safetensors"))
        runs[name] = (read_metrics(run_dir)[1:], weights)
    plain_rows, plain_weights = runs.pop("plain")
    assert all(r["train/grad_norm"] > 0 for r in plain_rows) and plain_rows[1]["train/kl"] > 0
    for name, (rows, weights) in runs.items():
        for key in ("train/loss", "train/kl", "train/grad_norm", "train/reward_mean"):
            assert [r[key] for r in rows] == pytest.approx(
                [r[key] for r in plain_rows], rel=1e-4, abs=1e-7
            ), (name, key)
        for key, tensor in plain_weights.items():
            assert torch.allclose(weights[key], tensor, atol=1e-6), (name, key)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_checkpointing_keeps_its_memory_saving_on_the_kv_cache_route(arch: str) -> None:
    # Bytes the autograd graph keeps for backward outside checkpointed layers (inside them checkpointing keeps
    # only handles), for 8 rows of 40 + 64 tokens. The KV-cache route must save what checkpointing saves on the
    # per-row route, not fall back to keeping every layer's activations. (The prompt's keys/values, which any
    # KV-cache route keeps, are held by the cache rather than saved: 2 layers x (K, V) x 40 tokens x 32 floats per row.)
    from rlopt_cli.models.loading import enable_checkpointing

    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, 259, (2, 40), generator=gen).repeat_interleave(4, 0)  # [8, 40]
    completion = torch.randint(3, 259, (8, 64), generator=gen)  # [8, 64]

    def saved_bytes(group_size: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        ones = torch.ones_like(completion)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps = grpo.token_logprobs(
                model, prompt_ids, torch.ones_like(prompt_ids), completion, ones, 1.0, group_size
            )
        logps.sum().backward()
        return total

    plain = saved_bytes(4)
    enable_checkpointing(model)
    checkpointed, per_row = saved_bytes(4), saved_bytes(1)
    assert checkpointed < plain / 4  # measured: 2.1 MB against 10.6 MB (Llama) and 12.0 MB (Qwen3)
    assert checkpointed < per_row  # and less than checkpointed per-row forwards (2.3 MB): fewer tokens


@pytest.mark.parametrize("route", list(ROUTES))
def test_the_chunked_pass_keeps_no_logits_for_backward(route: str) -> None:
    # Bytes autograd keeps for backward, 6 rows x 64 completion tokens over a 131,072-token vocabulary: the plain
    # pass keeps the fp32 log-softmax of every position (6 x 64 x 131,072 x 4 B = 201 MB); the chunked one keeps
    # each chunk's hidden states only and recomputes its logits in backward (what it keeps, ~8 MB measured, is
    # the decoder's activations).
    vocab = 131072
    model = tiny_model("qwen3", vocab_size=vocab)
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (2, 20), generator=gen).repeat_interleave(GROUP, 0)  # [6, 20]
    completion = torch.randint(3, vocab, (6, 64), generator=gen)  # [6, 64]
    group_size, pack = ROUTES[route]

    def saved_bytes(chunk: int) -> int:
        total = 0

        def pack_hook(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        ones = torch.ones_like(completion)
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            logps = grpo.token_logprobs(
                model, prompt_ids, torch.ones_like(prompt_ids), completion, ones, 0.7, group_size, pack, chunk
            )
        logps.sum().backward()
        return total

    logits_bytes = 6 * 64 * vocab * 4
    assert saved_bytes(0) > logits_bytes
    assert saved_bytes(64) < logits_bytes / 10
