"""Per-cell result files: one JSON file per (spec, entry, seed, cell), written atomically.

One file per cell (as CLIP_benchmark does) makes a sweep resumable at cell granularity and lets the
leaderboard be rebuilt from the files alone. Each file carries its provenance (suite version, git
commit, package versions, spec and entry hashes, checkpoint, W&B run) so a number can be traced.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from rcit_bench.utils import atomic_write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed")
PACKAGES = ("torch", "torchvision", "lightning", "timm", "transformers", "torchmetrics", "numpy", "wandb")


def cell_path(results_dir: str | Path, spec_name: str, entry_id: str, seed: int, cell_id: str) -> Path:
    """``results_dir/<spec>/<entry>/seed<k>/<cell_id>.json``."""
    return run_dir(results_dir, spec_name, entry_id, seed) / f"{cell_id}.json"


def run_dir(results_dir: str | Path, spec_name: str, entry_id: str, seed: int) -> Path:
    """Folder of one (entry, seed): its result files, checkpoints and run state."""
    return Path(results_dir) / spec_name / entry_id / f"seed{seed}"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Commit of the source checkout the suite runs from, or 'unknown' (installed package, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Installed versions of the packages that change numbers (missing ones are left out)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def suite_version() -> str:
    from rcit_bench import __version__

    return __version__


def provenance(**extra: Any) -> dict[str, Any]:
    """Provenance block for a result file; ``extra`` adds checkpoint, W&B run id, wall time..."""
    prov = {
        "suite_version": suite_version(),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    prov.update(extra)
    return prov


#: Optional record sections (see :func:`make_record`).
RECORD_SECTIONS = ("ties", "intervals", "ranks_file", "image_change", "corruption_source", "training", "config",
                   "config_hash", "correspondence_noise", "parallelism")


def make_record(*, spec_name: str, spec_hash: str, entry_hash: str, entry: dict[str, Any], seed: int,
                cell: dict[str, Any], metrics: dict[str, float] | None, status: str = "ok", reason: str = "",
                sections: dict[str, Any] | None = None, **prov: Any) -> dict[str, Any]:
    """Build a result record. ``entry`` holds id/method/regime/config; ``cell`` is ``Cell.to_dict()``.

    ``sections`` adds any of ``RECORD_SECTIONS``: ``ties`` (queries tied at their positive, per direction),
    ``intervals`` (95% bootstrap intervals per metric), ``ranks_file`` (the per-query ranks beside the
    record), ``image_change`` (how far the test images moved from the clean ones), ``corruption_source`` (what
    the corruption's pixels come from, when that can differ: frost), ``training`` (the budget
    the model used), ``config`` / ``config_hash`` (the one composed configuration of the entry and seed),
    ``correspondence_noise`` (the nominal and actual mismatch rate of the training pairs, and its seed),
    ``parallelism`` (world size, per-rank and global batch, device type and process group backend).
    """
    if status not in STATUSES:
        raise ValueError(f"Argument `status` must be one of {STATUSES}, but got {status!r}.")
    unknown = sorted(set(sections or {}) - set(RECORD_SECTIONS))
    if unknown:
        raise ValueError(f"Argument `sections` has unknown keys {unknown}; allowed: {list(RECORD_SECTIONS)}.")
    return {
        "schema": SCHEMA_VERSION,
        "spec": spec_name,
        "spec_hash": spec_hash,
        "entry_hash": entry_hash,
        "entry": dict(entry),
        "seed": int(seed),
        "cell": dict(cell),
        "status": status,
        "reason": reason,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "provenance": provenance(**prov),
        **(sections or {}),
    }


def write_result(path: str | Path, record: dict[str, Any]) -> Path:
    """Write one record atomically (readers never see a half-written file)."""
    path = Path(path)
    try:
        atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    except OSError as err:  # full disk, quota, read-only mount: say where and what to do
        raise OSError(err.errno, f"Could not write result file {path} ({err.strerror or err}). Free space or fix "
                      "permissions there, then rerun the same command: finished cells are kept and skipped, and no "
                      "half-written file was left behind.") from err
    return path


def ranks_path(result_path: str | Path) -> Path:
    """``<cell>.ranks.npz`` beside ``<cell>.json``: the per-query ranks of a cell."""
    p = Path(result_path)
    return p.with_name(p.stem + ".ranks.npz")


def write_ranks(path: str | Path, ranks_i2t: Any, ranks_t2i: Any, caption_to_image: Any) -> Path:
    """Per-query 1-based ranks (int32) and the caption-to-image index, atomically, as a compressed ``.npz``.

    Written before the cell's JSON file: a cell whose JSON exists always has its ranks."""
    import io

    import numpy as np

    from rcit_bench.utils import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, i2t=np.asarray(ranks_i2t, dtype=np.int32), t2i=np.asarray(ranks_t2i, dtype=np.int32),
                        caption_to_image=np.asarray(caption_to_image, dtype=np.int32))
    try:
        atomic_write_bytes(Path(path), buf.getvalue())
    except OSError as err:
        raise OSError(err.errno, f"Could not write ranks file {path} ({err.strerror or err}). Free space or fix "
                      "permissions there, then rerun the same command.") from err
    return Path(path)


