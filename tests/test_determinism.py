"""Same spec and seed on CPU: bit-identical metrics in two runs; another seed: another model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rcit_bench.bench import results as R
from rcit_bench.bench import runner as RN
from rcit_bench.bench.spec import load_spec

SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _metrics(results_dir: Path, spec_name: str) -> dict[tuple[str, int, str], dict[str, float]]:
    return {(r.entry, r.seed, r.cell): r.metrics for r in R.iter_results(results_dir, spec_name) if r.status == "ok"}


def test_two_runs_bit_identical_and_seeds_differ(tmp_path: Path) -> None:
    spec = load_spec(SMOKE)
    spec = dataclasses.replace(spec, seeds=[0, 1])
    RN.run_spec(spec, results_dir=tmp_path / "a", use_wandb=False, build_board=False)
    RN.run_spec(spec, results_dir=tmp_path / "b", use_wandb=False, build_board=False)
    a, b = _metrics(tmp_path / "a", spec.name), _metrics(tmp_path / "b", spec.name)
    assert len(a) == 2 * sum(len(spec.cells(e)) for e in spec.entries)
    assert a == b  # exact float equality, every cell, every metric
    differ = [k for k in a if k[1] == 0 and a[k] != a[(k[0], 1, k[2])]]
    assert len(differ) >= len(a) // 4  # seed 1 trains another model (and corrupts with other noise)
