"""Sweep progress: the ETA from recorded unit costs against a fake clock, the plain-line fallback off a terminal,
the live status line, `rcit-bench estimate` and its cache, the end-of-run report and the quiet console."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest

from rcit_bench.bench.costs import EntryCosts, UnitCosts, epochs_and_steps, fmt_s, format_plan, plan_sweep
from rcit_bench.bench.progress import LiveLine, SweepProgress, final_report
from rcit_bench.bench.spec import load_spec

SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke.yaml"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _costs(spec: Any) -> UnitCosts:
    """Recorded unit costs (seconds) of the smoke spec's two entries; smoke trains 1 epoch x 4 batches."""
    def entry(step: float) -> EntryCosts:
        return EntryCosts(setup_s=1.0, step_s=step, val_s=2.0, caption_s=1.0, image_cell_s=0.5, text_cell_s=1.0,
                          pointing_s=0.0, fit_overhead_s=0.0, batches_per_epoch=20,
                          entry_hash="")
    costs = UnitCosts(machine="test", entries={"vsepp_clean": entry(0.5), "rcit": entry(1.0)},
                      corrupt_s={"gaussian_noise": 2.0, "contrast": 1.0, "salt_pepper": 3.0})
    for e in spec.entries:
        costs.entries[e.id].entry_hash = spec.entry_hash(e.id)
    return costs


def test_plan_from_unit_costs() -> None:
    spec = load_spec(SMOKE)
    plan = plan_sweep(spec, list(spec.entries), _costs(spec))
    by = {p.entry: p for p in plan.entries}
    # training: setup 1 + 4 steps + one validation of 2 s; evaluation: captions once + 4 image cells + 1 text cell
    assert by["vsepp_clean"].training_s == pytest.approx(1 + 4 * 0.5 + 2)
    assert by["rcit"].training_s == pytest.approx(1 + 4 * 1.0 + 2)
    assert by["vsepp_clean"].eval_s == pytest.approx(1 + 4 * 0.5 + 1)
    assert plan.corrupt_s == {0: pytest.approx(2 + 1 + 3)}  # each corrupted cell built once, shared
    assert plan.total_s == pytest.approx(5 + 7 + 4 + 4 + 6)
    text = format_plan(spec, plan)
    assert "vsepp_clean  0     1 x 4 steps" in text and "= 26s" in text
    # an already trained entry has no training left; a step cap ends training before the epoch cap
    trained = plan_sweep(spec, list(spec.entries), _costs(spec), trained={("rcit", 0): True})
    assert trained.training_s == pytest.approx(5)
    assert epochs_and_steps(20, {"max_epochs": 8, "limit_train_batches": 0.5}) == (8, 10, 80)
    assert epochs_and_steps(20, {"max_epochs": 8, "max_steps": 30}) == (2, 20, 30)
    assert fmt_s(3725) == "1h02m05s" and fmt_s(65) == "1m05s" and fmt_s(4.4) == "4s" and fmt_s(None) == "?"


