"""Shared fixtures: an isolated cache and W&B offline, and a tiny, fast configuration of the embedded default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs in tests are tiny: a 2-layer, width-64 embedded model on single-digit addition, warmed up by 100 SFT
# steps (to ~35% accuracy, so GRPO has a reward signal; cached once per test session), 2 prompts x 4 samples.
TINY = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.warmup_steps=100",
    "model.warmup_lr=3e-3",
    "model.warmup_batch_size=32",
    "task.digits=1",
    "task.n_eval=32",
    "grpo.num_generations=4",
    "grpo.batch_size=8",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "log.progress=false",
]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path_factory.getbasetemp() / "rlopt-cache"
    monkeypatch.setenv("RLOPT_CACHE", str(cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
