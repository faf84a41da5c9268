"""Sweep-level progress: which phase the run is in, how long it has taken, and an honest ETA.

Why a cost model: training steps and evaluation cells cost very different amounts (and per method), so "mean
seconds per cell so far x cells left" is off by orders of magnitude right after training. The ETA here is the
:class:`~rcit_bench.bench.costs.SweepPlan`'s prediction of every phase still to run, corrected by what this run
has measured so far: the fit in progress by its own step rate, later fits by (measured / predicted) of the fits
already done, evaluation by the same ratio of the cells already evaluated (before the first cell: the training
ratio, which carries how loaded the machine is). Without a plan (unit costs not measured) it falls back to this
run's own means, and says "?" until it has measured what the rest needs.

On a terminal the status is one line redrawn in place under the log; elsewhere (CI, SLURM logs) it is plain log
lines at each event: an entry starts, an epoch ends, an entry is trained, every tenth of the evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rcit_bench.bench.costs import SweepPlan, epochs_and_steps, fmt_s
from rcit_bench.utils import format_table

log = logging.getLogger(__name__)

__all__ = ["SweepProgress", "LiveLine", "progress_callback"]


@dataclass
class _Fit:
    """The fit in progress."""

    key: tuple[str, int]
    predicted_s: float
    steps: int  # at the maximum budget
    epochs: int
    per_epoch: int
    val_pred_s: float  # one validation, predicted
    start: float
    first_step: float | None = None
    steps_run: int = 0  # in this process (a resumed fit starts later)
    batches_done: int = 0  # of the whole fit, resumed ones included
    epoch: int = 0
    vals: int = 0
    val_s: float = 0.0  # measured validation time of this fit
    val_started: float | None = None


@dataclass
class SweepProgress:
    """Counts the sweep's phases and predicts the rest. `clock` is injectable (tests drive a fake one); `emit`
    receives every plain line; `live` is an optional :class:`LiveLine`; `trace` a file that gets one JSON line
    (elapsed, ETA, phase) per event, to compare predicted with actual times after the run."""

    total_cells: int
    plan: SweepPlan | None = None
    clock: Callable[[], float] = time.monotonic
    emit: Callable[[str], None] = log.info
    live: Any = None
    trace: Path | None = None
    n_fits: int = 0  # fits this run will do
    done: int = 0  # cells finished (evaluated, failed or skipped)
    skipped: int = 0
    start: float | None = None  # default: now
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds spent
    fits_done: int = 0
    _fit: _Fit | None = None
    _fit_pred_done: float = 0.0
    _fit_actual_done: float = 0.0
    _fits_left: dict[tuple[str, int], float] = field(default_factory=dict)  # predicted training seconds
    _eval_pred_left: float = 0.0
    _eval_pred_done: float = 0.0
    _eval_actual: float = 0.0
    _eval_start: float | None = None
    _eval_units: int = 0
    _eval_done_units: int = 0
    _eval_cells: list[str] = field(default_factory=list)
    _eval_seen: set[str] = field(default_factory=set)
    _last_plain: float = 0.0
    _next_tenth: int = 1
    _measured_fit_s: list[float] = field(default_factory=list)
    _what: str = ""
    fit_units: dict[str, dict[str, float]] = field(default_factory=dict)  # entry -> measured setup_s/step_s/val_s
    _measured_unit_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.start = self.clock() if self.start is None else self.start
        if self.plan is not None:
            self._fits_left = {(p.entry, p.seed): p.training_s for p in self.plan.entries if not p.trained}
            self.n_fits = len(self._fits_left)
            self._eval_pred_left = self.plan.evaluation_s
        if self.trace is not None:
            self.trace.parent.mkdir(parents=True, exist_ok=True)
            self.trace.write_text("")

    # ------------------------------------------------------------------------------------------- bookkeeping
    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def add_phase(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def skip(self, n: int) -> None:
        """Cells already done by an earlier run: nothing to do for them."""
        self.done += n
        self.skipped += n

    def _entry_plan(self, key: tuple[str, int]) -> Any:
        if self.plan is None:
            return None
        return next((p for p in self.plan.entries if (p.entry, p.seed) == key), None)

    # ------------------------------------------------------------------------------------------- training
    def fit_not_needed(self, entry: str, seed: int) -> None:
        """The (entry, seed) has its model already (or nothing pending): its predicted training is dropped."""
        self._fits_left.pop((entry, seed), None)
        if self._fit is not None and self._fit.key == (entry, seed):
            self.add_phase("loading trained models", self.clock() - self._fit.start)
            self._fit = None

    def entry_started(self, entry: str, seed: int, what: str = "") -> None:
        """An (entry, seed) with pending cells: its data and model are being built (and then trained or loaded).
        `what`: shown when its training starts (method, regime)."""
        key = (entry, seed)
        p = self._entry_plan(key)
        val_pred = (p.val_s / max(1, p.epochs)) if p is not None else 0.0
        self._fit = _Fit(key, self._fits_left.pop(key, 0.0), 0, 0, 1, val_pred, self.clock())
        self._what = what

    def fit_started(self, epochs: int, per_epoch: int, steps: int | None = None) -> None:
        """Training of the entry begun by :meth:`entry_started` starts (building its data and model counted as its
        own time): at most `epochs` x `per_epoch` batches, or `steps` when a step cap ends it sooner."""
        f = self._fit
        if f is None:
            return
        self._fits_left.pop(f.key, None)
        f.steps, f.epochs, f.per_epoch = steps or epochs * per_epoch, epochs, max(1, per_epoch)
        self.fits_done += 1
        total = max(self.n_fits, self.fits_done)
        what = f"{self._what}; " if self._what else ""
        self._event(f"training {self.fits_done}/{total}: {f.key[0]}/seed{f.key[1]} ({what}at most {epochs} "
                    f"epoch{'s' if epochs != 1 else ''} x {per_epoch} steps)")

    def batch_done(self, epoch: int, batch_in_epoch: int) -> None:
        f = self._fit
        if f is None:
            return
        now = self.clock()
        if f.first_step is None:
            f.first_step = now
        else:
            f.steps_run += 1  # steps after the first: the first one carries the fit's start-up
        f.epoch, f.batches_done = epoch, epoch * f.per_epoch + batch_in_epoch
        self._refresh()

    def validation_started(self) -> None:
        if self._fit is not None:
            self._fit.val_started = self.clock()

    def validation_done(self, epoch: int, rsum: float | None, sanity: bool = False) -> None:
        f = self._fit
        if f is None or f.val_started is None:
            return
        f.val_s += self.clock() - f.val_started
        f.val_started = None
        if sanity:
            return
        f.vals += 1
        where = f"{f.key[0]}/seed{f.key[1]}"
        shown = "" if rsum is None else f", val RSUM {rsum:.1f}"
        self._event(f"{where} epoch {epoch + 1}/{f.epochs}{shown}", plain_only=True)

    def fit_done(self, summary: str) -> None:
        """The fit ended (plateau or cap): its measured time corrects the predictions of the fits to come."""
        f = self._fit
        if f is None:
            return
        actual = self.clock() - f.start
        p = self._entry_plan(f.key)
        if p is not None and f.steps:
            # what the plan predicted for the work really done (early stopping ends a fit before its maximum)
            done_frac = min(1.0, f.batches_done / f.steps) if f.batches_done else 1.0
            self._fit_pred_done += p.setup_s + done_frac * (p.train_s + p.val_s)
            self._fit_actual_done += actual
        self._measured_fit_s.append(actual)
        self.add_phase("training", actual)
        if f.first_step is not None and f.steps_run:
            now = self.clock()
            self.fit_units[f.key[0]] = {
                "setup_s": f.first_step - f.start,  # data, model, W&B and the fit's start-up
                "step_s": max(0.0, now - f.first_step - f.val_s) / f.steps_run,  # checkpoints at epoch ends included
                "val_s": f.val_s / f.vals if f.vals else 0.0}
        self._fit = None
        self._event(f"{f.key[0]}/seed{f.key[1]} trained in {fmt_s(actual)}: {summary}")

    def cells_failed(self, n: int, where: str, reason: str) -> None:
        """An (entry, seed) whose training failed: its `n` cells are written as failed, not evaluated."""
        self.done += n
        self._fit = None
        self._event(f"{where}: {reason}; its {n} cells are recorded as failed")

    def ratios(self) -> tuple[float, float]:
        """(training, evaluation): measured / predicted seconds of the work done so far (1.0: nothing to compare)."""
        ev = self._eval_actual / self._eval_pred_done if self._eval_pred_done > 0 else 1.0
        return self._train_ratio(), ev

    def _train_ratio(self) -> float:
        return self._fit_actual_done / self._fit_pred_done if self._fit_pred_done > 0 else 1.0

    def _training_left(self) -> float | None:
        ratio, now = self._train_ratio(), self.clock()
        left = 0.0
        f = self._fit
        if f is not None:
            if f.first_step is not None and f.steps_run >= 2:
                rate = max(0.0, (now - f.first_step) - f.val_s) / f.steps_run
                vals_left = max(0, f.epochs - f.vals)
                val_each = f.val_s / f.vals if f.vals else f.val_pred_s * ratio
                left += max(0, f.steps - f.batches_done) * rate + vals_left * val_each
            elif self.plan is not None:
                left += max(0.0, f.predicted_s * ratio - (now - f.start))
            elif not self._measured_fit_s:
                return None
            else:
                left += max(0.0, _mean(self._measured_fit_s) - (now - f.start))
        if self._fits_left:
            if self.plan is not None:
                left += sum(self._fits_left.values()) * ratio
            elif self._measured_fit_s:
                left += len(self._fits_left) * _mean(self._measured_fit_s)
            else:
                return None
        return left

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluation_started(self, seed: int, units: int) -> None:
        """`units`: (entry, cell) results this seed's evaluation will write."""
        self._eval_start = self.clock()
        self._eval_units += units
        self._eval_seen = set()
        if units:
            self._event(f"evaluating seed {seed}: {units} results")

    def unit_predicted_s(self, entry: str, cell: Any) -> float:
        """Predicted seconds of one (entry, cell), with the cell's shared corruption on its first entry."""
        if self.plan is None or self.plan.costs is None or entry not in self.plan.costs.entries:
            return 0.0
        c = self.plan.costs.entries[entry]
        s = {"text": c.text_cell_s, "pointing_game": c.pointing_s}.get(cell.kind, c.image_cell_s)
        if cell.kind in ("imagenet_c", "rcit") and cell.id not in self._eval_seen:
            s += self.plan.costs.corrupt_s.get(cell.corruption, 0.0)
        return s

    def cell_done(self, entry: str, seed: int, cell: Any, status: str, seconds: float, first_of_entry: bool) -> None:
        pred = self.unit_predicted_s(entry, cell)
        if first_of_entry and self.plan is not None and self.plan.costs is not None and entry in self.plan.costs.entries:
            pred += self.plan.costs.entries[entry].caption_s  # caption reps are encoded with the first cell
        self._eval_seen.add(cell.id)
        self._eval_pred_done += pred
        self._eval_pred_left = max(0.0, self._eval_pred_left - pred)
        self._eval_actual += seconds
        self._measured_unit_s.append(seconds)
        self.done += 1
        self._eval_done_units += 1
        if cell.id not in self._eval_cells:
            self._eval_cells.append(cell.id)
        if status != "ok":
            self._event(f"{entry}/seed{seed} {cell.id}: {status}")
        now = self.clock()
        tenth = self._next_tenth * self._eval_units / 10
        if self._eval_done_units >= tenth or now - self._last_plain >= 60.0:
            while self._next_tenth * self._eval_units / 10 <= self._eval_done_units:
                self._next_tenth += 1
            self._event(f"evaluated {self._eval_done_units}/{self._eval_units} results ({entry} {cell.id})",
                        plain_only=True)
        self._refresh()

    def evaluation_done(self) -> None:
        if self._eval_start is not None:
            self.add_phase("evaluation", self.clock() - self._eval_start)
            self._eval_start = None

    def _evaluation_left(self) -> float | None:
        if self.plan is not None:
            ratio = (self._eval_actual / self._eval_pred_done) if self._eval_pred_done > 0 else self._train_ratio()
            return self._eval_pred_left * ratio + self.plan.leaderboard_s
        units_left = max(0, self.total_cells - self.done)
        if not units_left:
            return 0.0
        return units_left * _mean(self._measured_unit_s) if self._measured_unit_s else None

    # ------------------------------------------------------------------------------------------- display
    def eta(self) -> float | None:
        """Predicted seconds left, None when not known yet."""
        train, ev = self._training_left(), self._evaluation_left()
        return None if train is None or ev is None else train + ev

    def status(self) -> str:
        """The one-line status: phase and position, elapsed, ETA."""
        f = self._fit
        if f is not None and not f.steps:
            where = f"entry {f.key[0]}/seed{f.key[1]} | building data and model"
        elif f is not None:
            where = (f"training {self.fits_done}/{max(self.n_fits, self.fits_done)} {f.key[0]}/seed{f.key[1]} | "
                     f"epoch {f.epoch + 1}/{f.epochs} step {f.batches_done - f.epoch * f.per_epoch}/{f.per_epoch}")
        elif self._eval_start is not None:
            where = f"evaluating {self._eval_done_units}/{self._eval_units} results"
            if self._eval_cells:
                where += f" | cell {self._eval_cells[-1]}"
        else:
            where = f"{self.done}/{self.total_cells} cells"
        eta = self.eta()
        end = "" if eta is None else f" (total {fmt_s(self.elapsed + eta)})"
        return f"[{where}] elapsed {fmt_s(self.elapsed)} | ETA {fmt_s(eta)}{end}"

    def _event(self, text: str, plain_only: bool = False) -> None:
        now = self.clock()
        if self.trace is not None:
            eta = self.eta()
            with open(self.trace, "a") as fh:
                fh.write(json.dumps({"elapsed_s": round(now - self.start, 3), "eta_s": None if eta is None else
                                     round(eta, 3), "event": text}) + "\n")
        if self.live is not None:
            if not plain_only:
                self.emit(text)
            self._refresh(force=True)
        else:
            self._last_plain = now
            eta = self.eta()
            self.emit(f"{text} | elapsed {fmt_s(now - self.start)} | ETA {fmt_s(eta)}")

    def _refresh(self, force: bool = False) -> None:
        if self.live is not None:
            self.live.update(self.status(), force=force)

    def finished(self) -> None:
        """The run's end, in the trace (the actual total the ETAs are checked against)."""
        if self.trace is not None:
            with open(self.trace, "a") as fh:
                fh.write(json.dumps({"elapsed_s": round(self.elapsed, 3), "eta_s": 0.0, "event": "done"}) + "\n")

    def message(self, text: str) -> None:
        """A fact of the sweep (entry skipped, leaderboard written): one log line, on top of the live status."""
        self.emit(text)
        self._refresh(force=True)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


