"""`rcit-bench status`: a results folder written here the way the runner writes it (result files, run state,
locks), nothing trained; the states, counts, first failure, the table, the command line, and that it reads
nothing but files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rcit_bench import cli
from rcit_bench.bench import results as R
from rcit_bench.bench.spec import Spec, load_spec
from rcit_bench.bench.status import format_status, sweep_status
from rcit_bench.bench.store import RunLock, RunStore
from rcit_bench.errors import UserError
from tiny_specs import TINY_MODEL, tiny_dataset, tiny_trainer

LONG_REASON = "training diverged: loss is nan at step 12 " + "x" * 200


def _spec(tmp_path: Path) -> Path:
    """Two entries x two seeds x three cells; its dataset root does not exist (nothing may read it)."""
    spec = {"name": "st", "dataset": tiny_dataset(tmp_path / "no-data"), "seeds": [0, 1], "trainer": tiny_trainer(1),
            "entries": [{"id": "a", "method": "vsepp", "overrides": TINY_MODEL},
                        {"id": "b", "method": "vsepp", "overrides": TINY_MODEL}],
            "evaluation": {"clean": True, "imagenet_c": {"corruptions": ["contrast"], "severities": [1, 3]}}}
    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _write(store: RunStore, sp: Spec, entry: str, seed: int, cell_index: int, status: str = "ok",
           reason: str = "", entry_hash: str | None = None) -> None:
    cell = sp.cells(entry)[cell_index]
    rec = R.make_record(spec_name=sp.name, spec_hash=sp.hash, entry_hash=entry_hash or sp.entry_hash(entry),
                        entry={"id": entry, "method": "vsepp", "regime": "clean"}, seed=seed, cell=cell.to_dict(),
                        metrics={"rsum": 100.0} if status == "ok" else None, status=status, reason=reason)
    store.write_cell(cell.id, rec)


def _trained(store: RunStore, ehash: str) -> None:
    """The run state as the runner leaves it after training (RunStore.begin, then trained=True)."""
    state = store.begin(ehash, False, lambda: "run-id")
    state.update(trained=True, best_checkpoint=str(store.checkpoint_dir / "best.ckpt"))
    store.save_state(state)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


@pytest.fixture
def sweep(tmp_path: Path):
    """a/seed0 trained, all done; a/seed1 trained and evaluating (lock held here): 1 done, 1 failed, 1 pending;
    b/seed0 training (lock held here, state begun); b/seed1 trained under another entry hash, 2 stale results, 1
    failed, and the lock of a dead pid."""
    path = _spec(tmp_path)
    sp = load_spec(path, check_devices=False)
    runs = tmp_path / "runs"
    store = {(e, s): RunStore.of(runs, sp.name, e, s) for e in ("a", "b") for s in (0, 1)}
    ha, hb = sp.entry_hash("a"), sp.entry_hash("b")

    _trained(store["a", 0], ha)
    for i in range(3):
        _write(store["a", 0], sp, "a", 0, i)
    _trained(store["a", 1], ha)
    _write(store["a", 1], sp, "a", 1, 0)
    _write(store["a", 1], sp, "a", 1, 2, "failed", LONG_REASON)
    store["b", 0].begin(hb, False, lambda: "run-id")
    _trained(store["b", 1], "an-old-hash")
    _write(store["b", 1], sp, "b", 1, 0, entry_hash="an-old-hash")
    _write(store["b", 1], sp, "b", 1, 1, "failed", "CUDA out of memory", entry_hash="an-old-hash")
    _write(store["b", 1], sp, "b", 1, 2, "failed", "evaluation failed: CUDA out of memory")
    dead = _dead_pid()
    store["b", 1].lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": "earlier"}))

    locks = [RunLock(store["a", 1].folder), RunLock(store["b", 0].folder)]
    for lock in locks:
        lock.acquire()
    try:
        yield path, sp, runs, dead
    finally:
        for lock in locks:
            lock.release()


def test_states_counts_and_first_failure(sweep) -> None:
    path, sp, runs, dead = sweep
    by = {(s.entry, s.seed): s for s in sweep_status(sp, runs)}
    me = f"{socket.gethostname()}:{os.getpid()}"
    assert [(k, s.state) for k, s in by.items()] == [
        (("a", 0), "trained"), (("a", 1), "evaluating"), (("b", 0), "training"), (("b", 1), "not started")]
    counts = {k: (s.done, s.failed, s.stale, s.pending, s.total) for k, s in by.items()}
    assert counts == {("a", 0): (3, 0, 0, 0, 3), ("a", 1): (1, 1, 0, 1, 3), ("b", 0): (0, 0, 0, 3, 3),
                      ("b", 1): (0, 1, 2, 2, 3)}
    assert by["a", 1].first_failure == (sp.cells("a")[2].id, LONG_REASON)
    assert by["b", 1].first_failure == ("ic-contrast-s3", "evaluation failed: CUDA out of memory")  # not the stale one
    assert by["a", 1].lock_owner == by["b", 0].lock_owner == me
    assert by["a", 1].lock.startswith(f"pid {os.getpid()} on host '{socket.gethostname()}'")
    assert by["a", 0].lock is None and by["b", 1].lock is None
    assert f"pid {dead}" in by["b", 1].stale_lock and "no longer running" in by["b", 1].stale_lock


def test_rendered_table(sweep) -> None:
    path, sp, runs, dead = sweep
    text = format_status(sweep_status(sp, runs), sp.name, runs)
    lines = text.splitlines()
    me = f"{socket.gethostname()}:{os.getpid()}"
    assert lines[0] == f"spec 'st', results under {runs / 'st'}"
    assert lines[1].split() == ["entry", "method", "seed", "state", "done", "failed", "pending", "stale", "lock"]
    assert [ln.split() for ln in lines[2:6]] == [
        ["a", "vsepp", "0", "trained", "3/3", "0", "0", "0"],
        ["a", "vsepp", "1", "evaluating", "1/3", "1", "1", "0", me],
        ["b", "vsepp", "0", "training", "0/3", "0", "3", "0", me],
        ["b", "vsepp", "1", "not", "started", "0/3", "1", "2", "2", "stale"]]
    col = lines[1].index("state")
    assert all(ln[col:].startswith(w) for ln, w in zip(lines[2:6], ("trained", "evaluating", "training", "not")))
    assert lines[6] == (f"4/12 cells done, 2 failed, 6 pending (2 of them stale: results of another configuration, "
                        f"redone by the next bench run); 2 entries running ({me})")
    fail = lines[7]
    assert fail.startswith("a/seed1: 1 failed, first ic-contrast-s3: training diverged: loss is nan at step 12 x")
    assert len(fail) == 160 and fail.endswith("...")
    assert lines[8] == "b/seed1: 1 failed, first ic-contrast-s3: evaluation failed: CUDA out of memory"
    assert lines[9].startswith("b/seed1: lock left behind, taken over by the next bench run: its owner (pid "
                               f"{dead} on host")
    assert len(lines) == 10


def test_cli_prints_the_table(sweep, capsys: pytest.CaptureFixture[str]) -> None:
    path, sp, runs, dead = sweep
    expected = format_status(sweep_status(sp, runs), sp.name, runs)
    assert cli.main(["status", str(path), "--results-dir", str(runs)]) == 0
    assert capsys.readouterr().out == expected


def test_reads_only_files(sweep, monkeypatch: pytest.MonkeyPatch) -> None:
    """No model, no data, no lock, no write: the folder is byte for byte the same, the dataset root still absent."""
    import torch

    from rcit_bench.bench import runner

    path, sp, runs, dead = sweep

    def refuse(*args, **kwargs):
        raise AssertionError("status must only read files")

    for owner, name in [(runner, "make_datamodule"), (runner, "build_model"), (torch, "load"), (RunLock, "acquire"),
                        (RunLock, "_remove_if"), (RunStore, "save_state"), (RunStore, "begin"),
                        (RunStore, "write_cell")]:
        monkeypatch.setattr(owner, name, refuse)
    def files() -> dict[Path, tuple[bytes, int]]:  # a held lock's time is refreshed by its heartbeat: not compared
        return {p: (p.read_bytes(), 0 if p.name == ".lock" else p.stat().st_mtime_ns)
                for p in runs.rglob("*") if p.is_file()}

    before = files()
    assert cli.main(["status", str(path), "--results-dir", str(runs)]) == 0
    assert files() == before
    assert not (path.parent / "no-data").exists()


def test_not_started_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An existing results dir without the spec's folder: every entry "not started", and where it looked."""
    path = _spec(tmp_path)
    runs = tmp_path / "runs"
    runs.mkdir()
    assert cli.main(["status", str(path), "--results-dir", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"(no results yet: {runs / 'st'} does not exist; the sweep has not started, or it writes to "
                        "another --results-dir)")
    assert [ln.split()[3:5] for ln in lines[3:7]] == [["not", "started"]] * 4
    assert lines[7] == "0/12 cells done, 0 failed, 12 pending"


def test_missing_results_dir_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _spec(tmp_path)
    with pytest.raises(UserError, match=r"Results directory '.*nowhere' does not exist; pass the --results-dir the "
                                        r"bench used \(default 'runs'\)"):
        sweep_status(path, tmp_path / "nowhere")
    assert cli.main(["status", str(path), "--results-dir", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("rcit-bench status: error: Results directory")
