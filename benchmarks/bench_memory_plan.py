"""The memory plan against measured peaks: per component, on CPU, for three model shapes; and one GRPO
micro-batch's peak with the log-prob pass chunked vs whole.

Each shape runs in its own fresh process (random weights, fp32, gradient checkpointing on as in the paper's
recipes). Components are measured one at a time as the rise of the process's resident memory: the current RSS
for what stays (weights after building the model, gradients after the first backward, AdamW's state after its
first step) and the peak RSS over the phase (VmHWM, reset through /proc/self/clear_refs before it) for what is
transient (the decoder's activations over a forward/backward from its hidden states; the log-prob pass from
fixed hidden states, chunked and whole). glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that
freed tensors go back to the OS and RSS tracks live tensors. Predictions come from
rlopt_cli/training/memory_plan.py. Target: each measured component within 15% of its prediction.

Run: `python -m benchmarks.bench_memory_plan [--quick]` (quick: the two smaller shapes).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from benchmarks.common import emit, run_worker, verdict
from rlopt_cli.training.memory_plan import Shape, activation_parts, logprob_pass_bytes, micro_batch_peak

TOLERANCE = 0.15
# name -> (shape, rows, prompt tokens, completion tokens); rows form one group (the KV-cache route)
SHAPES: dict[str, tuple[Shape, int, int, int]] = {
    "qwen3-vocab151936": (Shape(151_936, 128, 384, 2, 4, 2, 32, tied=True, qk_norm=True), 2, 64, 1024),
    "llama-32k": (Shape(32_000, 256, 704, 4, 8, 4, 32, tied=False), 4, 32, 512),
    "qwen2-16k": (Shape(16_000, 384, 1024, 3, 6, 2, 64, tied=True, attn_bias=True), 4, 64, 512),
}
CHUNK = 256


def rss() -> int:
    for line in open("/proc/self/status"):  # noqa: SIM115 (a short read)
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss()


def peak() -> int:
    for line in open("/proc/self/status"):  # noqa: SIM115
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def build(shape: Shape) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=4096,
    )
    if shape.qk_norm:
        config = Qwen3Config(**common, head_dim=shape.head_dim)
    elif shape.attn_bias:
        config = Qwen2Config(**common)
    else:
        config = LlamaConfig(**common)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().train()


def measure(name: str) -> dict[str, Any]:
    """In this process: each component's measured bytes for shape `name`."""
    import torch

    from rlopt_cli.algo import grpo
    from rlopt_cli.algo.lm_head import output_head, token_logprobs_from_hidden
    from rlopt_cli.algo.optimizers import build_optimizer
    from rlopt_cli.models.loading import enable_checkpointing

    shape, rows, prompt_len, length = SHAPES[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, shape.vocab, (1, prompt_len), generator=gen).repeat(rows, 1)  # [N, P]
    completion = torch.randint(3, shape.vocab, (rows, length), generator=gen)  # [N, L]
    ones_p, ones_c = torch.ones_like(prompt), torch.ones_like(completion)
    out: dict[str, Any] = {}

    build(
        Shape(shape.vocab, 8, 8, 1, 2, 1, 4, shape.tied, shape.qk_norm, shape.attn_bias)
    )  # imports, first use
    before = rss()
    model = build(shape)
    out["weights"] = rss() - before
    out["params"] = sum(p.numel() for p in model.parameters())
    enable_checkpointing(model)

    def step_logps(chunk: int) -> torch.Tensor:  # the KV-cache route, as the paper recipes take it
        return grpo.token_logprobs(model, prompt, ones_p, completion, ones_c, 1.0, rows, 0, chunk)

    step_logps(CHUNK).sum().backward()  # allocates the gradients
    before = rss()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    del grads
    out["gradients"] = before - rss()  # what freeing them gives back
    step_logps(CHUNK).sum().backward()
    optimizer = build_optimizer(model.parameters(), "adamw", 1e-4, 0.0, {})
    before = rss()
    optimizer.step()
    out["adamw_state"] = rss() - before
    optimizer.zero_grad(set_to_none=False)  # keep the gradients: backward below adds into them

    # Decoder activations: a forward/backward of the decoder alone, over the route's two forwards.
    base = reset_peak()
    attention = torch.cat([ones_p, ones_c], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    hidden = grpo.shared_prompt_hidden(model, prompt, completion, attention, positions, rows)
    hidden.sum().backward()
    out["activations"] = peak() - base
    del hidden

    # The log-prob pass alone, from fixed hidden states.
    with torch.no_grad():
        hidden_fixed = torch.randn(rows, length, shape.hidden, generator=gen)
    head = output_head(model)
    for label, chunk in (("logprob_chunked", CHUNK), ("logprob_whole", 0)):
        h = hidden_fixed.clone().requires_grad_(True)
        base = reset_peak()
        token_logprobs_from_hidden(h, completion, head, 1.0, chunk).sum().backward()
        out[label] = peak() - base
        del h

    # One micro-batch's forward/backward, whole: chunked vs not (gradients and weights held, as in training).
    for label, chunk in (("step_chunked", CHUNK), ("step_whole", 0)):
        base = reset_peak()
        t0 = time.perf_counter()
        step_logps(chunk).sum().backward()
        out[label] = peak() - base
        out[label + "_s"] = time.perf_counter() - t0
    return out


def predicted(name: str, measured: dict[str, Any]) -> dict[str, float]:
    shape, rows, prompt_len, length = SHAPES[name]
    p = shape.params
    tokens = prompt_len + rows * (length - 1)  # the KV-cache route: the prompt once, then every completion
    kept, transient = activation_parts(shape, tokens, 4, True, rows * prompt_len, forwards=2)
    chunked = logprob_pass_bytes(shape, rows * length, CHUNK, 4)
    whole = logprob_pass_bytes(shape, rows * length, 0, 4)
    return {
        "weights": 4 * p,
        "gradients": 4 * p,
        "adamw_state": 8 * p,
        "activations": kept + transient,
        "logprob_chunked": chunked,
        "logprob_whole": whole,
        "step_chunked": micro_batch_peak(shape, kept, transient, chunked),
        "step_whole": micro_batch_peak(shape, kept, transient, whole),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Only the two smaller shapes.")
    p.add_argument("--worker", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        emit(measure(args.worker))
        return 0
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)  # freed tensors go back to the OS: RSS = live bytes
    names = [n for n in SHAPES if not (args.quick and n.startswith("qwen3"))]
    worst = 0.0
    for name in names:
        got = run_worker("benchmarks.bench_memory_plan", ["--worker", name], threads=1)
        want = predicted(name, got)
        assert got["params"] == SHAPES[name][0].params, (got["params"], SHAPES[name][0].params)
        print(f"\n{name}: {got['params'] / 1e6:.1f}M parameters")
        print(f"  {'component':<18}{'predicted MB':>14}{'measured MB':>14}{'ratio':>8}")
        for key, value in want.items():
            ratio = got[key] / value
            print(f"  {key:<18}{value / 1e6:>14.1f}{got[key] / 1e6:>14.1f}{ratio:>8.2f}")
            worst = max(worst, abs(ratio - 1))
        print(
            f"  one micro-batch: chunked {got['step_chunked'] / 1e6:.0f} MB in {got['step_chunked_s']:.1f} s, "
            f"whole {got['step_whole'] / 1e6:.0f} MB in {got['step_whole_s']:.1f} s"
        )
    verdict("memory_plan/worst_component", f"{worst:.1%} off", f"<= {TOLERANCE:.0%}", worst <= TOLERANCE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
