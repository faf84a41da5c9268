"""W&B logging: mode from the environment, disabled means no wandb at all, W&B's own dirs under the results
directory, and (integration) an offline run of the smoke spec: one run per (entry, seed) whose logged eval metrics
equal the result files, with training and evaluation in one history whose ``_step`` only grows, across reruns and
a killed process too."""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rcit_bench.bench import results as R
from rcit_bench.bench import wandb_log as W

import wandb_offline

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"


@pytest.mark.parametrize("env,expected", [(None, "offline"), ("online", "online"), ("DISABLED", "disabled"),
                                          ("dryrun", "offline")])
def test_mode_from_env(monkeypatch: pytest.MonkeyPatch, env: str | None, expected: str) -> None:
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert W.wandb_mode() == expected


def test_bad_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(ValueError, match=r"`WANDB_MODE` must be one of .*'offline'.*but got 'ofline'"):
        W.wandb_mode()


def test_disabled_run_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = W.WandbRun(enabled=False, run_id="abc", name="x", save_dir=tmp_path)  # --no-wandb wins over the env
    run.log_cell("clean", {"rsum": 1.0})
    run.finish()
    assert run.run is None and run.lightning_logger() is None and run.id_or_none is None and run.url is None
    assert not (tmp_path / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not W.WandbRun(enabled=True, run_id="abc", name="x", save_dir=tmp_path).enabled


def test_url_with_entity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ENTITY", "lab")
    run = W.WandbRun(enabled=True, run_id="r1", name="x", save_dir=tmp_path, project="p")
    assert run.url == "https://wandb.ai/lab/p/runs/r1"
    monkeypatch.delenv("WANDB_ENTITY")
    assert W.WandbRun(enabled=True, run_id="r1", name="x", save_dir=tmp_path).url is None


def test_record_reader_spans_blocks(tmp_path: Path) -> None:
    """The LevelDB-log reader reassembles records split over 32 KiB blocks (first/middle/last)."""
    big = bytes(range(256)) * 300  # 76.8 KB: spans three blocks
    small = b"hello"
    data = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))

    def put(payload: bytes) -> None:
        first = True
        while True:
            left = 32768 - len(data) % 32768
            if left < 7:
                data.extend(b"\x00" * left)
                continue
            n = min(len(payload), left - 7)
            last = n == len(payload)
            rtype = (1 if last else 2) if first else (4 if last else 3)
            data.extend(struct.pack("<IHB", 0, n, rtype) + payload[:n])
            payload, first = payload[n:], False
            if last:
                return

    put(small)
    put(big)
    put(small)
    path = tmp_path / "run-x.wandb"
    path.write_bytes(bytes(data))
    assert list(wandb_offline._wandb_records(path)) == [small, big, small]
    path.write_bytes(b"NOPE" + bytes(data[4:]))
    with pytest.raises(ValueError, match="not a W&B run file"):
        list(wandb_offline._wandb_records(path))


def test_offline_segments_in_order(tmp_path: Path) -> None:
    """Every segment of a run id is read, the ``-N`` folders of segments started in the same second included,
    ordered by start time then N; other runs and the ``latest-run`` link are not."""
    names = ["offline-run-20260101_000001-ab-10", "offline-run-20260101_000001-ab-2", "offline-run-20260101_000001-ab",
             "offline-run-20260101_000000-ab", "offline-run-20260101_000001-ab-1"]
    for n in names:
        (tmp_path / "wandb" / n).mkdir(parents=True)
        (tmp_path / "wandb" / n / "run-ab.wandb").write_bytes(b"")
    other = tmp_path / "wandb" / "offline-run-20260101_000000-x-ab"
    other.mkdir()
    (other / "run-x-ab.wandb").write_bytes(b"")
    (tmp_path / "wandb" / "latest-run").symlink_to(tmp_path / "wandb" / names[0])
    found = [f.parent.name for f in wandb_offline.offline_segments(tmp_path, "ab")]
    assert found == ["offline-run-20260101_000000-ab", "offline-run-20260101_000001-ab",
                     "offline-run-20260101_000001-ab-1", "offline-run-20260101_000001-ab-2",
                     "offline-run-20260101_000001-ab-10"]
    assert [f.parent.name for f in wandb_offline.offline_segments(tmp_path, "x-ab")] == [other.name]


_OWN = ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")


