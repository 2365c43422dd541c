"""Find the weights `rlopt sparsity` compares, and read them one tensor at a time.

A checkpoint argument may be an rlopt checkpoint folder, a run folder (its last checkpoint, or `--step N`), a
Hugging Face model folder (`model.safetensors`, or shards listed in `model.safetensors.index.json`) or one
`.safetensors` file. Pickles (`.bin`, `.pt`, `.pth`) are refused: loading one runs arbitrary code.

Only headers are read up front (names, shapes, dtypes). `read_pair` opens both files for one tensor and lets
them go afterwards: safetensors maps files into memory, and a mapping held open for the whole scan would keep
every page it touched resident, so peak memory would grow to the size of both checkpoints.

Deliberate simplifications: tensor names are compared as stored (no renaming between architectures); the
config is read only from `config.json` beside the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlopt_cli.errors import RloptError
from rlopt_cli.models.loading import CONVERT_HINT, refuse_pickle
from rlopt_cli.models.safetensors_files import (
    TensorInfo,
    loose_shards,
    read_config,
    read_headers,
    weight_files,
)
from rlopt_cli.training.checkpoint import CHECKPOINTS, resolve_checkpoint

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Weights:
    """One side of the comparison: every tensor of a checkpoint, and its config.json (or {})."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ties_embeddings(self) -> bool:
        """config.json says lm_head shares the input embedding (top level, or a multimodal text_config)."""
        text = self.config.get("text_config") or {}
        return bool(self.config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / CHECKPOINTS).is_dir()


def resolve_weights(path: str | Path, step: int | None = None) -> Weights:
    """The safetensors files behind a checkpoint argument, with their headers read; one-line errors.

    `step` picks a run folder's checkpoint (default: its last); it is ignored for other kinds of path.
    """
    p = Path(path)
    refuse_pickle(p)
    if not p.exists():
        raise RloptError(
            f"checkpoint not found: {p} (give a checkpoint, run or model folder, or a .safetensors file)"
        )
    if p.is_file():
        if p.suffix != ".safetensors":
            raise RloptError(f"{p} is not a .safetensors file; {CONVERT_HINT}")
        return Weights(p, read_headers([p]), read_config(p.parent / "config.json"))
    folder = p if not is_run_folder(p) and loose_shards(p) else resolve_checkpoint(p, step)
    return Weights(folder, read_headers(weight_files(folder)), read_config(folder / "config.json"))


@contextmanager
def read_pair(a: TensorInfo, b: TensorInfo) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Both versions of one tensor, memory-mapped (pages are read as they are touched), released on exit."""
    from safetensors import safe_open  # heavy: imported on use

    with safe_open(str(a.file), framework="pt") as fa, safe_open(str(b.file), framework="pt") as fb:
        yield fa.get_tensor(a.name), fb.get_tensor(b.name)
