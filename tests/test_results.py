"""Per-cell result files: atomic write, read back, provenance, done/skip logic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rcit_bench.bench import results as R


def _record(status: str = "ok", entry_hash: str = "h1", rsum: float = 321.5) -> dict:
    return R.make_record(
        spec_name="quick", spec_hash="s" * 64, entry_hash=entry_hash,
        entry={"id": "vsepp_clean", "method": "vsepp", "regime": "clean", "config": "vsepp"}, seed=1,
        cell={"id": "ic-fog-s3", "kind": "imagenet_c", "corruption": "fog", "severity": 3, "rate": None,
              "perturbation": None, "level": None},
        metrics={"rsum": rsum, "i2t_r1": 40.0}, status=status, reason="" if status == "ok" else "diverged",
        checkpoint="ck.ckpt", wandb_run_id="abc", wall_time_s=1.5,
    )


def test_cell_path_layout(tmp_path: Path) -> None:
    p = R.cell_path(tmp_path, "quick", "vsepp_clean", 2, "clean")
    assert p == tmp_path / "quick" / "vsepp_clean" / "seed2" / "clean.json"


def test_write_read_roundtrip_and_provenance(tmp_path: Path) -> None:
    p = R.cell_path(tmp_path, "quick", "vsepp_clean", 1, "ic-fog-s3")
    R.write_result(p, _record())
    raw = json.loads(p.read_text())
    assert raw["metrics"] == {"rsum": 321.5, "i2t_r1": 40.0}
    prov = raw["provenance"]
    from rcit_bench import __version__

    assert prov["suite_version"] == __version__
    assert prov["git_commit"] == "unknown" or len(prov["git_commit"].split("-")[0]) == 40
    assert "torch" in prov["packages"] and prov["checkpoint"] == "ck.ckpt" and prov["wandb_run_id"] == "abc"
    assert [f for f in os.listdir(p.parent) if f.endswith(".tmp")] == []  # no temp file left behind
    rows = list(R.iter_results(tmp_path, "quick"))
    assert len(rows) == 1
    r = rows[0]
    assert (r.entry, r.seed, r.cell, r.kind, r.corruption, r.severity, r.metrics["rsum"]) == (
        "vsepp_clean", 1, "ic-fog-s3", "imagenet_c", "fog", 3, 321.5)


def test_is_done_ok_failed_stale_and_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    assert not R.is_done(p)
    R.write_result(p, _record("failed"))
    assert not R.is_done(p)  # failed cells are retried
    R.write_result(p, _record("ok", entry_hash="h1"))
    assert R.is_done(p) and R.is_done(p, "h1")
    assert not R.is_done(p, "h2")  # trained with another config: stale
    p.write_text("{not json")
    assert not R.is_done(p) and R.read_result(p) is None


def test_bad_status_rejected() -> None:
    with pytest.raises(ValueError, match=r"Argument `status` must be one of \('ok', 'failed'\), but got 'done'"):
        _record(status="done")


def test_full_disk_names_file_keeps_old_result(tmp_path, monkeypatch) -> None:
    """A simulated ENOSPC: the error names the file and the fix, and the finished file stays whole."""
    import errno
    import os

    import pytest

    from rcit_bench.bench import results as R

    path = tmp_path / "clean.json"
    rec = R.make_record(spec_name="s", spec_hash="h", entry_hash="e", entry={"id": "a"}, seed=0,
                        cell={"id": "clean", "kind": "clean"}, metrics={"rsum": 1.0})
    R.write_result(path, rec)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)  # where a full disk surfaces for buffered writes
    with pytest.raises(OSError, match=r"clean\.json.*No space left on device.*rerun the same command") as info:
        R.write_result(path, {**rec, "metrics": {"rsum": 2.0}})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.json"]  # no temp file left


def test_run_store_owns_its_folder(tmp_path: Path) -> None:
    """One (entry, seed) folder: pending cells by entry hash, ranks written with the record, run state kept for
    the same entry and reset (checkpoints removed, W&B id kept) for another, corrupt checkpoints set aside."""
    import numpy as np

    from rcit_bench.bench.spec import make_cell
    from rcit_bench.bench.store import RunStore

    store = RunStore.of(tmp_path, "s", "e", 3)
    assert store.folder == tmp_path / "s" / "e" / "seed3" and store.cell_path("clean") == store.folder / "clean.json"
    cells = [make_cell("clean"), make_cell("imagenet_c", corruption="fog", severity=2)]
    rec = R.make_record(spec_name="s", spec_hash="h", entry_hash="E1", entry={"id": "e"}, seed=3,
                        cell=cells[0].to_dict(), metrics={"rsum": 1.0})
    store.write_cell("clean", rec, (np.array([1, 2]), np.array([1, 1, 3, 2]), np.array([0, 0, 1, 1])))
    assert [c.id for c in store.pending(cells, "E1")] == ["ic-fog-s2"]
    assert [c.id for c in store.pending(cells, "E2")] == ["clean", "ic-fog-s2"]  # another entry: stale
    assert [c.id for c in store.pending(cells, "E1", force=True)] == ["clean", "ic-fog-s2"]
    assert R.read_ranks(store.folder / "clean.ranks.npz")["t2i"].tolist() == [1, 1, 3, 2]

    ids = iter(["run-a", "run-b"])
    state = store.begin("E1", False, lambda: next(ids))
    assert state == {"entry_hash": "E1", "wandb_run_id": "run-a"} and store.state() == state
    store.checkpoint_dir.mkdir()
    store.last_checkpoint.write_bytes(b"not a checkpoint")
    store.save_state({**state, "trained": True})
    assert store.begin("E1", False, lambda: next(ids))["trained"] is True  # same entry: kept
    assert store.resumable() is None  # unreadable last.ckpt: set aside, not resumed from
    assert (store.checkpoint_dir / "last.ckpt.corrupt").read_bytes() == b"not a checkpoint"
    assert store.begin("E2", False, lambda: next(ids)) == {"entry_hash": "E2", "wandb_run_id": "run-b"}
    assert not store.checkpoint_dir.exists()  # another configuration's checkpoints are gone
