"""W&B logging: mode from the environment, disabled means no wandb at all, and (integration) an offline
run of the smoke spec whose logged eval metrics equal the result files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

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
    assert any(k.startswith("train/") for k in history) and "val/rsum" in history  # Lightning logged training
    # the leaderboard run carries the grid table and the plots
    board = next(Path("runs/wandb").glob("offline-run-*-smoke-board-*"))
    board_history = wandb_offline.read_offline_history("runs", board.name.split("-", 3)[-1])
    assert board_history["leaderboard/grid/_type"] == "table-file"
    assert any(k.startswith("leaderboard/rsum_vs_rate") for k in board_history)  # plots as wandb.Image
    rec = json.loads(R.cell_path("runs", "smoke", "vsepp_clean", 0, "clean").read_text())
    assert rec["provenance"]["wandb_run_id"] == run_id
