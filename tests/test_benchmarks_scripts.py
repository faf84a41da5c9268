"""The performance scripts in benchmarks/: their tables parse and the grid cost model counts what the runner does.

Fast on purpose (no training, no timing): the scripts' measuring paths are exercised by running them (make speed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

grid_cost = pytest.importorskip("grid_cost")
train_throughput = pytest.importorskip("train_throughput")


def _parse(lines: list[str]) -> list[dict[str, str]]:
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines if ln.startswith("|")]
    head, sep, body = rows[0], rows[1], rows[2:]
    assert all(set(c) <= {"-"} for c in sep)
    assert all(len(r) == len(head) for r in body)
    return [dict(zip(head, r)) for r in body]


def test_throughput_table_parses() -> None:
    row = {"method": "vsepp", "batch": 128, "steps": 10, "wall_s": 2.0, "ms_per_step": 200.0, "data_ms_per_step": 5.0,
           "pairs_per_s": 640.0, "flops_per_step": 4e9, "peak_rss_mb": 900.0, "image_size": 64,
           "precision": "32-true"}
    rows = _parse(train_throughput.table([row], peak_tflops=None))
    assert rows[0]["method"] == "vsepp"
    assert float(rows[0]["pairs/s"]) == pytest.approx(640.0)
    assert float(rows[0]["GFLOP/step"]) == pytest.approx(4.0)
    assert float(rows[0]["achieved GFLOP/s"]) == pytest.approx(20.0)


def test_machine_header_names_machine_and_command() -> None:
    head = train_throughput.machine_header("cpu").splitlines()
    assert head[0].startswith("# machine:") and "torch" in head[0] and "device cpu" in head[0]
    assert head[1].startswith("# command:")


def test_grid_model_counts_corruption_once_per_cell_and_text_once_per_model() -> None:
    from rcit_bench.bench.spec import load_spec

    spec = load_spec(BENCH / "quick.yaml")
    unit = {"n_img": 1000, "enc_img_s": 1.0, "enc_txt_s": 10.0, "score_s": 2.0}
    units = {e.method: dict(unit) for e in spec.entries}
    steps = {m: 0.5 for m in units}
    corrupt = {"n_images": 1000, "clean_s": 0.0, "per_corruption": {"a": 3.0, "b": 3.0}}
    pred = grid_cost.predict(spec, units, steps, corrupt)
    n_image_cells = pred["image_cells"]
    assert n_image_cells == 19 * 3 + 2 * 3
    # corrupted test images are built once per cell for all six entries (cell-major evaluation)
    assert pred["parts"]["corrupting test images (once per cell, shared)"] == pytest.approx(3.0 * n_image_cells)
    e = pred["per_entry"][0]
    cc = grid_cost.cell_counts(spec, spec.entries[0])
    assert e["eval_img_s"] == pytest.approx(cc["image"] * (1.0 + 2.0))
    assert e["eval_txt_s"] == pytest.approx(10.0 + cc["text"] * (10.0 + 2.0))  # captions once + per text cell
    epochs, per_epoch, batch = grid_cost.training_plan(spec, spec.entries[0])
    assert (epochs, per_epoch, batch) == (4, 60, 128)
    assert grid_cost.training_plan(spec, spec.entry("vsrpp"))[:2] == (3, 60)


def test_zero_shot_throughput_measures_the_tiny_model(one_thread: None) -> None:
    """The zero-shot throughput script runs its tiny row (a few images) and its table parses with positive rates."""
    zero_shot = pytest.importorskip("zero_shot_throughput")
    row = zero_shot.measure("tiny", n_images=8, n_captions=10, batch=4, repeats=1)
    rows = _parse(zero_shot.table([row]))
    assert rows[0]["model"] == "tiny" and rows[0]["image px"] == "32"
    assert float(rows[0]["images/s (all three)"]) > 0 and float(rows[0]["captions/s"]) > 0
    assert row["corrupt_s"] > 0 and row["tower_s"] > 0
