"""Measured optimizer memory: the peak RSS of one training step, per optimizer, each in a fresh process.

One forward/backward/step of a Qwen2 model built from a config (fp32, CPU, a small batch so activations stay far
below the optimizer state), with rlopt's own `build_optimizer`; the peak above SGD's is the optimizer's cost,
compared with the textbook fp32 state (AdamW 8 bytes per parameter, SGD+momentum 4, RMSProp 4). Used by
`rlopt paper` (section 4) and by benchmarks/bench_optimizer_memory.py.

Run a worker by hand: `python -m rlopt_cli.training.memory --worker adamw --size quick` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from rlopt_cli.algo.optimizers import build_optimizer, state_bytes
from rlopt_cli.config.optimizers import expected_state_bytes_per_param
from rlopt_cli.runtime.devices import peak_rss_bytes

# label -> (rlopt optimizer, its extra arguments)
STEP_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "adamw": ("adamw", {}),
    "sgd+momentum": ("sgd", {"momentum": 0.9}),
    "rmsprop": ("rmsprop", {}),
}
# Qwen2 shapes: ~106M parameters (full), ~22M (quick); untied embeddings as in the embedded model
SIZES = {
    "full": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_layers": 8,
        "heads": 12,
    },
    "quick": {
        "vocab_size": 16000,
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_layers": 4,
        "heads": 6,
    },
    # tests only: tiny, so one step per optimizer runs in a second
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "heads": 2},
}
BATCH, SEQ = 2, 32  # activations ~ tens of MB, far below the state


def one_step(label: str, size: str) -> dict[str, Any]:
    """In this process: build the model, one forward/backward/step; peak RSS and rlopt's state accounting."""
    import torch  # heavy: imported on use
    from transformers import Qwen2Config, Qwen2ForCausalLM  # heavy: imported on use

    s = SIZES[size]
    config = Qwen2Config(
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    name, extra = STEP_OPTIMIZERS[label]
    optimizer = build_optimizer(model.parameters(), name, 1e-4, 0.0, extra)
    ids = torch.randint(0, s["vocab_size"], (BATCH, SEQ))  # [B, T]
    rss_model = peak_rss_bytes()
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    rss_backward = peak_rss_bytes()
    optimizer.step()
    return {
        "n_params": n_params,
        "largest_param_bytes": max(p.numel() * p.element_size() for p in model.parameters()),
        "peak_rss": peak_rss_bytes(),
        "rss_after_model": rss_model,
        "rss_after_backward": rss_backward,
        "state_bytes": state_bytes(optimizer)["total"],
        "expected_per_param": expected_state_bytes_per_param(name, extra),
        "step_s": time.perf_counter() - t0,
    }


def run_worker(label: str, size: str) -> dict[str, Any]:
    """`one_step` in a fresh process, so one optimizer's peak never leaks into another's."""
    proc = subprocess.run(
        [sys.executable, "-m", "rlopt_cli.training.memory", "--worker", label, "--size", size],
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_step_memory(quick: bool = False) -> dict[str, Any]:
    """Peak RSS of one step per optimizer and its excess over SGD vs the textbook state size."""
    size = "quick" if quick else "full"
    runs = {label: run_worker(label, size) for label in STEP_OPTIMIZERS}
    n = runs["sgd"]["n_params"]
    out: dict[str, Any] = {"n_params": n, "model": size}
    for label, r in runs.items():
        extra = r["peak_rss"] - runs["sgd"]["peak_rss"]
        expected = r["expected_per_param"] * n
        out[label] = {
            "peak_rss_mb": r["peak_rss"] / 1e6,
            "above_sgd_mb": extra / 1e6,
            "expected_mb": expected / 1e6,
            "ratio": extra / expected if expected else None,
            "state_bytes_per_param": r["state_bytes"] / n,
        }
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one training step's peak memory (a worker)")
    parser.add_argument("--worker", choices=sorted(STEP_OPTIMIZERS), required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    args = parser.parse_args()
    print(json.dumps(one_step(args.worker, args.size)), flush=True)