def read_ranks(path: str | Path) -> dict[str, Any] | None:
    """``{i2t, t2i, caption_to_image}`` int64 numpy arrays, or None when missing or unreadable."""
    import numpy as np

    try:
        with np.load(path) as z:
            out = {k: z[k].astype(np.int64) for k in ("i2t", "t2i", "caption_to_image")}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable ranks file %s: %s", path, exc)
        return None
    if len(out["t2i"]) != len(out["caption_to_image"]):
        log.warning("ignoring ranks file %s: %d t2i ranks for %d captions", path, len(out["t2i"]),
                    len(out["caption_to_image"]))
        return None
    return out


def read_result(path: str | Path) -> dict[str, Any] | None:
    """Read a record; None when missing or unreadable (an interrupted foreign write, a hand edit)."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable result file %s: %s", path, exc)
        return None
    return rec if isinstance(rec, dict) and rec.get("schema") == SCHEMA_VERSION else None


def is_done(path: str | Path, entry_hash: str | None = None) -> bool:
    """A cell is done when its file holds status 'ok' (for the same entry hash when one is given).
    Failed cells are retried: the failure may have been transient or fixed since."""
    rec = read_result(path)
    if rec is None or rec.get("status") != "ok":
        return False
    return entry_hash is None or rec.get("entry_hash") == entry_hash


@dataclass
class ResultRow:
    """A flat view of a record, for tables."""

    entry: str
    method: str
    regime: str
    seed: int
    cell: str
    kind: str
    corruption: str | None
    severity: int | None
    rate: float | None
    perturbation: str | None
    level: int | None
    status: str
    reason: str
    metrics: dict[str, float]
    wandb_run_id: str | None
    wandb_url: str | None
    path: Path
    record: dict[str, Any]  # the whole record (ties, intervals, image_change, training, config, ...)

    def ranks(self) -> dict[str, Any] | None:
        """The cell's per-query ranks (see :func:`read_ranks`), None when not stored."""
        name = self.record.get("ranks_file")
        return read_ranks(self.path.with_name(name)) if name else None


def iter_results(results_dir: str | Path, spec_name: str) -> Iterator[ResultRow]:
    """Every readable result file of a spec, in path order."""
    root = Path(results_dir) / spec_name
    for p in sorted(root.glob("*/seed*/*.json")):  # not state.json: no schema key
        rec = read_result(p)
        if rec is None or rec.get("spec") != spec_name:
            continue
        c, e, prov = rec["cell"], rec["entry"], rec.get("provenance", {})
        yield ResultRow(
            entry=e["id"], method=e.get("method", ""), regime=e.get("regime", ""), seed=int(rec["seed"]),
            cell=c["id"], kind=c["kind"], corruption=c.get("corruption"), severity=c.get("severity"),
            rate=c.get("pixel_noise_rate", c.get("rate")), perturbation=c.get("perturbation"), level=c.get("level"),
            status=rec["status"], reason=rec.get("reason", ""), metrics=rec.get("metrics", {}),
            wandb_run_id=prov.get("wandb_run_id"), wandb_url=prov.get("wandb_url"), path=p, record=rec,
        )
