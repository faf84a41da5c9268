"""Weights & Biases logging for the runner: one run per (entry, seed), offline unless told otherwise.

Why offline by default: a benchmark must run on machines without network or a W&B account; the
offline run folder can be synced later with ``wandb sync``. The mode comes from ``WANDB_MODE``
(default 'offline'); ``WANDB_MODE=disabled`` or ``use_wandb=False`` means no W&B at all. Training
metrics go through Lightning's WandbLogger and every evaluation cell is logged to the same run
(``eval/<cell>/<metric>``), so one run holds a model's whole story. wandb is imported lazily: the
rest of the suite never needs it.

One run, a history that only grows. Offline, ``wandb.init(id=..., resume="allow")`` does not resume
anything: every call writes a new ``offline-run-<time>-<id>`` folder (``-1``, ``-2``... when two start
in the same second) whose ``_step`` restarts at 0, marked not resumed, and syncing such segments is
reported (wandb/wandb#3841, #5865) to replace the earlier history. So:

* within a process, one (entry, seed) is one wandb run, kept open from training to evaluation: the
  runner's ``finish()`` after a successful training only lets go of it, the evaluation logs into the
  same segment, and the ``finish()`` after that ends it (runs still open at exit are finished then);
* a later process (a rerun after a kill, a resumed sweep) writes a new segment of the same run id whose
  ``_step`` starts after every step of the earlier segments. The next free step is kept in
  ``<W&B dir>/wandb/steps/<run id>.json``, written *before* each logged step, so it covers a segment
  that was killed mid-way. Given all of a run's folders, ``wandb sync`` uploads them one after another
  by start time, and their steps do not overlap.

W&B's own dirs go under the results directory unless the user set them: the run folders in
``$WANDB_DIR/wandb`` (default ``<results>/wandb``), and the cache, artifact staging and settings dirs
(``WANDB_CACHE_DIR``, ``WANDB_DATA_DIR``, ``WANDB_CONFIG_DIR``; default ``<results>/wandb/cache``,
``.../data``, ``.../config``) rather than the home directory; online, the config dir stays the user's
(``wandb login --host`` keeps the server's address there). Those are set in the environment only around
this module's calls into wandb (the wandb service, started by the first run of a process, and wandb's
settings, read once per process, keep the values they started with).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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


#: W&B's own dirs besides the run folders, and where they go under the results directory by default.
_OWN_DIRS = {"WANDB_CACHE_DIR": "cache", "WANDB_DATA_DIR": "data", "WANDB_CONFIG_DIR": "config"}


def wandb_dirs(save_dir: str | Path, mode: str = "offline") -> dict[str, str]:
    """Where W&B writes for runs saved under `save_dir`: ``WANDB_DIR`` (the parent of the ``wandb/`` folder of
    run folders) and the cache, data (artifact staging) and config dirs. A variable the user set wins; the
    others go under `save_dir` (``save_dir/wandb/cache`` and so on, absolute), not into the home directory.

    Online, the config dir stays the user's (absent here unless set): its ``settings`` file is where
    ``wandb login --host`` keeps the server's address, which an online run must use."""
    base = Path(save_dir)
    out = {"WANDB_DIR": os.environ.get("WANDB_DIR") or os.path.abspath(base)}
    for var, sub in _OWN_DIRS.items():
        if os.environ.get(var):
            out[var] = os.environ[var]
        elif not (var == "WANDB_CONFIG_DIR" and mode == "online"):
            out[var] = os.path.abspath(base / "wandb" / sub)  # absolute: the wandb service keeps it
    return out


@contextlib.contextmanager
def _own_dirs_env(dirs: dict[str, str]) -> Iterator[None]:
    """Set W&B's cache/data/config variables the user left unset, for the duration of a call into wandb."""
    added = {}
    for var in _OWN_DIRS:
        if var in dirs and not os.environ.get(var):
            added[var] = os.environ.get(var)
            os.environ[var] = dirs[var]
    try:
        yield
    finally:
        for var, old in added.items():
            if os.environ.get(var) == dirs[var]:
                if old is None:
                    del os.environ[var]
                else:
                    os.environ[var] = old


