"""Unit costs of a spec on this machine, and the wall time they predict, phase by phase.

Why: a sweep is a sum of a few unit costs times counts the spec fixes. Training steps and evaluation cells cost
very different amounts, and per method (a VSR++ step costs ~4 VSE++ steps on CPU), so a single "seconds per
cell" rate is wrong by orders of magnitude early in a run. Measured once per entry, the units predict the run
before it starts (``rcit-bench estimate``, the plan ``rcit-bench bench`` prints) and give the progress display
its ETA, which it then corrects with what the run itself measures.

The units, per entry (with its own config, data and batch size):
- ``setup_s``: building its datamodule and model and starting a Lightning fit (before the first step);
- ``step_s``: one training step, data loading and training-time corruption included (median of a few steps
  after a warm-up);
- ``val_s``: one validation pass (derived from the test-cell costs scaled to the validation split: encoding is
  linear in images, cross-attention scoring linear in image-caption pairs);
- ``caption_s``: encoding the test captions once (reused by every image cell);
- ``image_cell_s`` / ``text_cell_s`` / ``pointing_s``: evaluating one cell whose images are already built
  (encode, score, ranks, bootstrap intervals, image change);
and, shared by every entry of a seed, ``corrupt_s[name]``: building one cell's corrupted test images (measured on
a few images, scaled to the split). Training is predicted at its maximum budget: early stopping can only end it
sooner. The measured units are cached beside the results (``<results>/<spec>/unit_costs.json``) with the machine
they were measured on; a run rewrites the cache with what it measured, so the next estimate is the last run's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rcit_bench.utils import atomic_write_text, format_table

log = logging.getLogger(__name__)

__all__ = ["EntryCosts", "UnitCosts", "EntryPlan", "SweepPlan", "machine_key", "measure_unit_costs",
           "load_unit_costs", "save_unit_costs", "unit_costs", "plan_sweep", "format_plan", "train_batches_per_epoch"]

#: Training steps timed per entry after WARMUP_STEPS untimed ones (the first steps allocate and warm caches).
TIMED_STEPS = 4
WARMUP_STEPS = 2
#: Test images each corruption is timed on (its cost is linear in images; the slow ones cost ~0.05 s an image).
CORRUPT_SAMPLE = 16
CACHE_NAME = "unit_costs.json"


@dataclass
class EntryCosts:
    """Seconds of one entry's units on this machine (see the module docstring)."""

    setup_s: float
    step_s: float
    val_s: float
    caption_s: float
    image_cell_s: float
    text_cell_s: float
    pointing_s: float
    fit_overhead_s: float  # a fit's own work beside its steps: trainer start and teardown
    batches_per_epoch: int  # training batches of a full epoch of its datamodule
    entry_hash: str = ""
    wandb_included: bool = False  # setup_s measured in a real run already holds the W&B start of its runs


@dataclass
class UnitCosts:
    """Every entry's units, the shared corruption costs (seconds for one cell's test images), and where they come
    from (``measured`` now, or ``last run`` from the cache)."""

    machine: str
    entries: dict[str, EntryCosts] = field(default_factory=dict)
    corrupt_s: dict[str, float] = field(default_factory=dict)
    wandb_s: float = 0.0  # starting and finishing one offline W&B run (twice per entry: training, evaluation)
    wandb_start_s: float = 0.0  # once per process: W&B's service starting
    leaderboard_s: float = 0.0  # building the leaderboard (known from a last run only)
    source: str = "measured"
    measured_s: float = 0.0  # what measuring them took

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "entries": {k: asdict(v) for k, v in self.entries.items()},
                "corrupt_s": dict(self.corrupt_s), "wandb_s": self.wandb_s, "wandb_start_s": self.wandb_start_s,
                "leaderboard_s": self.leaderboard_s,
                "measured_s": self.measured_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> "UnitCosts":
        return cls(machine=d["machine"], entries={k: EntryCosts(**v) for k, v in d["entries"].items()},
                   corrupt_s={k: float(v) for k, v in d["corrupt_s"].items()}, wandb_s=float(d.get("wandb_s", 0.0)),
                   wandb_start_s=float(d.get("wandb_start_s", 0.0)),
                   leaderboard_s=float(d.get("leaderboard_s", 0.0)), source=source,
                   measured_s=float(d.get("measured_s", 0.0)))


