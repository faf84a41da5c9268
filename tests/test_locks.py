"""One writer per (spec, entry, seed): a lock file names its owner; a second run stops (or waits) instead of
writing the same cells; a lock left by a killed run is taken over. Real processes, no mocks of the OS."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rcit_bench.bench.store import LockedError, RunLock
from tiny_specs import TINY_MODEL, tiny_dataset, tiny_trainer

HOLD = ("import sys, time\nfrom rcit_bench.bench.store import RunLock\n"
        "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)\n")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_owner_is_refused_then_a_killed_owner_is_taken_over(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LockedError, match=rf"is being written by another run \(pid {proc.pid} on host "
                                              rf"'{socket.gethostname()}'.*--wait-for-lock"):
            RunLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()  # the owner is dead: taken over
    assert f"pid {proc.pid}" in caplog.text and "is no longer running" in caplog.text
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_lock_from_another_host_is_kept_until_it_is_old(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / ".lock").write_text(json.dumps({"host": "gpu-node-7", "pid": 123, "started": "earlier"}))
    with pytest.raises(LockedError, match=r"pid 123 on host 'gpu-node-7'"):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / ".lock", (old, old))
    lock = RunLock(tmp_path, stale_after_s=600)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert "has not been refreshed for 60 min (owner: pid 123 on host 'gpu-node-7'" in caplog.text
    lock.release()


def test_two_real_runs_on_one_results_dir(tmp_path: Path) -> None:
    """While run A trains, run B on the same spec and results stops naming A; run C with --wait-for-lock waits,
    then finds A's cells done. Exactly one result file per cell, all written by A."""
    # long enough (40 epochs, no early stopping: ~10 s) for B and C to start while A trains
    spec = {"name": "locks", "dataset": tiny_dataset(tmp_path / "data"), "seeds": [0], "trainer": tiny_trainer(40),
            "early_stopping": False,
            "entries": [{"id": "e", "method": "vsepp", "overrides": TINY_MODEL}], "evaluation": {"clean": True,
            "imagenet_c": {"corruptions": ["contrast"], "severities": [1, 3]}}}
    path = tmp_path / "locks.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "rcit_bench.cli", "bench", str(path), "--results-dir", str(tmp_path / "runs"),
           "--leaderboard-dir", str(tmp_path / "board"), "--no-wandb"]
    a = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "runs" / "locks" / "e" / "seed0" / ".lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "run A never took the lock"
    b = subprocess.run(cmd, env=env, capture_output=True, text=True)
    c = subprocess.Popen(cmd + ["--wait-for-lock"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a_out, a_err = a.communicate(timeout=300)
    c_out, c_err = c.communicate(timeout=300)
    assert a.returncode == 0, a_err[-2000:]
    assert b.returncode == 2 and f"is being written by another run (pid {a.pid}" in b.stderr
    assert "Traceback" not in b.stderr and "training" not in b.stderr
    assert c.returncode == 0, c_err[-2000:]
    assert "0 cells evaluated, 3 already done" in c_err  # waited, then everything was done
    results = sorted(p.name for p in (tmp_path / "runs" / "locks" / "e" / "seed0").glob("*.json"))
    assert results == ["clean.json", "ic-contrast-s1.json", "ic-contrast-s3.json", "state.json"]
    assert not lock.exists()


def test_jobs_owning_disjoint_entries_never_meet(tmp_path: Path) -> None:
    """SLURM array jobs of one spec each own their entries' folders: their locks are independent."""
    a, b = RunLock(tmp_path / "spec" / "a" / "seed0"), RunLock(tmp_path / "spec" / "b" / "seed0")
    a.acquire()
    b.acquire()  # no wait, no error
    assert a.held and b.held
    a.release()
    b.release()
    assert not list(tmp_path.rglob(".lock"))
