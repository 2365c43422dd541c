"""Write a safetensors file one tensor at a time, so host memory holds one tensor's copy, not the whole dict.

`safetensors.torch.save_file` needs every tensor on the host at once: for the trainer state of Qwen3-1.7B
(fp32 master weights + AdamW's two moments) that is ~20 GiB of host memory at each checkpoint. The format is
simple enough to stream: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets) padded with spaces to a multiple of 8, then the tensors' bytes. The header is computed from shapes and
dtypes alone; then each tensor is copied to the host, written, and dropped.

The layout is save_file's own (safetensors 0.8): tensors ordered by dtype (its enum order, descending), then
by name; compact JSON; no metadata. So the bytes are the same as save_file's (tested), and any safetensors
reader loads the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

# torch dtype -> (safetensors name, rank in safetensors' Dtype enum; the file is ordered by rank, descending)
DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0),
    torch.uint8: ("U8", 4),
    torch.int8: ("I8", 5),
    torch.float8_e5m2: ("F8_E5M2", 6),
    torch.float8_e4m3fn: ("F8_E4M3", 7),
    torch.int16: ("I16", 9),
    torch.uint16: ("U16", 10),
    torch.float16: ("F16", 11),
    torch.bfloat16: ("BF16", 12),
    torch.int32: ("I32", 13),
    torch.uint32: ("U32", 14),
    torch.float32: ("F32", 15),
    torch.float64: ("F64", 17),
    torch.int64: ("I64", 18),
    torch.uint64: ("U64", 19),
}


def save_streamed(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` (on any device) to `path` as safetensors, copying one tensor at a time to the host, and
    fsync the file."""
    order = sorted(tensors, key=lambda name: (-DTYPES[tensors[name].dtype][1], name))
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPES[t.dtype][0],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    # 0o600, as save_file creates its files (it writes through a private temporary file)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            host = tensors[name].detach().contiguous().cpu()  # one tensor on the host at a time
            f.write(host.reshape(-1).view(torch.uint8).numpy().data)
            del host
        f.flush()
        os.fsync(f.fileno())