class LiveLine:
    """A status line redrawn in place at the bottom of a terminal; whatever else is written to stderr (log
    records, warnings, Lightning) goes above it. Used as a context manager around the sweep."""

    def __init__(self, stream: Any = None, min_interval_s: float = 0.25) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval_s = min_interval_s
        self.text = ""
        self._last = 0.0
        self._swapped: list[tuple[Any, Any]] = []

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            self.text = text
            return
        self.text, self._last = text, now
        self._draw()

    def _draw(self) -> None:
        width = shutil.get_terminal_size((200, 20)).columns
        self.stream.write("\r\x1b[K" + self.text[: max(10, width - 1)])
        self.stream.flush()

    def write(self, s: str) -> int:  # the stderr stand-in: clear the status, write, draw it again
        if self.text:
            self.stream.write("\r\x1b[K")
        n = self.stream.write(s)
        if s.endswith("\n") and self.text:
            self._draw()
        return n

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return True

    def __enter__(self) -> "LiveLine":
        original = sys.stderr
        sys.stderr = self  # type: ignore[assignment]
        self._swapped.append((sys, original))
        for name in (None, "lightning.pytorch", "lightning.fabric"):
            for h in logging.getLogger(name).handlers:
                if isinstance(h, logging.StreamHandler) and h.stream is original:
                    h.setStream(self)  # type: ignore[arg-type]
                    self._swapped.append((h, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for obj, original in reversed(self._swapped):
            if obj is sys:
                sys.stderr = original
            else:
                obj.setStream(original)
        self._swapped.clear()
        if self.text:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.text = ""


def progress_callback(progress: SweepProgress) -> Any:
    """A Lightning callback feeding the fit's epochs, steps and validations into the sweep's progress."""
    from lightning.pytorch.callbacks import Callback

    class SweepProgressCallback(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            per_epoch = int(trainer.num_training_batches) if math.isfinite(trainer.num_training_batches) else 0
            limits = {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,  # batches already limited
                      "accumulate_grad_batches": trainer.accumulate_grad_batches}
            progress.fit_started(*epochs_and_steps(per_epoch, limits))

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            progress.batch_done(int(trainer.current_epoch), batch_idx + 1)

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            progress.validation_started()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            rsum = trainer.callback_metrics.get("val/rsum")
            progress.validation_done(int(trainer.current_epoch), None if rsum is None else float(rsum),
                                     sanity=bool(trainer.sanity_checking))

    return SweepProgressCallback()


def final_report(spec: Any, entries: list[Any], results_dir: Path, progress: SweepProgress, summary: Any) -> str:
    """What the run found, for the terminal: per entry its clean RSUM, mean RSUM over the ImageNet-C cells, RSUM
    under the RCIT protocol (main rate, mean over its corruptions) and failed cells (means over seeds; current
    results only), then the time per phase and where the leaderboard is."""
    from rcit_bench.bench.results import iter_results

    hashes = {e.id: spec.entry_hash(e.id) for e in entries}
    rc = spec.evaluation.get("rcit_protocol") or {}
    main_rate = rc.get("main_pixel_noise_rate")
    cols: dict[str, dict[str, list[float]]] = {e.id: {"clean": [], "imagenet_c": [], "rcit": []} for e in entries}
    failed = {e.id: 0 for e in entries}
    for row in iter_results(results_dir, spec.name):
        if row.entry not in hashes or row.record.get("entry_hash") != hashes[row.entry]:
            continue
        if row.status != "ok":
            failed[row.entry] += 1
            continue
        rsum = row.metrics.get("rsum")
        if rsum is None:
            continue
        if row.kind == "clean" or (row.kind == "imagenet_c") or (row.kind == "rcit" and row.rate == main_rate):
            cols[row.entry][row.kind].append(float(rsum))

    def mean(xs: list[float]) -> str:
        return f"{sum(xs) / len(xs):.1f}" if xs else "-"

    rcit_head = "RCIT RSUM" + (f" (pixel noise rate {main_rate:g})" if main_rate is not None else "")
    rows = [("entry", "clean RSUM", "mean corrupted RSUM", rcit_head, "failed cells")]
    rows += [(e.id, mean(cols[e.id]["clean"]), mean(cols[e.id]["imagenet_c"]), mean(cols[e.id]["rcit"]),
              str(failed[e.id])) for e in entries]
    table = format_table(rows, right=range(1, len(rows[0])), rule=True)
    phases = ", ".join(f"{name} {fmt_s(sec)}" for name, sec in progress.phases.items())
    lines = [f"spec {spec.name} done in {fmt_s(progress.elapsed)}: {summary.evaluated} cells evaluated, "
             f"{summary.skipped} already done, {summary.failed} failed", *table, f"time: {phases}"]
    if summary.leaderboard is not None:
        lines.append(f"leaderboard: {summary.leaderboard}")
    return "\n".join(lines)
