"""Weights & Biases logging for the runner: one run per (entry, seed), offline unless told otherwise.

Why offline by default: a benchmark must run on machines without network or a W&B account; the
offline run folder can be synced later with ``wandb sync``. The mode comes from ``WANDB_MODE``
(default 'offline'); ``WANDB_MODE=disabled`` or ``use_wandb=False`` means no W&B at all. Training
metrics go through Lightning's WandbLogger and every evaluation cell is logged to the same run
(``eval/<cell>/<metric>``), so one run holds a model's whole story. wandb is imported lazily: the
rest of the suite never needs it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

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
