"""The weight files of a Hugging Face model folder and their safetensors headers, read without the data.

A folder holds `model.safetensors`, or shards listed in `model.safetensors.index.json`, or (renamed) loose
`.safetensors` files. Model loading reads the headers first, so a truncated or corrupt file is a one-line error
instead of a traceback from deep inside transformers; `rlopt sparsity` reads them to plan its scan.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlopt_cli.errors import RloptError

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


def loose_shards(folder: Path) -> list[Path]:
    """Safetensors files in a model folder that has neither model.safetensors nor an index (e.g. renamed)."""
    if not folder.is_dir():
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
