"""Kill trials: SIGKILL the runner at seeded random points of a tiny sweep, rerun it, get the same numbers.

An uninterrupted run of a tiny spec (2 entries x 2 epochs x 3 steps, 4 cells each) is the reference; it also
times the run's milestones (each entry's training starts, its first ``last.ckpt``, evaluation starts, k result
files, leaderboard). Kill times are drawn with ``random.Random(6)``, stratified over the stretches of that
timeline (:data:`SCHEDULE`: 5 in training, 3 of them after a ``last.ckpt`` so the rerun resumes from it, 4 in
evaluation, 1 while the leaderboard is written). Each trial waits for the milestone preceding its kill time
in its own run and sleeps the rest, so kills land in the intended stretch even when the machine is slower or
faster than during the reference. Then it reruns the spec to completion and checks: the rerun exits 0, every
JSON file parses, each cell has exactly one result file (and one leaderboard row), a kill after training
retrains nothing, and the metrics and best weights equal the reference bit for bit.

Speed: importing torch + Lightning costs ~7 s per interpreter on the 2-core test machine, more than a whole
tiny run. So one uninterrupted run uses ``python -m rcit_bench.cli bench`` in its own interpreter (its
numbers must equal the others), and the trials fork their runs from one pre-imported interpreter (a fork
server, as multiprocessing's): each run is still its own process running ``rcit_bench.cli.main``, and the
SIGKILL it gets is real.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rcit_bench.bench import results as R
from tiny_specs import TINY_MODEL as TINY
from tiny_specs import tiny_dataset, tiny_trainer

ENTRIES = ("vsepp_clean", "rcit")
CELLS = ("clean", "ic-gaussian_noise-s3", "rcit-salt_pepper-r0.6", "text-char_typo-l2")
SEED = 6  # issue #6
RUN_TIMEOUT_S = 120.0



def _spec(root: Path) -> dict[str, Any]:
    return {
        "name": "tiny",
        "description": "kill trials",
        "dataset": tiny_dataset(root / "data"),
        "seeds": [0],
        "baseline": "vsepp_clean",
        "trainer": tiny_trainer(max_epochs=2),
        "entries": [
            {"id": "vsepp_clean", "method": "vsepp", "regime": "clean", "overrides": TINY},
            {"id": "rcit", "method": "rcit", "regime": "paired", "overrides": TINY,
             "corruption_mix": [{"name": "speckle", "rate": 0.6}, {"name": "salt_pepper", "rate": 0.6}]},
        ],
        "evaluation": {"clean": True, "imagenet_c": {"corruptions": ["gaussian_noise"], "severities": [3]},
                       "rcit_protocol": {"corruptions": ["salt_pepper"], "rates": [0.6]},
                       "text": {"perturbations": ["char_typo"], "levels": [2]}},
    }


# The fork server: imports once, then forks one child per run on request (JSON lines on stdin/stdout).
# Torch never runs an op here before forking, so no thread pool is inherited half-initialised.
ZYGOTE = r"""
import json, os, sys, traceback
import torch, lightning  # noqa: F401
import rcit_bench.cli, rcit_bench.bench.runner, rcit_bench.bench.leaderboard, rcit_bench.data.datamodule  # noqa
import rcit_bench.models.registry, rcit_bench.evaluation  # noqa: F401
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "run":
        pid = os.fork()
        if pid == 0:
            fd = os.open(msg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2); os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            rc = 70
            try:
                rc = rcit_bench.cli.main(msg["args"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(rc)
        reply = {"pid": pid}
    elif msg["cmd"] == "poll":  # reaps the child when it has ended; the test never signals a reaped pid
        pid, status = os.waitpid(msg["pid"], os.WNOHANG)
        reply = {"ended": pid != 0, "rc": os.waitstatus_to_exitcode(status) if pid else None}
    else:
        break
    print(json.dumps(reply), flush=True)
"""


class ForkServer:
    """Client of :data:`ZYGOTE`."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.live: set[int] = set()

    def _ask(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "fork server died"
        return json.loads(line)

    def ready(self) -> None:
        assert self.proc.stdout and json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, args: list[str], log: Path) -> int:
        pid = self._ask(cmd="run", args=args, log=str(log))["pid"]
        self.live.add(pid)
        return pid

    def poll(self, pid: int) -> int | None:
        """Exit code (negative: killed by that signal) once ended, else None."""
        r = self._ask(cmd="poll", pid=pid)
        if r["ended"]:
            self.live.discard(pid)
        return r["rc"]

    def wait(self, pid: int, timeout: float = RUN_TIMEOUT_S) -> int:
        end = time.monotonic() + timeout
        while (rc := self.poll(pid)) is None:
            if time.monotonic() > end:
                os.kill(pid, signal.SIGKILL)
                self.poll(pid)
                pytest.fail(f"run {pid} did not finish within {timeout} s")
            time.sleep(0.05)
        return rc

    def close(self) -> None:
        for pid in list(self.live):  # only children this test started
            os.kill(pid, signal.SIGKILL)
            self.poll(pid)
        try:
            self._ask(cmd="quit")
        except (AssertionError, BrokenPipeError, json.JSONDecodeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _milestones() -> list[str]:
    out = ["start"]
    for e in ENTRIES:
        out += [f"train:{e}", f"ckpt:{e}"]
    return out + ["eval"] + [f"results:{k}" for k in range(1, len(ENTRIES) * len(CELLS) + 1)] + ["board", "done"]


MILESTONES = _milestones()


def _result_files(results: Path) -> list[Path]:
    return [p for p in (results / "tiny").glob("*/seed*/*.json") if p.name != "state.json"]


def _trained(results: Path, entry: str) -> bool:
    try:
        return bool(json.loads((R.run_dir(results, "tiny", entry, 0) / "state.json").read_text()).get("trained"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


TRAINING = re.compile(r"training \d+/\d+: \S+/seed0 ")  # the runner's line when a fit starts


def _reached(results: Path, board: Path, log: Path) -> int:
    """How many of MILESTONES (in order) this run has reached."""
    text = log.read_text() if log.exists() else ""
    n_results = len(_result_files(results))
    checks = {"start": "spec tiny (hash" in text, "eval": all(_trained(results, e) for e in ENTRIES),
              "board": (board / "README.md").exists(), "done": "spec tiny done" in text}
    for e in ENTRIES:
        checks[f"train:{e}"] = re.search(rf"training \d+/\d+: {e}/seed0 ", text) is not None
        checks[f"ckpt:{e}"] = (R.run_dir(results, "tiny", e, 0) / "checkpoints" / "last.ckpt").exists()
    for k in range(1, len(ENTRIES) * len(CELLS) + 1):
        checks[f"results:{k}"] = n_results >= k
    n = 0
    while n < len(MILESTONES) and checks[MILESTONES[n]]:
        n += 1
    return n


def _phase(results: Path, log: Path) -> str:
    """Where a killed run was, read from what it left behind."""
    if len(_result_files(results)) == len(ENTRIES) * len(CELLS):
        return "leaderboard"
    if all(_trained(results, e) for e in ENTRIES):
        return "evaluation"
    return "training" if TRAINING.search(log.read_text()) else "setup"


def _metrics(results: Path) -> dict[tuple[str, str], dict[str, float]]:
    return {(r.entry, r.cell): r.metrics for r in R.iter_results(results, "tiny")}


def _best_weights(results: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for e in ENTRIES:
        state = json.loads((R.run_dir(results, "tiny", e, 0) / "state.json").read_text())
        out[e] = torch.load(state["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    return out


def _check_complete(results: Path, board: Path) -> None:
    """Every JSON parses; each cell has exactly one ok result file and one leaderboard row."""
    for p in results.rglob("*.json"):
        json.loads(p.read_text())  # a truncated file raises here
    found = sorted((p.parent.parent.name, p.stem) for p in _result_files(results))
    assert found == sorted((e, c) for e in ENTRIES for c in CELLS)
    assert all(r.status == "ok" for r in R.iter_results(results, "tiny"))
    import csv

    with open(board / "results.csv", newline="") as f:
        rows = [(r["entry"], r["cell"]) for r in csv.DictReader(f)]
    assert sorted(rows) == found


# Kill-time strata of the reference run: (from milestone, to milestone, trials, part of the stretch used).
# Training gets 5: epoch 1 of each entry (nothing to resume yet) and 3 after an entry's first last.ckpt (the
# rerun resumes it); evaluation 4; leaderboard writing 1 (first half: a faster trial is not done before it).
LAST = f"results:{len(ENTRIES) * len(CELLS)}"
SCHEDULE = (("start", "ckpt:vsepp_clean", 1, 1.0), ("ckpt:vsepp_clean", "train:rcit", 2, 1.0),
            ("train:rcit", "ckpt:rcit", 1, 1.0), ("ckpt:rcit", "eval", 1, 1.0), ("eval", LAST, 4, 1.0),
            (LAST, "board", 1, 0.5))


def _kill_times(at: dict[str, float], rng: random.Random) -> list[float]:
    """Seconds after "start", stratified: uniform within each of `n` equal parts of each SCHEDULE stretch."""
    out = []
    for lo, hi, n, part in SCHEDULE:
        out += [at[lo] + (i + rng.random()) / n * part * (at[hi] - at[lo]) for i in range(n)]
    return out


def _timed_run(server: ForkServer, args: list[str], d: Path, kill_at: float | None = None,
               at: dict[str, float] | None = None) -> tuple[int, dict[str, float]]:
    """Run in `d`, recording when each milestone is reached; with `kill_at`, SIGKILL the run that many
    seconds after "start", re-anchored at the last milestone before it (so a slower or faster machine
    still kills in the same stretch of work). Returns the exit code (-9: killed) and milestone times."""
    log = d / "log.txt"
    anchor = max((m for m in MILESTONES if at is not None and kill_at is not None and at[m] <= kill_at),
                 key=MILESTONES.index, default=None)
    pid = server.run(args, log)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    seen: dict[str, float] = {}
    rc = None
    while rc is None:
        n = _reached(d / "runs", d / "board", log)
        for m in MILESTONES[len(seen):n]:
            seen[m] = time.monotonic()
        if anchor is not None and anchor in seen:
            time.sleep(max(0.0, kill_at - at[anchor] - (time.monotonic() - seen[anchor])))
            if (rc := server.poll(pid)) is not None:  # finished first (already reaped: never signal it)
                return rc, seen
            os.kill(pid, signal.SIGKILL)
            return server.wait(pid), seen
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)
        rc = server.poll(pid)
    return rc, seen


@pytest.mark.integration
def test_sigkill_at_random_points_then_rerun_gives_identical_results(tmp_path: Path) -> None:
    t_test = time.monotonic()
    timing: dict[str, float] = {}
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tmp_path), sort_keys=False))
    # one intra-op thread: two spinning threads per run on a loaded 2-core machine are ~20x slower
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def args(d: Path) -> list[str]:  # no unit-cost estimate: it writes nothing but its cache (test_progress.py)
        return ["bench", str(spec_path), "--results-dir", str(d / "runs"), "--leaderboard-dir", str(d / "board"),
                "--no-wandb", "--no-estimate"]

    server = ForkServer(tmp_path, env)
    try:
        # an uninterrupted run with the real command line in a fresh interpreter (while the server imports)
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        with open(fresh / "log.txt", "w") as f:
            cli = subprocess.run([sys.executable, "-m", "rcit_bench.cli", *args(fresh)], cwd=tmp_path, env=env,
                                 stdout=f, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
        assert cli.returncode == 0, (fresh / "log.txt").read_text()[-3000:]
        timing["fresh_interpreter_run_s"] = round(time.monotonic() - t_test, 1)
        _check_complete(fresh / "runs", fresh / "board")
        server.ready()
        timing["server_ready_s"] = round(time.monotonic() - t_test, 1)
        # the reference: an uninterrupted run from the server, timing its milestones
        ref = tmp_path / "ref"
        ref.mkdir()
        rc, seen = _timed_run(server, args(ref), ref)
        assert rc == 0 and list(seen) == MILESTONES, (ref / "log.txt").read_text()[-3000:]
        at = {m: t - seen["start"] for m, t in seen.items()}
        _check_complete(ref / "runs", ref / "board")
        ref_metrics, ref_weights = _metrics(ref / "runs"), _best_weights(ref / "runs")
        assert _metrics(fresh / "runs") == ref_metrics  # forking from the server changes nothing

        trials = []
        for i, kill_at in enumerate(_kill_times(at, random.Random(SEED))):
            t0 = time.monotonic()
            d = tmp_path / f"trial{i}"
            d.mkdir()
            rc, _ = _timed_run(server, args(d), d, kill_at, at)
            killed = rc == -signal.SIGKILL
            assert killed or rc == 0, (d / "log.txt").read_text()[-3000:]
            phase = _phase(d / "runs", d / "log.txt") if killed else "finished first"
            left, ckpts = list(d.rglob("*.json")), len(list(d.rglob("last.ckpt")))
            tmp_left = [p.name for p in d.rglob("*.tmp")]  # an atomic write cut short: never read, never *.json
            for p in left:  # what a kill leaves behind is never a truncated file
                json.loads(p.read_text())
            rerun = server.wait(server.run(args(d), d / "rerun.txt"))
            rerun_log = (d / "rerun.txt").read_text()
            assert rerun == 0, rerun_log[-3000:]
            resumed = rerun_log.count("Restoring states from the checkpoint")
            if phase in ("evaluation", "leaderboard"):  # trained models are reused, never retrained
                assert not TRAINING.search(rerun_log)
            _check_complete(d / "runs", d / "board")
            assert _metrics(d / "runs") == ref_metrics, f"trial {i} ({phase})"
            weights = _best_weights(d / "runs")
            for e in ENTRIES:
                assert all(torch.equal(weights[e][k], ref_weights[e][k]) for k in ref_weights[e]), (i, e)
            trials.append({"trial": i, "kill_at_s": round(kill_at, 3), "phase": phase,
                           "result_files_left": len([p for p in left if p.name != "state.json"]),
                           "last_ckpts_left": ckpts, "tmp_files_left": len(tmp_left),
                           "rerun_resumed_trainings": resumed,
                           "trial_s": round(time.monotonic() - t0, 2)})
    finally:
        server.close()

    counts = {p: sum(t["phase"] == p for t in trials)
              for p in ("setup", "training", "evaluation", "leaderboard", "finished first")}
    summary = {"test_s": round(time.monotonic() - t_test, 1), **timing, "reference_s": round(at["done"], 2),
               "milestones_s": {m: round(t, 3) for m, t in at.items()}, "counts": counts, "trials": trials}
    print("kill trials:", json.dumps(summary, indent=1))
    (tmp_path / "kill_trials.json").write_text(json.dumps(summary, indent=1))
    assert len(trials) >= 10 and counts["finished first"] <= 1, counts
    assert counts["setup"] + counts["training"] >= 2 and counts["evaluation"] >= 2, counts