def test_eta_follows_the_cost_model_and_what_the_run_measured() -> None:
    spec = load_spec(SMOKE)
    clock, lines = Clock(), []
    plan = plan_sweep(spec, list(spec.entries), _costs(spec))
    p = SweepProgress(10, plan=plan, clock=clock, emit=lines.append)
    assert p.eta() == pytest.approx(26.0)  # nothing measured: the plan
    p.entry_started("vsepp_clean", 0, "vsepp, clean regime")
    clock.t = 1.0
    p.fit_started(1, 4)
    for t in (1.5, 2.0, 2.5):  # the first batch carries the start-up; then 0.5 s a step, as predicted
        clock.t = t
        p.batch_done(0, int((t - 1.0) / 0.5))
    # 1 step left at the measured 0.5 s + 1 validation (2 s predicted) + rcit's training 7 + evaluation 14
    assert p.eta() == pytest.approx(0.5 + 2 + 7 + 14)
    assert "training 1/2 vsepp_clean/seed0 | epoch 1/1 step 3/4" in p.status()
    clock.t = 3.0
    p.batch_done(0, 4)
    p.validation_started()
    clock.t = 5.0
    p.validation_done(0, 123.4)
    p.fit_done("best val RSUM 123.4")
    assert p.eta() == pytest.approx(7 + 14)  # it took what the plan said: no correction
    # rcit takes twice its prediction: the rest is scaled by measured / predicted (19 s for 12 s)
    p.entry_started("rcit", 0)
    clock.t = 6.0
    p.fit_started(1, 4)
    for i in range(1, 5):
        clock.t = 6.0 + 2 * i
        p.batch_done(0, i)
    clock.t = 19.0
    p.fit_done("best val RSUM 99.0")
    assert p.eta() == pytest.approx(14 * 19 / 12)  # evaluation not measured yet: the training ratio
    p.evaluation_started(0, 10)
    clean = next(c for c in spec.cells(spec.entry("vsepp_clean")) if c.kind == "clean")
    clock.t = 20.5
    p.cell_done("vsepp_clean", 0, clean, "ok", 1.5, first_of_entry=True)  # captions 1 + cell 0.5, as predicted
    assert p.eta() == pytest.approx(14 - 1.5)
    fog = next(c for c in spec.cells(spec.entry("vsepp_clean")) if c.kind == "imagenet_c")
    clock.t = 25.5
    p.cell_done("vsepp_clean", 0, fog, "ok", 5.0, first_of_entry=False)  # 2.5 s predicted (0.5 + corruption 2)
    assert p.eta() == pytest.approx((14 - 1.5 - 2.5) * 6.5 / 4.0)
    assert p.phases["training"] == pytest.approx(5 + 14)
    assert lines[0].startswith("training 1/2: vsepp_clean/seed0 (vsepp, clean regime; at most 1 epoch x 4 steps)")
    assert "vsepp_clean/seed0 epoch 1/1, val RSUM 123.4" in lines[1]
    assert lines[2].startswith("vsepp_clean/seed0 trained in 5s: best val RSUM 123.4 | elapsed 5s | ETA 21s")


def test_eta_without_unit_costs_waits_for_measurements() -> None:
    spec = load_spec(SMOKE)
    clock = Clock()
    p = SweepProgress(10, clock=clock, emit=lambda s: None)
    p.n_fits = 2
    p._fits_left = {("vsepp_clean", 0): 0.0, ("rcit", 0): 0.0}
    assert p.eta() is None and "ETA ?" in p.status()  # nothing measured: no made-up number
    p.entry_started("vsepp_clean", 0)
    clock.t = 10.0
    p.fit_done("")
    assert p.eta() is None  # the next fit's cost is known (10 s), the evaluation's is not
    p.entry_started("rcit", 0)
    clock.t = 14.0
    p.fit_done("")
    p.evaluation_started(0, 10)
    cell = spec.cells(spec.entry("rcit"))[0]
    p.cell_done("rcit", 0, cell, "ok", 2.0, first_of_entry=True)
    assert p.eta() == pytest.approx(9 * 2.0)


def test_trace_file_records_eta_at_each_event(tmp_path: Path) -> None:
    spec = load_spec(SMOKE)
    clock = Clock()
    p = SweepProgress(10, plan=plan_sweep(spec, list(spec.entries), _costs(spec)), clock=clock,
                      emit=lambda s: None, trace=tmp_path / "progress.jsonl")
    p.entry_started("vsepp_clean", 0)
    clock.t = 2.0
    p.fit_started(1, 4)
    rows = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert rows == [{"elapsed_s": 2.0, "eta_s": 24.0, "event": rows[0]["event"]}]
    assert rows[0]["event"].startswith("training 1/2: vsepp_clean/seed0")


def test_live_line_redraws_under_the_log() -> None:
    out = io.StringIO()
    live = LiveLine(stream=out, min_interval_s=0.0)
    live.update("[training 1/2] ETA 5s")
    live.write("a log line\n")
    assert out.getvalue() == "\r\x1b[K[training 1/2] ETA 5s" + "\r\x1b[K" + "a log line\n" + "\r\x1b[K[training 1/2] ETA 5s"
    throttled = LiveLine(stream=io.StringIO(), min_interval_s=3600.0)
    throttled.update("first", force=True)
    throttled.update("second")  # too soon: kept, drawn with the next write
    assert throttled.stream.getvalue().endswith("first") and throttled.text == "second"


