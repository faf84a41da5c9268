"""Read an offline W&B run back, for the integration test that checks what a sweep logged.

W&B's run file (``run-<id>.wandb``) is a LevelDB-format log of protobuf records; this reads the history
records with the protobuf classes wandb ships. It relies on wandb's private file format, which is why it
lives with the tests and not in the library.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def flush() -> None:
    """Wait until every finished run of this process is on disk: wandb writes run files from its own service
    process, after `finish()` returns; `wandb.teardown()` waits for it (a later run starts a new service)."""
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def offline_segments(save_dir: str | Path, run_id: str) -> list[Path]:
    """Run files of every offline segment of run `run_id` under ``save_dir/wandb``, oldest first.

    Each ``wandb.init`` writes a folder ``offline-run-<YYYYMMDD_HHMMSS>-<id>``; one started in the same second
    as an earlier one gets ``-1``, ``-2``... after the id. Ordered by start time, then by that number.
    """
    flush()
    prefix = "offline-run-"
    found = []
    for f in Path(save_dir).glob(f"wandb/{prefix}*/run-{run_id}.wandb"):
        name = f.parent.name[len(prefix):]
        stamp, _, rest = name.partition("-")
        if rest == run_id:
            n = 0
        elif rest.startswith(run_id + "-") and rest[len(run_id) + 1:].isdigit():
            n = int(rest[len(run_id) + 1:])
        else:
            continue
        found.append(((stamp, n), f))
    return [f for _, f in sorted(found)]


def read_offline_rows(save_dir: str | Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row of run `run_id` (all its offline segments, in order): key -> value, ``_step`` included."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = offline_segments(save_dir, run_id)
    if not files:
        raise FileNotFoundError(f"No offline W&B run {run_id!r} under {save_dir}/wandb.")
    rows = []
    for f in files:
        for raw in _wandb_records(f):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows


def read_offline_history(save_dir: str | Path, run_id: str) -> dict[str, Any]:
    """Last logged value of every history key over all offline segments of run `run_id` under `save_dir`."""
    out: dict[str, Any] = {}
    for row in read_offline_rows(save_dir, run_id):
        out.update(row)
    return out