def machine_key() -> str:
    """What unit costs depend on besides the spec: host, CPU threads, accelerator."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} | {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads | {gpu}"


def cache_path(results_dir: str | Path, spec_name: str) -> Path:
    return Path(results_dir) / spec_name / CACHE_NAME


def load_unit_costs(results_dir: str | Path, spec: Any, entries: list[Any]) -> UnitCosts | None:
    """The cached units when they were measured on this machine for these entries' configurations, else None."""
    path = cache_path(results_dir, spec.name)
    try:
        d = json.loads(path.read_text())
        costs = UnitCosts.from_dict(d, source=f"last run ({path})")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if costs.machine != machine_key():
        return None
    for e in entries:
        c = costs.entries.get(e.id)
        if c is None or c.entry_hash != spec.entry_hash(e.id):
            return None
    if any(name not in costs.corrupt_s for name in _grid_corruptions(spec, entries)):
        return None
    return costs


def unit_costs(spec: Any, entries: list[Any], results_dir: str | Path, use_wandb: bool = True,
               measure: bool = False) -> UnitCosts:
    """The unit costs of `entries`: the cached ones of the last run on this machine, else (or with `measure`)
    measured now and cached."""
    costs = None if measure else load_unit_costs(results_dir, spec, entries)
    if costs is None:
        log.info("measuring unit costs on this machine (a short fit and one cell of each kind per entry)...")
        costs = measure_unit_costs(spec, entries, seed=spec.seeds[0], use_wandb=use_wandb, progress=log.debug)
        save_unit_costs(results_dir, spec, costs)
    return costs


def save_unit_costs(results_dir: str | Path, spec: Any, costs: UnitCosts) -> Path:
    path = cache_path(results_dir, spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(costs.to_dict(), indent=1, sort_keys=True))
    return path


def train_batches_per_epoch(n_batches: int, trainer_kw: dict[str, Any]) -> int:
    """Training batches of one epoch as Lightning counts them under ``limit_train_batches`` (an int caps, a
    fraction scales)."""
    lim = trainer_kw.get("limit_train_batches")
    if lim is None:
        return n_batches
    if isinstance(lim, int) or float(lim) > 1.0:
        return min(n_batches, int(lim))
    return max(1, int(n_batches * float(lim)))


def epochs_and_steps(n_batches: int, trainer_kw: dict[str, Any]) -> tuple[int, int, int]:
    """(epochs, batches per epoch, total batches) of a fit at its maximum budget (``max_epochs`` and
    ``max_steps``, whichever ends it first; ``max_steps`` counts optimizer steps)."""
    per_epoch = train_batches_per_epoch(n_batches, trainer_kw)
    epochs = trainer_kw.get("max_epochs")
    epochs = 1000 if epochs in (None, -1) else int(epochs)  # Lightning's default when only max_steps is set
    total = epochs * per_epoch
    max_steps = trainer_kw.get("max_steps")
    if max_steps not in (None, -1):
        total = min(total, int(max_steps) * int(trainer_kw.get("accumulate_grad_batches", 1)))
        epochs = max(1, math.ceil(total / max(1, per_epoch)))
    return epochs, per_epoch, total


def trains(entry: Any) -> bool:
    """False for an entry of regime 'pretrained': loaded, never fitted (zero training time, no validation)."""
    from rcit_bench.data.datasets import PRETRAINED

    return entry.regime != PRETRAINED


def _grid_corruptions(spec: Any, entries: list[Any]) -> list[str]:
    names: list[str] = []
    for e in entries:
        for c in spec.cells(e):
            if c.corruption is not None and c.kind != "pointing_game" and c.corruption not in names:
                names.append(c.corruption)
    return names


