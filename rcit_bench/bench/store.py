"""`RunStore`: the folder of one (spec, entry, seed) and everything in it.

Why one object: the run state, the composed config, the checkpoints (and corrupt ones set aside), the result
files and their per-query ranks all live in ``results_dir/<spec>/<entry>/seed<k>/``. The runner asks the
store what is done and hands it what to keep; it never builds a path into the folder itself, so the layout
(and, to come, its lock) is defined here once.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import yaml

from rcit_bench.bench import results as R
from rcit_bench.errors import UserError
from rcit_bench.utils import atomic_write_text

__all__ = ["RunStore", "RunLock", "LockedError", "CheckpointError", "load_checkpoint"]

#: A lock whose file has not been refreshed for this long is taken over (its owner is on another host, or its pid
#: cannot be checked); the owner refreshes it every HEARTBEAT_S seconds while it runs.
STALE_AFTER_S = 600.0
HEARTBEAT_S = 30.0

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


class LockedError(UserError):
    """Another live run writes this (spec, entry, seed)."""


class RunLock:
    """One writer per (spec, entry, seed): the file ``<folder>/.lock`` holds its owner (host, pid, start time).

    Created with O_EXCL, so of two runs exactly one gets it; the owner refreshes its modification time every
    HEARTBEAT_S seconds from a daemon thread. A lock is stale, and taken over with a warning, when its owner is
    on this host and its pid is gone (a killed run), or when it has not been refreshed for ``stale_after_s``
    (an owner on another host of a shared filesystem, which cannot be asked). Jobs owning disjoint entries
    (SLURM arrays) never meet."""

    def __init__(self, folder: Path, stale_after_s: float = STALE_AFTER_S) -> None:
        self.path = Path(folder) / ".lock"
        self.stale_after_s = float(stale_after_s)
        self._token: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # being written, or garbage: judged by its age

    def describe(self, owner: dict[str, Any] | None) -> str:
        if not owner:
            return "an unknown run"
        return f"pid {owner.get('pid')} on host {owner.get('host')!r}, started {owner.get('started')}"

    def stale_reason(self, owner: dict[str, Any] | None) -> str | None:
        """Why the current lock may be taken over, or None while its owner may be alive."""
        if owner is None:
            return None
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            if not _pid_alive(owner["pid"]):
                return f"its owner ({self.describe(owner)}) is no longer running"
            return None
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if age > self.stale_after_s:
            return f"it has not been refreshed for {age / 60:.0f} min (owner: {self.describe(owner)})"
        return None

    def acquire(self, wait: bool = False, poll_s: float = 5.0) -> None:
        """Take the lock; when another live run holds it, raise LockedError naming it (or wait, with `wait`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        announced = False
        while True:
            if self._create():
                return
            owner = self.owner()
            reason = self.stale_reason(owner)
            if reason is not None:
                log.warning("Taking over the stale lock %s: %s.", self.path, reason)
                self._remove_if(owner)
                continue
            if owner is None:
                continue  # released between our two looks
            if not wait:
                raise LockedError(self._locked_message(owner))
            if not announced:
                log.info("waiting for %s (held by %s)", self.path.parent, self.describe(owner))
                announced = True
            time.sleep(poll_s)

    def check(self) -> None:
        """Raise LockedError when another live run holds the lock (without taking it): a run that would stop at
        the lock stops before it spends time on anything else."""
        owner = self.owner()
        if owner is not None and not self.held and self.stale_reason(owner) is None:
            raise LockedError(self._locked_message(owner))

    def _locked_message(self, owner: dict[str, Any]) -> str:
        return (f"{self.path.parent} is being written by another run ({self.describe(owner)}). Wait for it to "
                "finish (or rerun with --wait-for-lock), or stop it; a lock left by a killed run on this host is "
                f"taken over automatically, one from another host after {self.stale_after_s / 60:.0f} min "
                f"without refresh (delete {self.path} if you are sure no run uses the folder).")

    def release(self) -> None:
        if self._token is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        owner = self.owner()
        if owner and owner.get("token") == self._token:
            self.path.unlink(missing_ok=True)
        self._token = None

    def _create(self) -> bool:
        token = uuid.uuid4().hex
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                           "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        self._token = token
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock {self.path.parent.name}", daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def _remove_if(self, owner: dict[str, Any] | None) -> None:
        """Remove the lock file only while it still holds the stale owner we judged (not a newer one)."""
        if self.owner() == owner:
            self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunStore:
    """Files of one (spec, entry, seed): ``state.json`` (entry hash, W&B run id, trained, best checkpoint,
    budget), ``config.yaml``, ``checkpoints/``, ``<cell>.json`` and ``<cell>.ranks.npz``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.lock = RunLock(self.folder)

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

    def trained_checkpoint(self, entry_hash: str) -> str | None:
        """The best checkpoint the run state names when the model of `entry_hash` finished training, else None
        (the file itself is not checked)."""
        state = self.state()
        if state.get("entry_hash") != entry_hash or not state.get("trained"):
            return None
        return str(state.get("best_checkpoint") or "")

    def begin(self, entry_hash: str, force: bool, new_run_id: Any) -> dict[str, Any]:
        """The run state for training `entry_hash`: kept when it is the same entry, else started afresh (the
        checkpoints of the other configuration removed, a W&B run id from `new_run_id`; with `force`, the same
        entry keeps its run id)."""
        state = self.state()
        if force or state.get("entry_hash") != entry_hash:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            same = state.get("entry_hash") == entry_hash and state.get("wandb_run_id")
            state = {"entry_hash": entry_hash, "wandb_run_id": state["wandb_run_id"] if same else new_run_id()}
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