def test_wandb_dirs_under_results_unless_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("WANDB_DIR", *_OWN):
        monkeypatch.delenv(var, raising=False)
    runs = tmp_path / "runs"
    dirs = W.wandb_dirs(runs)
    assert dirs["WANDB_DIR"] == str(runs)
    assert {v: Path(dirs[v]) for v in _OWN} == {"WANDB_CACHE_DIR": runs / "wandb" / "cache",
                                                  "WANDB_DATA_DIR": runs / "wandb" / "data",
                                                  "WANDB_CONFIG_DIR": runs / "wandb" / "config"}
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "my-cache"))
    dirs = W.wandb_dirs(runs)
    assert dirs["WANDB_DIR"] == str(tmp_path / "mine") and dirs["WANDB_CACHE_DIR"] == str(tmp_path / "my-cache")
    assert Path(dirs["WANDB_DATA_DIR"]) == runs / "wandb" / "data"
    # online, the user's own config dir (where `wandb login --host` keeps the server) is left alone
    assert "WANDB_CONFIG_DIR" not in W.wandb_dirs(runs, "online")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "my-config"))
    assert W.wandb_dirs(runs, "online")["WANDB_CONFIG_DIR"] == str(tmp_path / "my-config")


def _record_init(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Wrap wandb.init to record the W&B environment and `dir` each call ran with."""
    import wandb

    seen: list[dict[str, Any]] = []
    real = wandb.init

    def init(*args: Any, **kwargs: Any) -> Any:
        seen.append({"dir": kwargs.get("dir"), **{v: os.environ.get(v) for v in _OWN}})
        return real(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    return seen


@pytest.mark.integration
def test_wandb_own_dirs_go_under_results(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """W&B's cache, staging and config dirs are the results dir's while wandb runs (not the home directory's),
    the user's own WANDB_* dirs win, and the environment is left as it was."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", *_OWN):
        monkeypatch.delenv(var, raising=False)
    seen = _record_init(monkeypatch)
    runs = tmp_path / "runs"
    wb = W.WandbRun(enabled=True, run_id="dirs0001", name="x", save_dir=runs)
    wb.log_cell("clean", {"rsum": 1.0})
    wb.finish()
    assert seen == [{"dir": str(runs), "WANDB_CACHE_DIR": str(runs / "wandb" / "cache"),
                     "WANDB_DATA_DIR": str(runs / "wandb" / "data"), "WANDB_CONFIG_DIR": str(runs / "wandb" / "config")}]
    assert not any(v in os.environ for v in _OWN)
    assert wandb_offline.read_offline_history(runs, "dirs0001")["eval/clean/rsum"] == 1.0
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "my-data"))
    wb = W.WandbRun(enabled=True, run_id="dirs0002", name="x", save_dir=runs)
    wb.log_cell("clean", {"rsum": 2.0})
    wb.finish()
    assert seen[1] == {"dir": str(tmp_path / "mine"), "WANDB_CACHE_DIR": str(runs / "wandb" / "cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "my-data"), "WANDB_CONFIG_DIR": str(runs / "wandb" / "config")}
    assert os.environ["WANDB_DATA_DIR"] == str(tmp_path / "my-data") and "WANDB_CACHE_DIR" not in os.environ
    assert wandb_offline.read_offline_history(tmp_path / "mine", "dirs0002")["eval/clean/rsum"] == 2.0


@pytest.mark.integration
@pytest.mark.parametrize("status,kept", [("success", True), ("failed", False)])
def test_finish_after_a_fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, status: str, kept: bool) -> None:
    """The runner's finish() after a successful fit keeps the run open, so the evaluation logs into the same
    segment and the next finish() ends it; after a failed fit (divergence) finish() ends the run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    wb = W.WandbRun(enabled=True, run_id=f"fit-{status}", name="x", save_dir=tmp_path)
    logger = wb.lightning_logger()
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.finalize(status)
    wb.finish()
    assert any(key[1] == f"fit-{status}" for key in W._LIVE) == kept
    wb.log_cell("clean", {"rsum": 3.0})
    wb.finish()
    assert not any(key[1] == f"fit-{status}" for key in W._LIVE)
    rows = wandb_offline.read_offline_rows(tmp_path, f"fit-{status}")
    assert len(wandb_offline.offline_segments(tmp_path, f"fit-{status}")) == (1 if kept else 2)
    assert _steps(rows) == [0, 1] and rows[0]["train/loss"] == 1.0 and rows[1]["eval/clean/rsum"] == 3.0


def _steps(rows: list[dict[str, Any]]) -> list[int]:
    return [r["_step"] for r in rows]


def _increasing(steps: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(steps))


@pytest.mark.integration
def test_offline_run_matches_result_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rcit_bench.bench.runner import run_spec

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    summary = run_spec(SMOKE, results_dir="runs", use_wandb=True, only="vsepp_clean")
    assert summary.evaluated > 0 and summary.failed == 0
    rows = list(R.iter_results("runs", "smoke"))
    run_ids = {r.wandb_run_id for r in rows}
    assert len(run_ids) == 1 and None not in run_ids
    run_id = run_ids.pop()
    history = wandb_offline.read_offline_history("runs", run_id)
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    for r in rows:
        for k in keys:
            assert history[f"eval/{r.cell}/{k}"] == pytest.approx(r.metrics[k], abs=1e-9), (r.cell, k)
    assert "train/loss" in history and "val/rsum" in history  # Lightning logged training
    # one (entry, seed) is one run and, in one process, one segment: training curves first, then every cell
    assert len(wandb_offline.offline_segments("runs", run_id)) == 1
    rows_logged = wandb_offline.read_offline_rows("runs", run_id)
    assert _increasing(_steps(rows_logged))
    train_steps = [r["_step"] for r in rows_logged if "train/loss" in r or "val/rsum" in r]
    eval_steps = [r["_step"] for r in rows_logged if any(k.startswith("eval/") for k in r)]
    assert train_steps and len(eval_steps) == len(rows) and max(train_steps) < min(eval_steps)
    # the leaderboard run carries the grid table and the plots
    board = next(Path("runs/wandb").glob("offline-run-*-smoke-board-*"))
    board_history = wandb_offline.read_offline_history("runs", board.name.split("-", 3)[-1])
    assert board_history["leaderboard/grid/_type"] == "table-file"
    assert any(k.startswith("leaderboard/rsum_vs_rate") for k in board_history)  # plots as wandb.Image
    rec = json.loads(R.cell_path("runs", "smoke", "vsepp_clean", 0, "clean").read_text())
    assert rec["provenance"]["wandb_run_id"] == run_id


@pytest.mark.integration
def test_rerun_continues_the_run_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun that re-evaluates deleted cells writes a second segment of the same run id whose steps come after
    the first one's: over both, the history holds the training curves and every cell, and ``_step`` only grows."""
    from rcit_bench.bench.runner import run_spec

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    run_spec(SMOKE, results_dir="runs", use_wandb=True, only="vsepp_clean", build_board=False)
    rows = list(R.iter_results("runs", "smoke"))
    (run_id,) = {r.wandb_run_id for r in rows}
    first = wandb_offline.read_offline_rows("runs", run_id)
    deleted = sorted(r.cell for r in rows)[:2]
    for cell in deleted:
        R.cell_path("runs", "smoke", "vsepp_clean", 0, cell).unlink()
    summary = run_spec(SMOKE, results_dir="runs", use_wandb=True, only="vsepp_clean", build_board=False)
    assert summary.evaluated == len(deleted) and not summary.trained and summary.failed == 0
    assert {r.wandb_run_id for r in R.iter_results("runs", "smoke")} == {run_id}
    assert len(wandb_offline.offline_segments("runs", run_id)) == 2
    both = wandb_offline.read_offline_rows("runs", run_id)
    assert both[:len(first)] == first and _increasing(_steps(both))
    again = both[len(first):]
    assert {k for r in again for k in r if k.startswith("eval/") and k.endswith("/rsum")} == \
        {f"eval/{c}/rsum" for c in deleted}
    keys = {k for r in both for k in r}
    assert {"train/loss", "val/rsum"} <= keys and {f"eval/{r.cell}/rsum" for r in rows} <= keys


_KILLED = """
import os, signal, sys
from rcit_bench.bench.wandb_log import WandbRun
wb = WandbRun(enabled=True, run_id="killed01", name="k", save_dir=sys.argv[1])
for i in range(3):
    wb.log_cell(f"c{i}", {"rsum": float(i)})
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.integration
def test_segment_after_a_killed_process_continues_its_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed without finishing its run: the next segment of that run id starts after every step the
    killed one may have written."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    # its own wandb service, as a rerun after a kill has (not the one this test process may have started)
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr
    wb = W.WandbRun(enabled=True, run_id="killed01", name="k", save_dir=tmp_path)
    wb.log_cell("after", {"rsum": 9.0})
    wb.finish()
    rows = wandb_offline.read_offline_rows(tmp_path, "killed01")
    assert len(wandb_offline.offline_segments(tmp_path, "killed01")) == 2
    assert _increasing(_steps(rows)) and rows[-1]["eval/after/rsum"] == 9.0 and rows[-1]["_step"] >= 3
