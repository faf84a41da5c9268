"""The committed smoke leaderboard is what the code produces: a fresh run of the smoke spec (W&B offline, as
`make bench-smoke` runs it) rebuilds `leaderboards/smoke/` byte for byte. Run ids are derived from (spec,
entry, seed) and the board holds no wall times, so nothing in it changes between reruns of the same code."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "leaderboards" / "smoke"


def test_committed_smoke_board_is_reproduced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rcit_bench.bench.runner import run_spec

    monkeypatch.chdir(tmp_path)  # the spec's data root is relative: generated here, as in a fresh clone
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    board = COMMITTED.parent / f".smoke-check-{os.getpid()}"  # beside it: the same relative links
    try:
        summary = run_spec(ROOT / "benchmarks" / "smoke.yaml", results_dir="runs", use_wandb=True,
                           leaderboard_dir=board)
        assert summary.failed == 0
        shutil.copytree(board, tmp_path / "board")
    finally:
        shutil.rmtree(board, ignore_errors=True)
    made = sorted(p.name for p in (tmp_path / "board").iterdir())
    assert made == sorted(p.name for p in COMMITTED.iterdir())
    for name in made:
        fresh, committed = (tmp_path / "board" / name).read_bytes(), (COMMITTED / name).read_bytes()
        assert fresh == committed, (f"leaderboards/smoke/{name} is not what the code produces: regenerate it with "
                                    "`make bench-smoke` from a fresh clone and commit it")