# ------------------------------------------------------------------------------------------------ measuring
def _step_timer() -> Any:
    """A Lightning callback recording the wall time between consecutive training-batch ends (one step, data
    loading and training-time corruption included) and when the first batch started."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.first_start: float | None = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.first_start is None:
                self.first_start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.ends.append(time.perf_counter())

    return StepTimer()


def _measure_entry(spec: Any, entry: Any, seed: int) -> tuple[EntryCosts, Any]:
    import lightning as L

    from rcit_bench.bench import runner
    from rcit_bench.evaluation import CellEvaluator

    t0 = time.perf_counter()
    composed = runner.composed_config(spec, entry, seed, runner.method_config(spec, entry))
    dm = runner.make_datamodule(composed["data"])
    runner._seed(seed)
    model = runner.build_model(entry, composed, dm)
    tkw = runner.trainer_kwargs(spec, entry, composed)
    t_fit = time.perf_counter()
    setup_s = t_fit - t0  # datamodule (data read, vocabulary) and model
    step_s = fit_overhead_s = 0.0
    if trains(entry):
        timer = _step_timer()
        # one process: a multi-process entry is estimated from its 1-process step (benchmarks/ddp_overhead.py
        # measures what more processes change)
        keep = {k: tkw[k] for k in ("accelerator", "precision", "gradient_clip_val") if k in tkw}
        keep["devices"] = 1  # not Lightning's 'auto', which takes every GPU of a multi-GPU node
        trainer = L.Trainer(max_steps=WARMUP_STEPS + TIMED_STEPS, limit_val_batches=0, num_sanity_val_steps=0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[timer], **keep)
        trainer.fit(model, datamodule=dm)
        t_end = time.perf_counter()
        first, last = timer.first_start or t_fit, timer.ends[-1] if timer.ends else t_end
        gaps = [b - a for a, b in zip(timer.ends, timer.ends[1:])][WARMUP_STEPS - 1:]
        step_s = statistics.median(gaps) if gaps else (last - first)
        fit_overhead_s = (first - t_fit) + (t_end - last)  # trainer start, fit start-up and teardown
    model.eval()
    model.to(runner._eval_device(tkw))
    ev = CellEvaluator(model, dm, seed)
    t = time.perf_counter()
    ev.text_reps()
    caption_s = time.perf_counter() - t
    cells = spec.cells(entry)
    image_cells = [c for c in cells if c.kind in ("clean", "imagenet_c", "rcit")]
    image_cell_s = text_cell_s = pointing_s = 0.0
    if image_cells:
        c = next((c for c in image_cells if c.corruption is not None), image_cells[0])
        images = list(dm.image_loader("test", corruption=c.corruption, severity=c.severity, rate=c.rate))
        t = time.perf_counter()
        runner.result_sections(ev(c, images=images))
        image_cell_s = time.perf_counter() - t
    text = [c for c in cells if c.kind == "text"]
    if text:
        t = time.perf_counter()
        runner.result_sections(ev(text[0]))
        text_cell_s = time.perf_counter() - t
    if any(c.kind == "pointing_game" for c in cells):
        c = next(c for c in cells if c.kind == "pointing_game")
        t = time.perf_counter()
        ev(c)
        pointing_s = time.perf_counter() - t
    # validation: encode n_val images and 5 n_val captions, score them; scaled from the test split (a cross-
    # attention scorer's cost grows with pairs, i.e. with the square of the images)
    n_test = len(dm.caption_to_image("test").unique())
    r = len(dm.caption_to_image("val").unique()) / max(1, n_test)
    # a scorer over regions (cross-attention) costs per image-caption pair, i.e. with the square of the images
    regions = any(v.ndim == 3 for k, v in ev.image_reps().items() if k != "image_index")
    val_s = (r * caption_s + r * (r if regions else 1.0) * image_cell_s) if trains(entry) else 0.0
    costs = EntryCosts(setup_s=setup_s, step_s=step_s, val_s=val_s, caption_s=caption_s, image_cell_s=image_cell_s,
                       text_cell_s=text_cell_s, pointing_s=pointing_s, fit_overhead_s=fit_overhead_s,
                       batches_per_epoch=len(dm.train_dataloader()) if trains(entry) else 0,
                       entry_hash=spec.entry_hash(entry.id))
    return costs, dm


def measure_wandb_s() -> tuple[float, float]:
    """(seconds of one offline W&B run started and finished, seconds of W&B's own start-up once per process),
    from two runs in a temporary folder deleted after; zeros when W&B is disabled, and not measured online (it
    would create runs on the server)."""
    import tempfile

    from rcit_bench.bench.wandb_log import WandbRun, wandb_mode

    if wandb_mode() != "offline":
        return 0.0, 0.0
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            t = time.perf_counter()
            wb = WandbRun(enabled=True, run_id=f"unit-cost-probe-{i}", name="unit-cost-probe", save_dir=tmp)
            wb.log_cell("probe", {"rsum": 0.0})
            wb.finish()
            times.append(time.perf_counter() - t)
    return times[1], max(0.0, times[0] - times[1])


def measure_unit_costs(spec: Any, entries: list[Any], seed: int = 0, progress: Any = None,
                       use_wandb: bool = True) -> UnitCosts:
    """Measure every entry's units and the grid's corruption costs on this machine (a few seconds an entry: a
    short fit, one cell of each kind). Nothing is written to the results; the models are thrown away."""
    from rcit_bench.bench import runner
    from rcit_bench.data.datamodule import RetrievalDataModule

    from dataclasses import replace

    from rcit_bench.bench.spec import entry_family

    t0 = time.perf_counter()
    costs = UnitCosts(machine=machine_key())
    dm = None
    # entries that differ only in their mismatch rate (same model, data, budget and kinds of cells) cost the same
    by_family: dict[tuple[str, tuple[str, ...]], EntryCosts] = {}
    for i, e in enumerate(entries):
        family = (entry_family(spec, e.id), tuple(sorted({c.kind for c in spec.cells(e)})))
        if family in by_family:
            costs.entries[e.id] = replace(by_family[family], entry_hash=spec.entry_hash(e.id))
            continue
        if progress is not None:
            progress(f"measuring unit costs: entry {i + 1}/{len(entries)} {e.id}")
        costs.entries[e.id], dm = _measure_entry(spec, e, seed)
        by_family[family] = costs.entries[e.id]
    names = _grid_corruptions(spec, entries)
    if names and entries:
        composed = runner.composed_config(spec, entries[0], seed, runner.method_config(spec, entries[0]))
        small = RetrievalDataModule(**{**composed["data"], "limit_test": CORRUPT_SAMPLE})
        small.prepare_data()
        small.setup("test")
        n_small = len(small.caption_to_image("test").unique())
        n_test = len(dm.caption_to_image("test").unique()) if dm is not None else n_small
        cells = {c.corruption: c for e in entries for c in spec.cells(e) if c.corruption in names}
        list(small.image_loader("test"))  # warm-up: decoding caches, thread pools
        for j, name in enumerate(names):
            if progress is not None:
                progress(f"measuring unit costs: corruption {j + 1}/{len(names)} {name}")
            c = cells[name]
            t = time.perf_counter()
            list(small.image_loader("test", corruption=name, severity=c.severity, rate=c.rate))
            costs.corrupt_s[name] = (time.perf_counter() - t) * n_test / max(1, n_small)
    if use_wandb:
        costs.wandb_s, costs.wandb_start_s = measure_wandb_s()
    costs.measured_s = time.perf_counter() - t0
    return costs


# ------------------------------------------------------------------------------------------------ predicting
@dataclass
class EntryPlan:
    """One (entry, seed) of the sweep: its training at the maximum budget and its evaluation cells."""

    entry: str
    seed: int
    epochs: int
    steps_per_epoch: int
    steps: int
    cells: int
    setup_s: float
    train_s: float  # steps
    val_s: float  # every validation
    eval_s: float  # its cells (corruption excluded: shared)
    trained: bool = False  # already trained: nothing to fit
    done_cells: int = 0
    pretrained: bool = False  # regime 'pretrained': loaded, never fitted (its training time is loading the model)

    @property
    def training_s(self) -> float:
        return 0.0 if self.trained else self.setup_s + self.train_s + self.val_s


@dataclass
class SweepPlan:
    """The whole sweep by phase: what `rcit-bench estimate` prints and the progress display counts down."""

    entries: list[EntryPlan]
    corrupt_s: dict[int, float]  # seed -> building the corrupted test images of its pending cells
    costs: UnitCosts | None
    leaderboard_s: float = 0.0

    @property
    def training_s(self) -> float:
        return sum(p.training_s for p in self.entries)

    @property
    def evaluation_s(self) -> float:
        return sum(p.eval_s for p in self.entries) + sum(self.corrupt_s.values())

    @property
    def total_s(self) -> float:
        return self.training_s + self.evaluation_s + self.leaderboard_s


def plan_sweep(spec: Any, entries: list[Any], costs: UnitCosts,
               pending: dict[tuple[str, int], list[Any]] | None = None,
               trained: dict[tuple[str, int], bool] | None = None) -> SweepPlan:
    """Predicted seconds of every (entry, seed) and phase. `pending`: the cells each (entry, seed) still needs (default all); `trained`: which
    (entry, seed) already have their model (no training left)."""
    from rcit_bench.bench import runner

    plans: list[EntryPlan] = []
    corrupt: dict[int, float] = {}
    for seed in spec.seeds:
        seen: set[str] = set()
        for e in entries:
            c = costs.entries[e.id]
            cells = (pending or {}).get((e.id, seed), spec.cells(e))
            tkw = runner.trainer_kwargs(spec, e, runner.method_config(spec, e))
            epochs, per_epoch, steps = epochs_and_steps(c.batches_per_epoch, tkw) if trains(e) else (0, 0, 0)
            n = {k: sum(x.kind == k for x in cells) for k in ("clean", "imagenet_c", "rcit", "text", "pointing_game")}
            eval_s = (c.caption_s if cells else 0.0) + (n["clean"] + n["imagenet_c"] + n["rcit"]) * c.image_cell_s \
                + n["text"] * c.text_cell_s + n["pointing_game"] * c.pointing_s
            # W&B: the training and the evaluation part of its run
            setup = c.setup_s + c.fit_overhead_s + (0.0 if c.wandb_included else 2 * costs.wandb_s)
            plans.append(EntryPlan(e.id, seed, epochs, per_epoch, steps, len(cells), setup, steps * c.step_s,
                                   epochs * c.val_s, eval_s, trained=bool((trained or {}).get((e.id, seed))) or
                                   not cells, pretrained=not trains(e)))
            for x in cells:
                if x.kind in ("imagenet_c", "rcit") and x.id not in seen:
                    seen.add(x.id)
                    corrupt[seed] = corrupt.get(seed, 0.0) + costs.corrupt_s.get(x.corruption, 0.0)
    return SweepPlan(plans, corrupt, costs, leaderboard_s=costs.leaderboard_s + costs.wandb_start_s)


def fmt_s(seconds: float | None) -> str:
    """Seconds as 1h02m03s / 4m05s / 6s."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_plan(spec: Any, plan: SweepPlan) -> str:
    """The estimate as a table: per (entry, seed) its training budget and predicted training and evaluation time,
    then the shared corruption work and the total."""
    rows = [("entry", "seed", "budget", "training", "cells", "evaluation")]
    for p in plan.entries:
        budget = "trained" if p.trained else ("pretrained (not trained)" if p.pretrained else
                                              f"{p.epochs} x {p.steps_per_epoch} steps")
        rows.append((p.entry, str(p.seed), budget, "-" if p.trained else fmt_s(p.training_s), str(p.cells),
                     fmt_s(p.eval_s)))
    lines = format_table(rows, right=range(3, len(rows[0])), rule=True)
    costs = plan.costs
    lines += ["", f"corrupting the test images (shared by the entries): {fmt_s(sum(plan.corrupt_s.values()))}",
              f"predicted: training {fmt_s(plan.training_s)} + evaluation {fmt_s(plan.evaluation_s)}"
              + (f" + leaderboard {fmt_s(plan.leaderboard_s)}" if plan.leaderboard_s else "")
              + f" = {fmt_s(plan.total_s)} (training at its maximum budget; early stopping can end it sooner)"]
    if costs is not None:
        how = f"measured in {fmt_s(costs.measured_s)}" if costs.source == "measured" else f"from the {costs.source}"
        lines.append(f"unit costs {how} on {costs.machine}")
    return "\n".join(lines)
