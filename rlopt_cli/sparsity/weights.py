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

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlopt_cli.errors import RloptError
from rlopt_cli.models.loading import CONVERT_HINT, refuse_pickle
from rlopt_cli.training.checkpoint import CHECKPOINTS, resolve_checkpoint

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Bytes per element by safetensors dtype name (for the progress bar's total; 8-bit floats are 1 byte).
DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
NOT_WEIGHTS = ("trainer_state",)  # rlopt's optimizer state and fp32 master copy live beside the export


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the safetensors header (no data read)."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: BF16, F32, F16, I64, ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


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
    folder = p if loose_shards(p) else resolve_checkpoint(p, step)
    return Weights(folder, read_headers(weight_files(folder)), read_config(folder / "config.json"))


def loose_shards(folder: Path) -> list[Path]:
    """Safetensors files in a model folder that has neither model.safetensors nor an index (e.g. renamed)."""
    if not folder.is_dir() or is_run_folder(folder):
        return []
    if (folder / SINGLE).is_file() or (folder / INDEX).is_file():
        return []
    return sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith(NOT_WEIGHTS))


def weight_files(folder: Path) -> list[Path]:
    """The shards named by the index, or model.safetensors, or the loose safetensors files of `folder`."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise RloptError(f"{index} is not a valid safetensors index ({err}); re-save the model") from None
        files = sorted({folder / str(name) for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise RloptError(f"{index} lists shards that are missing: {', '.join(missing[:3])}")
        return files
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    return loose_shards(folder)


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Name -> TensorInfo over all shards, reading only the headers; a corrupt file is a one-line error."""
    from safetensors import SafetensorError, safe_open  # heavy: imported on use

    tensors: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    view = f.get_slice(name)
                    tensors[name] = TensorInfo(name, file, tuple(view.get_shape()), view.get_dtype())
        except (SafetensorError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RloptError(
                f"cannot read {file}: {reason}; it is corrupt or not safetensors (re-download or re-save it)"
            ) from None
    return tensors


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, or {} when absent or unreadable (it only decides whether lm_head is tied)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextmanager
def read_pair(a: TensorInfo, b: TensorInfo) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Both versions of one tensor, memory-mapped (pages are read as they are touched), released on exit."""
    from safetensors import safe_open  # heavy: imported on use

    with safe_open(str(a.file), framework="pt") as fa, safe_open(str(b.file), framework="pt") as fb:
        yield fa.get_tensor(a.name), fb.get_tensor(b.name)
