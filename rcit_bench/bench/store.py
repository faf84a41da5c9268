"""`RunStore`: the folder of one (spec, entry, seed) and everything in it.

Why one object: the run state, the composed config, the checkpoints (and corrupt ones set aside), the result
files and their per-query ranks all live in ``results_dir/<spec>/<entry>/seed<k>/``. The runner asks the
store what is done and hands it what to keep; it never builds a path into the folder itself, so the layout
(and, to come, its lock) is defined here once.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable

import yaml

from rcit_bench.bench import results as R
from rcit_bench.utils import atomic_write_text

__all__ = ["RunStore", "CheckpointError", "load_checkpoint"]

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded with the safe loader."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with the safe loader (``weights_only=True``: tensors and plain containers only, no
    pickled code); an unreadable file raises :class:`CheckpointError` naming it and the fix."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle error, foreign file: all mean "cannot use it"
        raise CheckpointError(
            f"Checkpoint {path} cannot be loaded safely ({type(err).__name__}: {err}). It is corrupt or not a "
            "rcit-bench checkpoint: delete it (or rerun with --force) to train this entry again."
        ) from err


class RunStore:
    """Files of one (spec, entry, seed): ``state.json`` (entry hash, W&B run id, trained, best checkpoint,
    budget), ``config.yaml``, ``checkpoints/``, ``<cell>.json`` and ``<cell>.ranks.npz``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def of(cls, results_dir: str | Path, spec_name: str, entry_id: str, seed: int) -> "RunStore":
        """The store of (spec, entry, seed) under `results_dir`: ``<results_dir>/<spec>/<entry>/seed<k>``."""
        return cls(R.run_dir(results_dir, spec_name, entry_id, seed))

    def __repr__(self) -> str:
        return f"RunStore({str(self.folder)!r})"

    # ------------------------------------------------------------------------------------------- results
    def cell_path(self, cell_id: str) -> Path:
        return self.folder / f"{cell_id}.json"

    def pending(self, cells: Iterable[Any], entry_hash: str, force: bool = False) -> list[Any]:
        """The cells without an 'ok' result of this entry hash (all of them with `force`)."""
        return [c for c in cells if force or not R.is_done(self.cell_path(c.id), entry_hash)]

    def write_cell(self, cell_id: str, record: dict[str, Any], ranks: tuple[Any, Any, Any] | None = None) -> Path:
        """The cell's record, after its per-query ranks ``(i2t, t2i, caption_to_image)`` when given (named in
        the record's ``ranks_file``): a record on disk always has its ranks."""
        path = self.cell_path(cell_id)
        if ranks is not None:
            rp = R.write_ranks(R.ranks_path(path), *ranks)
            record = {**record, "ranks_file": rp.name}
        return R.write_result(path, record)

    # --------------------------------------------------------------------------------------------- state
    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=2, sort_keys=True) + "\n")

    def begin(self, entry_hash: str, force: bool, new_run_id: Any) -> dict[str, Any]:
        """The run state for training `entry_hash`: kept when it is the same entry, else started afresh (and the
        checkpoints of the other configuration removed), keeping the W&B run id."""
        state = self.state()
        if force or state.get("entry_hash") != entry_hash:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            state = {"entry_hash": entry_hash, "wandb_run_id": state.get("wandb_run_id") or new_run_id()}
            self.save_state(state)
        return state

    def write_config(self, composed: dict[str, Any]) -> None:
        atomic_write_text(self.folder / "config.yaml", yaml.safe_dump(composed, sort_keys=True))

    # ---------------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.ckpt"

    def resumable(self) -> str | None:
        """``last.ckpt`` when training can resume from it; a corrupt one is set aside first."""
        last = self.last_checkpoint
        return str(last) if last.is_file() and self.readable(last) else None

    def readable(self, path: Path) -> bool:
        """True when `path` loads with the safe loader; a corrupt file is set aside."""
        try:
            load_checkpoint(path)
            return True
        except CheckpointError as err:
            self.set_aside(path, err)
            return False

    @staticmethod
    def set_aside(path: Path, err: Exception) -> None:
        """Rename a corrupt checkpoint to ``*.corrupt`` (kept for inspection, never deleted) so the entry is
        trained again instead of failing on every rerun."""
        aside = path.with_name(path.name + ".corrupt")
        path.replace(aside)
        log.warning("%s Moved it to %s and training this entry again.", err, aside)
