"""Read an offline W&B run file (`run-<id>.wandb`) without the network, for the tests.

The file is W&B's 7-byte header (':W&B', magic 0xBEE1, version) followed by a LevelDB-style log: 32 KiB blocks of
records, each with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) whose
payloads are `wandb_internal_pb2.Record` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history_and_config(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    history, config = [], {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind in ("config", "run"):  # the initial config travels in the run record
            items = record.config.update if kind == "config" else record.run.config.update
            for item in items:
                config[item.key] = json.loads(item.value_json)
    return history, config
