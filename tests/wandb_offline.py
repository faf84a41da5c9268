"""Read an offline W&B run back, for the integration test that checks what a sweep logged.

W&B's run file (``run-<id>.wandb``) is a LevelDB-format log of protobuf records; this reads the history
records with the protobuf classes wandb ships. It relies on wandb's private file format, which is why it
lives with the tests and not in the library.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

_BLOCK = 32768
_HEADER = 7  # crc32 (4) + length (2) + type (1)


def _wandb_records(path: Path) -> Iterator[bytes]:
    """Records of a ``run-<id>.wandb`` file (LevelDB log format: 32 KiB blocks, full/first/middle/last)."""
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {ident!r}).")
    pos, buf = 7, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if rtype == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if rtype == 1:
            yield chunk
        elif rtype == 2:
            buf = chunk
        elif rtype == 3:
            buf += chunk
        elif rtype == 4:
            yield buf + chunk
            buf = b""


def read_offline_history(save_dir: str | Path, run_id: str) -> dict[str, Any]:
    """Last logged value of every history key over all offline segments of run `run_id` under `save_dir`."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(save_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    if not files:
        raise FileNotFoundError(f"No offline W&B run {run_id!r} under {save_dir}/wandb.")
    out: dict[str, Any] = {}
    for f in files:
        for raw in _wandb_records(f):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "history":
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    out[key] = json.loads(item.value_json)
    return out