def _read_next_step(path: Path) -> int:
    """The first free ``_step`` of a run after its earlier segments (0 for a new run)."""
    if not path.is_file():
        return 0
    try:
        return max(0, int(json.loads(path.read_text())["next_step"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("W&B step file %s is unreadable (%s): this segment's steps start at 0.", path, err)
        return 0


class _Segment:
    """One ``wandb.init`` of a run: one offline folder, whose steps continue those of the run's earlier segments.

    ``hold`` is set when a Lightning training ended well: the next ``WandbRun.finish()`` then keeps the segment
    open for the evaluation instead of ending it.
    """

    def __init__(self, key: tuple[str, str], run: Any, step_file: Path, next_step: int, dirs: dict[str, str]) -> None:
        self.key, self.run, self.step_file, self.next_step, self.dirs = key, run, step_file, next_step, dirs
        self.reserved = -1
        self.hold = False
        self.closed = False
        self._reserve(next_step)

    def _reserve(self, step: int) -> None:
        """Record `step` as the first free step of the run (atomically: a killed process leaves a whole file)."""
        if step <= self.reserved:
            return
        self.step_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.step_file.with_name(self.step_file.name + ".tmp")
        tmp.write_text(json.dumps({"run_id": self.key[1], "next_step": step}) + "\n")
        os.replace(tmp, self.step_file)
        self.reserved = step

    def before_step(self) -> None:
        """Call before a history row is committed: a later segment starts after it even if this one is killed."""
        self._reserve(self.next_step + 1)

    def after_step(self) -> None:
        self.next_step += 1

    def log(self, data: dict[str, Any]) -> None:
        """One history row (the next step)."""
        with _own_dirs_env(self.dirs):
            self.before_step()
            self.run.log(data)
        self.after_step()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if _LIVE.get(self.key) is self:
            del _LIVE[self.key]
        try:
            self.next_step = max(self.next_step, int(self.run.step))  # wandb's own count, should anything else log
        except Exception as err:  # noqa: BLE001 - a run finished behind our back: our own count stands
            log.debug("W&B run %s: no step count from wandb (%s)", self.key[1], err)
        with _own_dirs_env(self.dirs):
            self.run.finish()
        self._reserve(self.next_step)


#: Open segments of this process by (W&B dir, run id): a WandbRun of the same run id logs into the open one.
_LIVE: dict[tuple[str, str], _Segment] = {}
_atexit_registered = False


def _finish_open_runs() -> None:
    """At exit, end the segments still open (a sweep that stopped between training and evaluation)."""
    for seg in list(_LIVE.values()):
        try:
            seg.close()
        except Exception:  # at exit, a failure to finish one run must not hide the others
            log.exception("could not finish W&B run %s", seg.key[1])


def _register_atexit() -> None:
    # registered after wandb started (atexit runs last-in first-out), so this runs before wandb's own teardown
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_finish_open_runs)
        _atexit_registered = True


_LOGGER_CLASS: Any = None


def _segment_logger_class() -> Any:
    """Lightning's WandbLogger writing into a segment: every logged row reserves its step first, and the end of a
    successful fit marks the segment to stay open for the evaluation."""
    global _LOGGER_CLASS
    if _LOGGER_CLASS is None:
        from lightning.pytorch.loggers import WandbLogger
        from lightning.pytorch.utilities import rank_zero_only

        class SegmentLogger(WandbLogger):
            def __init__(self, segment: _Segment, **kwargs: Any) -> None:
                super().__init__(experiment=segment.run, **kwargs)
                self._segment = segment

            @rank_zero_only
            def log_metrics(self, metrics: Any, step: int | None = None) -> None:
                self._segment.before_step()
                super().log_metrics(metrics, step)
                self._segment.after_step()

            @rank_zero_only
            def finalize(self, status: str) -> None:
                super().finalize(status)
                self._segment.hold = status == "success"

        _LOGGER_CLASS = SegmentLogger
    return _LOGGER_CLASS


class WandbRun:
    """The W&B run of one (entry, seed), resumable by id; a no-op when W&B is off.

    Within a process it is one wandb run from training to evaluation (``finish()`` after a successful training
    keeps it open, the next ``finish()`` ends it); a later process continues its ``_step`` in a new segment.
    """

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
        self._seg: _Segment | None = None

    def _key(self, dirs: dict[str, str]) -> tuple[str, str]:
        return (str(Path(dirs["WANDB_DIR"]).resolve()), self.run_id)

    def _open_segment(self) -> _Segment | None:
        if self._seg is not None and not self._seg.closed:
            return self._seg
        self._seg = _LIVE.get(self._key(wandb_dirs(self.save_dir, self.mode))) if self.enabled else None
        return self._seg

    def _segment(self) -> _Segment:
        """This run's open segment: the one this process has open for the run id, else a new one."""
        seg = self._open_segment()
        if seg is None:
            seg = self._seg = self._start()
        return seg

    def _start(self) -> _Segment:
        import wandb

        dirs = wandb_dirs(self.save_dir, self.mode)
        # absolute: the wandb service of a process resolves a relative path against its own working directory
        root = Path(os.path.abspath(dirs["WANDB_DIR"]))
        root.mkdir(parents=True, exist_ok=True)
        step_file = root / "wandb" / "steps" / f"{self.run_id}.json"
        start = _read_next_step(step_file)
        with _own_dirs_env(dirs):
            run = wandb.init(
                project=self.project, entity=self.entity, id=self.run_id, name=self.name, dir=str(root),
                mode=self.mode, resume="allow", config=self.config, tags=self.tags, group=self.group,
                job_type=self.job_type, reinit="create_new",  # runs of other entries may be open (held) too
            )
            start = max(start, int(getattr(run, "starting_step", 0) or 0))  # online, the server's resume point
            if start:
                run.log({}, step=start)  # moves the step counter without writing a row
        _register_atexit()
        seg = _Segment(self._key(dirs), run, step_file, start, dirs)
        _LIVE[seg.key] = seg
        return seg

    @property
    def run(self) -> Any:
        """The wandb Run, started (or continued by id) on first use."""
        if not self.enabled:
            return None
        return self._segment().run

    @property
    def url(self) -> str | None:
        """Run URL when it can exist (online, or an entity is configured for a later ``wandb sync``)."""
        if not self.enabled:
            return None
        seg = self._open_segment()
        if self.mode == "online" and seg is not None:
            return getattr(seg.run, "url", None)
        if self.entity:
            return f"https://wandb.ai/{self.entity}/{self.project}/runs/{self.run_id}"
        return None

    @property
    def id_or_none(self) -> str | None:
        return self.run_id if self.enabled else None

    def lightning_logger(self) -> Any:
        """A Lightning WandbLogger writing into this run (or None when W&B is off). When the fit ends well, the
        next ``finish()`` keeps the run open, so the evaluation continues the same segment."""
        if not self.enabled:
            return None
        seg = self._segment()
        seg.hold = False
        return _segment_logger_class()(seg, save_dir=str(self.save_dir), log_model=False)

    def log_cell(self, cell_id: str, metrics: dict[str, float]) -> None:
        """``eval/<cell>/<metric>`` for every metric of a finished cell."""
        if self.enabled:
            self._segment().log({f"eval/{cell_id}/{k}": float(v) for k, v in metrics.items()})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.enabled:
            import wandb

            self._segment().log({key: wandb.Table(columns=columns, data=rows)})

    def log_images(self, images: dict[str, Path]) -> None:
        if self.enabled and images:
            import wandb

            self._segment().log({k: wandb.Image(str(p)) for k, p in images.items()})

    def finish(self) -> None:
        """End this phase: after a successful Lightning fit the run stays open for the evaluation (and is ended by
        the next ``finish()``, or at exit); otherwise the run ends here."""
        seg, self._seg = self._open_segment(), None
        if seg is None:
            return
        if seg.hold:
            seg.hold = False
            return
        seg.close()
