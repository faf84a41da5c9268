"""A real training that diverges, end to end: Lightning lets the model's FloatingPointError out of ``fit``,
the runner records every cell of that entry as failed with the reason, trains and evaluates the other entry,
and the leaderboard shows the failure. (tests/test_runner.py checks the same flow with a fake ``train``.)"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from rcit_bench.bench import results as R
from rcit_bench.bench import runner as RN
from rcit_bench.bench.spec import validate_spec
from tiny_specs import TINY_MODEL as TINY
from tiny_specs import tiny_dataset, tiny_trainer


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> Any:
    """W&B off; one intra-op thread (two spinning threads on a loaded 2-core machine are ~20x slower)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.integration
def test_nan_loss_fails_that_entry_only_and_board_shows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = validate_spec({
        "name": "diverge",
        "dataset": tiny_dataset(tmp_path / "data"),
        "seeds": [0],
        "baseline": "good",
        "trainer": tiny_trainer(max_epochs=1),
        "entries": [{"id": "bad", "method": "vsepp", "regime": "clean", "overrides": TINY},
                    {"id": "good", "method": "vsepp", "regime": "clean", "overrides": TINY}],
        "evaluation": {"clean": True, "imagenet_c": {"corruptions": ["gaussian_noise"], "severities": [3]}},
    })
    build = RN.build_model

    def build_diverging(entry: Any, cfg: dict, dm: Any) -> Any:
        """The 'bad' entry's loss turns NaN at global step 2 (its real forward/backward otherwise)."""
        model = build(entry, cfg, dm)
        if entry.id == "bad":
            inner = model.compute_loss

            def nan_loss(batch: dict) -> Any:
                loss, logs = inner(batch)
                return (loss * float("nan") if model.global_step >= 2 else loss), logs

            model.compute_loss = nan_loss
        return model

    monkeypatch.setattr(RN, "build_model", build_diverging)
    s = RN.run_spec(spec, results_dir=tmp_path / "runs", use_wandb=False, leaderboard_dir=tmp_path / "board")

    n = len(spec.cells("bad"))
    assert (s.failed, s.evaluated, s.trained) == (n, n, ["bad/seed0", "good/seed0"])  # the sweep went on
    rows = {(r.entry, r.cell): r for r in R.iter_results(tmp_path / "runs", "diverge")}
    assert len(rows) == 2 * n
    for cell in spec.cells("bad"):
        bad, good = rows[("bad", cell.id)], rows[("good", cell.id)]
        assert bad.status == "failed" and bad.metrics == {}
        assert bad.reason.startswith("training diverged: Loss became nan at global step 2 (epoch 0) in method 'vsepp'")
        assert good.status == "ok" and 0 <= good.metrics["rsum"] <= 600
    readme = (tmp_path / "board" / "README.md").read_text()
    assert "| bad | vsepp | clean | **failed**: training diverged: Loss became nan at global step 2" in readme
    with open(tmp_path / "board" / "results.csv", newline="") as f:
        statuses = sorted((r["entry"], r["status"]) for r in csv.DictReader(f))
    assert statuses == sorted([("bad", "failed")] * n + [("good", "ok")] * n)