def test_live_line_takes_over_stderr_and_log_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        with LiveLine(min_interval_s=0.0) as live:
            assert sys.stderr is live and handler.stream is live
            live.update("status")
            logging.getLogger("rcit_bench.test").warning("above the status")
        assert handler.stream is sys.stderr and sys.stderr is not live
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert "above the status\n\r\x1b[Kstatus" in err and err.endswith("\r\x1b[K")  # cleared when done


def test_plain_lines_off_a_terminal_and_the_final_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from test_runner import Fakes

    from rcit_bench.bench import runner as RN

    Fakes(monkeypatch)
    spec = load_spec(SMOKE)
    with caplog.at_level(logging.INFO, logger="rcit_bench"):
        s = RN.run_spec(spec, results_dir=tmp_path, use_wandb=False, build_board=False)  # pytest: not a terminal
    text = caplog.text
    assert "\r" not in text and "\x1b[K" not in text
    progress = [r.getMessage() for r in caplog.records if r.name == "rcit_bench.bench.progress"]
    assert [line.split(" trained in")[0] for line in progress[:2]] == ["vsepp_clean/seed0", "rcit/seed0"]
    assert progress[2].startswith("evaluating seed 0: 10 results")
    assert progress[-1].startswith("evaluated 10/10 results") and "| ETA 0s" in progress[-1]
    report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("spec smoke done")][0]
    lines = report.splitlines()
    assert lines[0].startswith("spec smoke done in") and lines[0].endswith("10 cells evaluated, 0 already done, 0 failed")
    assert lines[1].split() == ["entry", "clean", "RSUM", "mean", "corrupted", "RSUM", "RCIT", "RSUM", "(pixel", "noise", "rate", "0.6)",
                                "failed", "cells"]
    # the fakes' metrics: every cell of an entry has the same RSUM, so each column shows it
    rec = json.loads((tmp_path / "smoke" / "rcit" / "seed0" / "clean.json").read_text())
    rsum = f"{rec['metrics']['rsum']:.1f}"
    rcit_row = next(line for line in lines if line.startswith("rcit "))
    assert rcit_row.split()[1] == rsum and rcit_row.split()[-1] == "0"
    assert lines[-1].startswith("time: checks and unit costs")
    assert s.failed == 0
    # the report reads the result files: rebuilt after the fact, it says the same
    again = final_report(spec, list(spec.entries), tmp_path, SweepProgress(10), s)
    assert again.splitlines()[1:5] == lines[1:5]


def test_estimate_measures_then_reads_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from rcit_bench import cli

    spec = yaml.safe_load(SMOKE.read_text())
    spec["dataset"]["options"]["root"] = str(tmp_path / "data")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    args = ["estimate", str(path), "--results-dir", str(tmp_path / "runs"), "--no-wandb"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "estimate for spec 'smoke' (2 entries x 1 seeds, 10 cells)" in out and "unit costs measured in" in out
    assert "vsepp_clean  0     1 x 4 steps" in out and "rcit         0     1 x 4 steps" in out
    cache = json.loads((tmp_path / "runs" / "smoke" / "unit_costs.json").read_text())
    assert set(cache["entries"]) == {"vsepp_clean", "rcit"} and cache["entries"]["rcit"]["step_s"] > 0
    assert set(cache["corrupt_s"]) == {"gaussian_noise", "contrast", "salt_pepper"}
    assert cli.main(args) == 0
    assert "unit costs from the last run" in capsys.readouterr().out
    # a changed entry invalidates the cache: measured again
    spec["trainer"]["max_epochs"] = 2
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "unit costs measured in" in out and "2 x 4 steps" in out


def test_quiet_console_hides_third_party_deprecations_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from rcit_bench.cli import quiet_console

    monkeypatch.delenv("WANDB_SILENT", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_console(verbose=False)
        warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module="lightning.pytorch.x")
        warnings.warn_explicit("ours", DeprecationWarning, "y.py", 1, module="rcit_bench.models.base")
        warnings.warn_explicit("a real problem", UserWarning, "z.py", 1, module="torch.nn")
    assert [str(w.message) for w in seen] == ["ours", "a real problem"]
    assert logging.getLogger("lightning.pytorch").level == logging.WARNING
    import os

    assert os.environ["WANDB_SILENT"] == "true"
    logging.getLogger("lightning.pytorch").setLevel(logging.NOTSET)
