"""Weights & Biases logging for the runner: one run per (entry, seed), offline unless told otherwise.

Why offline by default: a benchmark must run on machines without network or a W&B account; the
offline run folder can be synced later with ``wandb sync``. The mode comes from ``WANDB_MODE``
(default 'offline'); ``WANDB_MODE=disabled`` or ``use_wandb=False`` means no W&B at all. Training
metrics go through Lightning's WandbLogger and every evaluation cell is logged to the same run
(``eval/<cell>/<metric>``), so one run holds a model's whole story. wandb is imported lazily: the
rest of the suite never needs it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "rcit-bench"
MODES = ("offline", "online", "disabled")


def wandb_mode() -> str:
    """W&B mode from ``WANDB_MODE`` (default 'offline'); 'dryrun' is wandb's old name for offline."""
    mode = os.environ.get("WANDB_MODE", "offline").strip().lower() or "offline"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"Environment variable `WANDB_MODE` must be one of {MODES}, but got {mode!r}.")
    return mode


def new_run_id() -> str:
    """A fresh W&B-style run id (8 lowercase alphanumerics)."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbRun:
    """The W&B run of one (entry, seed), resumable by id; a no-op when W&B is off."""

    def __init__(self, *, enabled: bool, run_id: str, name: str, save_dir: str | Path, project: str | None = None,
                 entity: str | None = None, config: dict[str, Any] | None = None, tags: Sequence[str] = (),
                 group: str | None = None, job_type: str = "train-eval") -> None:
        self.mode = wandb_mode() if enabled else "disabled"
        self.enabled = self.mode != "disabled"
        self.run_id = run_id
        self.name = name
        self.save_dir = Path(save_dir)
        self.project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.entity = entity or os.environ.get("WANDB_ENTITY") or None
        self.config = config or {}
        self.tags = list(tags)
        self.group = group
        self.job_type = job_type
        self._run: Any = None

    @property
    def run(self) -> Any:
        """The wandb Run, started (or resumed by id) on first use."""
        if not self.enabled:
            return None
        if self._run is None:
            import wandb

            self.save_dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=self.project, entity=self.entity, id=self.run_id, name=self.name, dir=str(self.save_dir),
                mode=self.mode, resume="allow", config=self.config, tags=self.tags, group=self.group,
                job_type=self.job_type, reinit="finish_previous",
            )
        return self._run

    @property
    def url(self) -> str | None:
        """Run URL when it can exist (online, or an entity is configured for a later ``wandb sync``)."""
        if not self.enabled:
            return None
        if self.mode == "online" and self._run is not None:
            return getattr(self._run, "url", None)
        if self.entity:
            return f"https://wandb.ai/{self.entity}/{self.project}/runs/{self.run_id}"
        return None

    @property
    def id_or_none(self) -> str | None:
        return self.run_id if self.enabled else None

    def lightning_logger(self) -> Any:
        """A Lightning WandbLogger writing into this run (or None when W&B is off)."""
        if not self.enabled:
            return None
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(experiment=self.run, save_dir=str(self.save_dir), log_model=False)

    def log_cell(self, cell_id: str, metrics: dict[str, float]) -> None:
        """``eval/<cell>/<metric>`` for every metric of a finished cell."""
        if self.enabled:
            self.run.log({f"eval/{cell_id}/{k}": float(v) for k, v in metrics.items()})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.enabled:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_images(self, images: dict[str, Path]) -> None:
        if self.enabled and images:
            import wandb

            self.run.log({k: wandb.Image(str(p)) for k, p in images.items()})

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


# ------------------------------------------------------------------------------------------------------
# reading an offline run back (tests, and users checking what a run recorded before `wandb sync`)

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
