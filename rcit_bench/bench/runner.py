"""Benchmark runner: train each (entry, seed) once with Lightning, then evaluate every cell of the grid.

Work is organised so the expensive parts happen once: a model is trained once per (entry, seed)
(resumed from ``last.ckpt`` after an interruption), its caption representations are computed once and
reused for every image corruption cell, clean image representations once for the clean and the
text-perturbation cells, and corrupted image representations once per corruption cell. Every finished
cell is written to its own JSON file immediately (:mod:`rcit_bench.bench.results`), so a sweep can be
killed at any point and rerun: finished cells are skipped, a trained model is not retrained.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


from rcit_bench.bench import results as R
from rcit_bench.bench.costs import fmt_s
from rcit_bench.bench.progress import SweepProgress, progress_callback
from rcit_bench.bench.spec import (
    Cell,
    Entry,
    Spec,
    config_path,
    deep_merge,
    load_spec,
    method_class,
    sha256_json,
)
from rcit_bench.bench.store import CheckpointError, RunStore, load_checkpoint
from rcit_bench.bench.wandb_log import WandbRun
from rcit_bench.data.datasets import PRETRAINED, dataset_info
from rcit_bench.distributed import barrier, broadcast_object, get_rank, get_world_size, is_distributed
from rcit_bench.errors import UserError
from rcit_bench.evaluation import CellEvaluation, CellEvaluator

log = logging.getLogger(__name__)

@dataclass
class SweepSummary:
    """What a run did; returned by :func:`run_spec` (also handy for tests and scripts)."""

    spec: str
    results_dir: Path
    total_cells: int = 0
    evaluated: int = 0
    skipped: int = 0
    failed: int = 0
    trained: list[str] = field(default_factory=list)  # "<entry>/seed<k>" trained (or resumed) in this run
    leaderboard: Path | None = None


# ----------------------------------------------------------------------------------------------------------
# building blocks


def method_config(spec: Spec, entry: Entry) -> dict[str, Any]:
    """The entry's method config with its overrides deep-merged (sections model/optim/trainer/data)."""
    from rcit_bench.models.registry import load_method_config

    return deep_merge(load_method_config(config_path(spec, entry)), entry.overrides)


def datamodule_kwargs(spec: Spec, entry: Entry, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Datamodule arguments: the method config's ``data`` < the spec's dataset options < what the runner
    sets (dataset kind, seed, training corruption from the regime)."""
    kw = dict(cfg.get("data") or {})
    kw.update(spec.dataset_options)
    kw["dataset"] = spec.dataset_kind
    kw["seed"] = seed
    kw["train_corruption"] = entry.regime
    if entry.regime in ("clean", PRETRAINED):  # no training corruption (a pretrained entry is never trained)
        kw.pop("corruption_mix", None)
        kw.pop("augment_fraction", None)
    else:
        kw["corruption_mix"] = [dict(m) for m in entry.corruption_mix]
        if entry.augment_fraction is not None:
            kw["augment_fraction"] = entry.augment_fraction
    kw.pop("mismatch_rate", None)
    kw.pop("mismatch_seed", None)
    # a method with its own tokenizer (a pretrained model) names it: the data never has to agree with it by hand
    tokenizer = method_class(entry.method).tokenizer_for(dict(cfg.get("model") or {}))
    if tokenizer is not None:
        given = kw.get("text_encoder", "vocab")
        if given not in ("vocab", tokenizer):
            raise UserError(f"entry {entry.id!r}: `text_encoder` {given!r} (a data option) disagrees with the tokenizer "
                            f"method {entry.method!r} uses ({tokenizer!r}); remove the data option, the method sets it.")
        kw["text_encoder"] = tokenizer
    if entry.mismatch_rate:  # correspondence noise: the training split only (the datamodule keeps val/test clean)
        kw["mismatch_rate"], kw["mismatch_seed"] = entry.mismatch_rate, entry.mismatch_seed
    return kw


def trainer_kwargs(spec: Spec, entry: Entry, cfg: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments: method config < spec ``trainer`` < entry ``overrides.trainer`` (merged already)."""
    kw = dict(cfg.get("trainer") or {})
    kw.update(spec.trainer)
    kw.update((entry.overrides.get("trainer") or {}))
    return kw


def make_datamodule(kwargs: dict[str, Any]) -> Any:
    """Build and set up the datamodule before any training, so that a missing dataset fails first, with the
    datamodule's FileNotFoundError saying how to get it (synthetic data is generated here)."""
    from rcit_bench.data.datamodule import RetrievalDataModule

    dm = RetrievalDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def composed_config(spec: Spec, entry: Entry, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The one configuration an (entry, seed) is trained with: the method config with the entry's overrides,
    the datamodule arguments and trainer arguments the runner really passes, and the early-stopping rule.
    It is what gets saved with the checkpoint (``data_config``), logged to W&B, written beside the results
    (``config.yaml``) and hashed (``config_hash`` in every result record)."""
    model = dict(cfg.get("model") or {})
    if entry.small_loss is not None:  # the small-loss selection of noisy pairs, a training option of every method
        model["small_loss"] = entry.small_loss
    return {"method": entry.method, "regime": entry.regime, "seed": seed,
            "model": model, "optim": dict(cfg.get("optim") or {}),
            "data": datamodule_kwargs(spec, entry, seed, cfg), "trainer": trainer_kwargs(spec, entry, cfg),
            "early_stopping": spec.early_stopping}


def build_model(entry: Entry, cfg: dict[str, Any], dm: Any) -> Any:
    """Instantiate the method from its config (a :func:`composed_config` or a method config); the vocabulary
    size comes from the datamodule."""
    from rcit_bench.models.registry import build_method

    model_cfg = {k: v for k, v in cfg.items() if k in ("model", "optim", "data")}
    model_cfg.setdefault("model", {})
    vocab_size = getattr(dm, "vocab_size", None)
    if vocab_size is not None and "vocab_size" not in model_cfg["model"]:
        model_cfg["model"] = {**model_cfg["model"], "vocab_size": int(vocab_size)}
    return build_method(entry.method, **model_cfg)


def _seed(seed: int) -> None:
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)


def _eval_device(trainer_kw: dict[str, Any]) -> Any:
    """The device a trained model is evaluated on: the GPU when there is one (in a multi-process job, the rank's own
    GPU, LOCAL_RANK), else the CPU."""
    import os

    import torch

    acc = str(trainer_kw.get("accelerator", "auto"))
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0)
    return torch.device("cpu")


def parallelism_record(trainer_kw: dict[str, Any], global_batch: int | None) -> dict[str, Any]:
    """The ``parallelism`` section of every result record: how many processes trained and evaluated the model, the
    batch per rank and in all, and the device type (and process group backend)."""
    import torch

    world = get_world_size()
    device = _eval_device(trainer_kw).type
    backend = None
    if is_distributed():
        import torch.distributed as dist

        backend = dist.get_backend()
    return {"world_size": world, "per_rank_batch": None if global_batch is None else global_batch // world,
            "global_batch": global_batch,
            "device_type": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
            "backend": backend}


def _load(spec_path: str | Path) -> Spec:
    """A spec file or shipped name; a ``.spec.pkl`` is a Spec built in memory that a multi-process job's launcher
    pickled for its ranks."""
    if str(spec_path).endswith(".spec.pkl"):
        import pickle

        return pickle.loads(Path(spec_path).read_bytes())
    return load_spec(spec_path)


def _chosen_seeds(spec: Spec, seeds: Iterable[int] | None) -> list[int]:
    if seeds is None:
        return list(spec.seeds)
    chosen = [int(s) for s in seeds]
    unknown = [s for s in chosen if s not in spec.seeds]
    if unknown:
        raise UserError(f"Argument `seeds` must be seeds of spec {spec.name!r} ({list(spec.seeds)}), but got {unknown}.")
    return chosen


def _rng_states() -> dict[str, Any]:
    """The global RNG states (torch CPU/CUDA, numpy, python) as tensors and plain containers only, so that
    a checkpoint holding them still loads with ``weights_only=True``."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": list(internal), "gauss": py_gauss},
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def _rng_checkpoint() -> Any:
    """A callback that stores the global RNG states in every checkpoint and restores them on resume.

    Lightning checkpoints weights, optimizer, schedulers and loop counters but not the RNG, and the runner
    seeds afresh before fitting: without this, an epoch resumed after an interruption would draw other
    dropout masks / random impostors than the uninterrupted run and end with other weights.
    """
    from lightning.pytorch.callbacks import Callback

    class RngCheckpoint(Callback):
        @property
        def state_key(self) -> str:
            return "RngCheckpoint"

        def state_dict(self) -> dict[str, Any]:
            return _rng_states()

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            _set_rng_states(state_dict)

    return RngCheckpoint()


def budget_meter() -> Any:
    """A Lightning callback that measures the budget a model used (pairs seen, images encoded, training wall
    time, epochs) and its validation RSUM curve. Its state goes into every checkpoint, so a resumed run keeps
    counting where the interrupted one stopped."""
    from lightning.pytorch.callbacks import Callback

    class _Meter(Callback):
        def __init__(self) -> None:
            self.pairs = 0
            self.images = 0
            self.wall_s = 0.0
            self.curve: list[dict[str, float]] = []
            #: epoch -> precision / recall of the small-loss selection flagging the mismatched training pairs
            self.selection: dict[str, dict[str, float]] = {}
            self._t0: float | None = None

        @property
        def state_key(self) -> str:
            return "BudgetMeter"

        def elapsed(self) -> float:
            return self.wall_s + (time.monotonic() - self._t0 if self._t0 is not None else 0.0)

        def state_dict(self) -> dict[str, Any]:
            return {"pairs": self.pairs, "images": self.images, "wall_s": self.elapsed(),
                    "curve": [dict(c) for c in self.curve], "selection": {k: dict(v) for k, v in self.selection.items()}}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.pairs, self.images = int(state["pairs"]), int(state["images"])
            self.wall_s, self.curve = float(state["wall_s"]), [dict(c) for c in state["curve"]]
            self.selection = {k: dict(v) for k, v in state.get("selection", {}).items()}

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self._t0 = time.monotonic()

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self.wall_s, self._t0 = self.elapsed(), None
            self._measure_selection(trainer, pl_module)

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._measure_selection(trainer, pl_module)

        def _measure_selection(self, trainer: Any, pl_module: Any) -> None:
            """How well the small-loss selection (fitted at the end of the last epoch) flags the mismatched pairs:
            measured here against the datamodule's mismatch mask, which the model never sees."""
            posterior = getattr(pl_module, "small_loss_posterior", None)
            dm = trainer.datamodule
            got = posterior() if posterior is not None else None
            if got is None or trainer.current_epoch < 1 or not getattr(dm, "mismatch_rate", 0.0):
                return
            from rcit_bench.models.small_loss import selection_quality

            p_clean, seen = got
            mismatched = dm.mismatched_captions()
            n = min(len(p_clean), len(mismatched))
            quality = selection_quality(p_clean[:n], seen[:n], mismatched[:n])
            self.selection[str(int(trainer.current_epoch))] = {k: float(v) for k, v in quality.items()}

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            n = int(batch["tokens"].shape[0])
            self.pairs += n
            # RCIT encodes a clean and a corrupted copy of every image
            self.images += n + (int(batch["corrupted_images"].shape[0]) if "corrupted_images" in batch else 0)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or "val/rsum" not in trainer.callback_metrics:
                return
            point = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step),
                     "rsum": float(trainer.callback_metrics["val/rsum"])}
            if "val/modality_acc" in trainer.callback_metrics:
                point["modality_acc"] = float(trainer.callback_metrics["val/modality_acc"])
            self.curve.append(point)

    return _Meter()


@dataclass
class TrainResult:
    """The best checkpoint of a fit and the budget it used (``training`` section of every result record)."""

    checkpoint: str
    training: dict[str, Any]


def budget_record(meter: Any, trainer_kw: dict[str, Any], early: dict[str, Any] | None, stopped_early: bool,
                  epochs: int, optimizer_steps: int) -> dict[str, Any]:
    """The ``training`` section: what the model was given and what it used, and whether it plateaued.

    ``stop`` is ``plateau`` when early stopping ended the run (no improvement of val RSUM by more than
    `min_delta` for `patience` validations) and ``cap`` when the maximum budget did; ``still_improving`` marks
    a capped run whose last validation beat every earlier one by more than `min_delta`, and ``last_gain`` is by
    how much the last validation beat the best before it (negative: it did not)."""
    curve = list(meter.curve)
    best = max(curve, key=lambda c: c["rsum"]) if curve else None  # first of equal maxima, as ModelCheckpoint
    delta = 0.0 if early is None else float(early.get("min_delta", 0.0))
    gain = curve[-1]["rsum"] - max(c["rsum"] for c in curve[:-1]) if len(curve) > 1 else None
    out: dict[str, Any] = {
        "epochs": int(epochs), "optimizer_steps": int(optimizer_steps), "pairs_seen": meter.pairs,
        "images_encoded": meter.images, "train_wall_time_s": round(meter.elapsed(), 3),
        "best_epoch": None if best is None else best["epoch"] + 1,  # 1-based
        "best_val_rsum": None if best is None else best["rsum"],
        "stop": "plateau" if stopped_early else "cap",
        "still_improving": bool(not stopped_early and gain is not None and gain > delta), "last_gain": gain,
        "max_epochs": trainer_kw.get("max_epochs"), "max_steps": trainer_kw.get("max_steps"),
        "patience": None if early is None else early["patience"], "val_curve": curve,
    }
    if curve and "modality_acc" in curve[-1]:
        out["final_modality_acc"] = curve[-1]["modality_acc"]
    if getattr(meter, "selection", None):  # epochs done -> precision / recall of the small-loss selection
        out["small_loss_selection"] = {k: dict(v) for k, v in sorted(meter.selection.items(), key=lambda kv: int(kv[0]))}
    return out


def train(model: Any, dm: Any, store: RunStore, seed: int, trainer_kw: dict[str, Any], wb: WandbRun,
          early_stopping: dict[str, Any] | None = None, progress: SweepProgress | None = None) -> TrainResult:
    """Fit with Lightning (resuming from the store's ``last.ckpt``, RNG states and budget counters included) until
    val RSUM has not improved for ``early_stopping['patience']`` validations or the trainer's maximum budget is
    spent; returns the best checkpoint (val/rsum, max) and the budget used."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    _seed(seed)
    ckpt_dir = store.checkpoint_dir
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor="val/rsum", mode="max",
                           save_top_k=1, auto_insert_metric_name=False)
    # `save_last=True` only copies when the best improves, so after an epoch without improvement a killed run
    # would resume from an older epoch: its own callback writes last.ckpt after every epoch instead.
    latest = ModelCheckpoint(dirpath=str(ckpt_dir), filename=store.last_checkpoint.stem, monitor=None, save_top_k=1,
                             every_n_epochs=1, enable_version_counter=False, auto_insert_metric_name=False)
    meter = budget_meter()
    callbacks: list[Any] = [meter, ckpt, latest, _rng_checkpoint()]
    stopper = None
    if early_stopping is not None:
        stopper = EarlyStopping(monitor="val/rsum", mode="max", patience=int(early_stopping["patience"]),
                                min_delta=float(early_stopping.get("min_delta", 0.0)), check_on_train_epoch_end=False)
        callbacks.append(stopper)
    kw = {"enable_model_summary": False, **trainer_kw}
    if progress is not None:  # the sweep's display shows epoch and step; Lightning's own bar only when asked for
        callbacks.append(progress_callback(progress))
        kw.setdefault("enable_progress_bar", log.isEnabledFor(logging.DEBUG))
    if is_distributed():  # each rank loads its part of every global batch itself (RetrievalDataModule)
        kw["use_distributed_sampler"] = False
        if kw.get("strategy", "auto") in ("auto", "ddp"):  # heads a method does not train on (e.g. words) stay unused
            kw["strategy"] = "ddp_find_unused_parameters_true"
    trainer = L.Trainer(default_root_dir=str(store.folder), callbacks=callbacks, logger=wb.lightning_logger() or False,
                        **kw)
    resume = broadcast_object(store.resumable() if get_rank() == 0 else None)  # rank 0 may set a corrupt one aside
    if resume:
        log.info("%s: resuming from %s", store.folder.name, Path(resume).name)
    trainer.fit(model, datamodule=dm, ckpt_path=resume, weights_only=True)
    last = store.last_checkpoint
    best = ckpt.best_model_path if ckpt.best_model_path and Path(ckpt.best_model_path).is_file() else ""
    best = best or (str(last) if last.is_file() else "")
    if not best:
        raise RuntimeError(f"Training of {store.folder} produced no checkpoint (is max_epochs 0?).")
    stopped = stopper is not None and stopper.wait_count >= stopper.patience
    return TrainResult(best, budget_record(meter, trainer_kw, early_stopping, stopped, trainer.current_epoch,
                                           trainer.global_step))


def load_weights(model: Any, path: str) -> None:
    """Load a Lightning checkpoint's state dict into an already built model, with the safe loader."""
    state = load_checkpoint(path)  # first: a bad file is reported before anything touches the model
    model.load_state_dict(state["state_dict"])


def result_sections(out: Any) -> tuple[dict[str, Any], tuple[Any, Any, Any] | None]:
    """Record sections of one evaluated cell (tie counts, 95% bootstrap intervals, image change) and the
    per-query ranks the store writes beside the record."""
    from rcit_bench.metrics import bootstrap_from_ranks

    if not isinstance(out, CellEvaluation):
        return {}, None
    ci = bootstrap_from_ranks(out.ranks_i2t, out.ranks_t2i, out.caption_to_image, n_resamples=BOOTSTRAP_RESAMPLES,
                              confidence=0.95, seed=0)
    sec: dict[str, Any] = {"ties": out.tie_counts(), "intervals": {k: [float(lo), float(hi)] for k, (lo, hi) in ci.items()}}
    if out.image_change is not None:
        sec["image_change"] = out.image_change
    return sec, (out.ranks_i2t.numpy(), out.ranks_t2i.numpy(), out.caption_to_image.numpy())


def corruption_source(cell: Cell) -> dict[str, str]:
    """``{"corruption_source": ...}`` for a cell whose corruption says where its pixels come from (frost: the
    ImageNet-C photographs, or the procedural fallback when they are not installed), else nothing."""
    from rcit_bench.data.corruptions import corruption_info

    info = None if cell.corruption is None else corruption_info(cell.corruption)
    return {} if info is None or info.source is None else {"corruption_source": info.source()}


#: Resamples of the image-level cluster bootstrap stored with every cell (intervals at 95%).
BOOTSTRAP_RESAMPLES = 1000


# ----------------------------------------------------------------------------------------------------------
# the sweep


def run_spec(
    spec_path: str | Path | Spec,
    *,
    results_dir: str | Path = "runs",
    force: bool = False,
    use_wandb: bool = True,
    only: str | Iterable[str] | None = None,
    leaderboard_dir: str | Path | None = None,
    build_board: bool = True,
    wait_for_lock: bool = False,
    estimate: bool = False,
    live: bool | None = None,
    seeds: Iterable[int] | None = None,
) -> SweepSummary:
    """Train and evaluate every (entry, seed) of a spec, writing one result file per cell.

    results_dir: result files at ``results_dir/<spec>/<entry>/seed<k>/<cell>.json`` plus checkpoints and
      W&B runs (``results_dir/wandb``). force: retrain and re-evaluate everything. use_wandb: False means
      no W&B at all (else mode from WANDB_MODE, default offline). only: entry id(s) to run. leaderboard_dir:
      default ``leaderboards/<spec name>``; build_board=False skips the leaderboard. wait_for_lock: when another
      live run writes an (entry, seed) this run needs, wait for it instead of stopping (see store.RunLock).
      estimate: before training, read the unit costs of the last run on this machine or measure them (a few
      seconds an entry), print the plan with its predicted time, and base the ETA on it (see bench.costs).
      live: a status line redrawn in place (default: when stderr is a terminal), else plain progress lines.
      seeds: run only these of the spec's seeds (default all).

    An entry whose ``trainer.devices`` asks for W > 1 processes runs as a multi-process job
    (rcit_bench.bench.multiprocess.run_job): W ranks, each calling this function for that (entry, seed) inside the
    process group. There the runner is rank-aware: rank 0 decides what to train and evaluate (and broadcasts it) and
    alone writes result files, run state, configs and the W&B run; every rank trains on its part of each global
    batch and encodes its shard of the test data.
    """
    from rcit_bench.bench.progress import LiveLine

    spec = spec_path if isinstance(spec_path, Spec) else _load(spec_path)
    only_ids = [only] if isinstance(only, str) else list(only or [])
    entries = [spec.entry(e) for e in only_ids] if only_ids else list(spec.entries)
    seed_list = _chosen_seeds(spec, seeds)
    results_dir = Path(results_dir)
    in_job, lead = is_distributed(), get_rank() == 0
    summary = SweepSummary(spec.name, results_dir)
    summary.total_cells = sum(len(spec.cells(e)) for e in entries) * len(seed_list)
    log.info("spec %s (hash %s): %d entries x %d seeds, %d cells", spec.name, spec.hash[:12], len(entries),
             len(seed_list), summary.total_cells)
    t0 = time.monotonic()
    worlds = preflight(spec, entries) if lead else None  # rank 0 checks (and generates synthetic data) first
    worlds = broadcast_object(worlds)
    if in_job and any(worlds[e.id] != get_world_size() for e in entries):
        raise UserError(f"run_spec inside a process group of {get_world_size()} processes can only run entries with "
                        f"`trainer.devices` {get_world_size()}; got {', '.join(f'{e.id} ({worlds[e.id]})' for e in entries)}. "
                        f"Run each multi-process entry as its own job (`only=`).")
    pending = broadcast_object({(e.id, seed): RunStore.of(results_dir, spec.name, e.id, seed).pending(
        spec.cells(e), spec.entry_hash(e.id), force) for seed in seed_list for e in entries} if lead else None)
    if not wait_for_lock and lead:  # a run that would stop at another run's lock stops now, before measuring anything
        for (entry_id, seed), cells in pending.items():
            if cells:
                RunStore.of(results_dir, spec.name, entry_id, seed).lock.check()
    costs, sweep_plan = _plan(spec, entries, results_dir, force, use_wandb, pending) if estimate else (None, None)
    live = sys.stderr.isatty() if live is None else live
    display = LiveLine() if live else contextlib.nullcontext()
    with display:
        progress = SweepProgress(summary.total_cells, plan=sweep_plan, live=display if live else None,
                                 trace=results_dir / spec.name / "progress.jsonl" if lead else None, start=t0)
        progress.add_phase("checks and unit costs", time.monotonic() - t0)
        progress.n_fits = progress.n_fits or len(entries) * len(seed_list)
        for seed in seed_list:
            prepared: list[_Prepared] = []
            try:
                for e in entries:
                    if worlds[e.id] > 1 and not in_job:  # its own W processes train and evaluate it
                        _run_multiprocess(spec, e, seed, worlds[e.id], results_dir, force, use_wandb,
                                          wait_for_lock, progress, summary)
                        continue
                    p = _prepare(spec, e, seed, results_dir, force, use_wandb, wait_for_lock, progress, summary)
                    if p is not None:
                        prepared.append(p)
                _evaluate_grid(spec, prepared, seed, progress, summary)
            finally:  # one writer per (entry, seed): the next run may take over now
                for p in prepared:
                    p.store.lock.release()
        summary.skipped = progress.skipped
        if build_board:
            from rcit_bench.bench.leaderboard import build_leaderboard

            t = time.monotonic()
            summary.leaderboard = build_leaderboard(spec, results_dir=results_dir, out_dir=leaderboard_dir)
            if use_wandb:
                _log_leaderboard(spec, results_dir, summary.leaderboard)
            progress.add_phase("leaderboard", time.monotonic() - t)
        progress.finished()
    if costs is not None:
        _save_measured_costs(spec, results_dir, costs, progress)
    if not in_job:  # a job's rank 0 reports to the command that started it, which reports the whole run
        from rcit_bench.bench.progress import final_report

        log.info("%s", final_report(spec, entries, results_dir, progress, summary))
    return summary


def _run_multiprocess(spec: Spec, entry: Entry, seed: int, world: int, results_dir: Path, force: bool,
                      use_wandb: bool, wait_for_lock: bool, progress: SweepProgress, summary: SweepSummary) -> None:
    """Train and evaluate one (entry, seed) as a job of `world` processes (rcit_bench.bench.multiprocess.run_job)
    and account for the result files its rank 0 wrote. A rank that fails stops the job: RankFailed is raised, as
    any training error is, after the finished cells are kept."""
    import pickle
    import tempfile

    from rcit_bench.bench.multiprocess import run_job

    where = f"{entry.id}/seed{seed}"
    store = RunStore.of(results_dir, spec.name, entry.id, seed)
    ehash = spec.entry_hash(entry.id)
    cells = spec.cells(entry)
    pending = store.pending(cells, ehash, force)
    if not pending:
        _all_done(progress, entry, seed, len(cells))
        return
    progress.skip(len(cells) - len(pending))
    if not wait_for_lock:
        store.lock.check()
    was_trained = bool(store.trained_checkpoint(ehash)) and not force
    composed = composed_config(spec, entry, seed, method_config(spec, entry))
    progress.entry_started(entry.id, seed, f"{entry.method}, {entry.regime} regime, {world} processes")
    progress.message(f"{where}: {world} processes train and evaluate it (rank 0 writes the results)")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rcit-bench-spec-") as tmp:
        spec_file = spec.path
        if spec_file is None:  # a spec built in memory: its ranks unpickle the very same object
            spec_file = Path(tmp) / f"{spec.name}.spec.pkl"
            spec_file.write_bytes(pickle.dumps(spec))
        run_job(spec_file, entry.id, seed, world, results_dir=results_dir, force=force, use_wandb=use_wandb,
                wait_for_lock=wait_for_lock, accelerator=composed["trainer"].get("accelerator", "auto"),
                pid_file=store.folder / "ranks.json")
    state = store.state()
    if state.get("trained") and not was_trained:
        summary.trained.append(where)
        progress.fit_done(_fit_summary(state.get("training") or {}))
    else:
        progress.fit_not_needed(entry.id, seed)
    per_cell = (time.monotonic() - t0) / len(pending)
    for k, cell in enumerate(pending):
        record = R.read_result(store.cell_path(cell.id)) or {}
        status = record.get("status", "missing")
        if status == "ok":
            summary.evaluated += 1
        else:
            summary.failed += 1
        if k == 0:
            progress.evaluation_started(seed, len(pending))
        progress.cell_done(entry.id, seed, cell, status if status == "ok" else f"failed: {record.get('reason', status)}",
                           per_cell, first_of_entry=k == 0)
    progress.evaluation_done()


def _plan(spec: Spec, entries: list[Entry], results_dir: Path, force: bool, use_wandb: bool,
          pending: dict[tuple[str, int], list[Cell]]) -> tuple[Any, Any]:
    """The unit costs (the last run's on this machine, else measured now) and the plan of what this run will do:
    its `pending` cells and the fits it needs; logged before anything trains."""
    from rcit_bench.bench.costs import format_plan, plan_sweep, unit_costs

    costs = unit_costs(spec, entries, results_dir, use_wandb=use_wandb)
    trained = {}
    for entry_id, seed in pending:
        best = RunStore.of(results_dir, spec.name, entry_id, seed).trained_checkpoint(spec.entry_hash(entry_id))
        trained[(entry_id, seed)] = not force and bool(best) and Path(str(best)).is_file()
    plan = plan_sweep(spec, entries, costs, pending=pending, trained=trained)
    log.info("plan:\n%s", format_plan(spec, plan))
    return costs, plan


def _save_measured_costs(spec: Spec, results_dir: Path, costs: Any, progress: SweepProgress) -> None:
    """Rewrite the unit-cost cache with what this run measured: each trained entry's own set-up, step and
    validation times, the evaluation units scaled by measured / predicted, the leaderboard's time, so that the next
    estimate is this run's."""
    from dataclasses import replace

    from rcit_bench.bench.costs import save_unit_costs

    _, ev = progress.ratios()
    entries = {}
    for k, c in costs.entries.items():
        fit = progress.fit_units.get(k)
        if fit is not None:  # W&B and the fit's start-up are inside the measured set-up
            c = replace(c, setup_s=fit["setup_s"], step_s=fit["step_s"], val_s=fit["val_s"] or c.val_s,
                        fit_overhead_s=0.0, wandb_included=True)
        entries[k] = replace(c, caption_s=c.caption_s * ev, image_cell_s=c.image_cell_s * ev,
                             text_cell_s=c.text_cell_s * ev, pointing_s=c.pointing_s * ev)
    cached = replace(costs, entries=entries, corrupt_s={k: v * ev for k, v in costs.corrupt_s.items()},
                     leaderboard_s=progress.phases.get("leaderboard", costs.leaderboard_s))
    save_unit_costs(results_dir, spec, cached)


def preflight(spec: Spec, entries: list[Entry]) -> dict[str, int]:
    """Check everything that can be checked before the first entry trains, and report every problem at once:
    each entry's composed config (overrides merged, model arguments the method accepts, datamodule arguments),
    its number of processes (no more than the devices here, a global batch that splits evenly over them), and
    every split of every dataset the entries use (loaded and validated, the first image of each decoded).
    Nothing is trained and no model is allocated. Returns each entry's number of processes."""
    from rcit_bench.bench.multiprocess import check_world

    from rcit_bench.data.datamodule import RetrievalDataModule
    from rcit_bench.models.registry import check_encoder

    problems: list[str] = []
    worlds: dict[str, int] = {}
    datamodules: dict[str, Any] = {}
    mismatched: list[tuple[Entry, Any]] = []  # entries with correspondence noise, and the datamodule of their data
    for entry in entries:
        try:
            composed = composed_config(spec, entry, spec.seeds[0], method_config(spec, entry))
            check_method_arguments(entry.method, composed)
            method_class(entry.method).check_model_config(composed["model"])  # e.g. pretrained weights at hand
            for arg in ("image_encoder", "text_encoder"):
                if arg in composed["model"]:
                    check_encoder(arg, composed["model"][arg])
            dm = RetrievalDataModule(**composed["data"])
            worlds[entry.id] = check_world(entry.id, composed["trainer"], dm.batch_size)
            dm = datamodules.setdefault(dm.test_data_key(), dm)
            if entry.mismatch_rate:
                mismatched.append((entry, dm))
        except (ValueError, TypeError, OSError) as err:
            problems.append(f"entry `{entry.id}`: {err}")
    for dm in datamodules.values():
        where = Path(dm.root).resolve() if dm.info.root_is_path else dm.root
        try:
            counts = dm.check_data()
            log.info("data: %s %s (%s)", dm.dataset, where, ", ".join(f"{k} {v} images" for k, v in counts.items()))
        except (ValueError, OSError) as err:
            problems.append(f"dataset {dm.dataset!r} at {where}: {err}")
    for entry, dm in mismatched:  # the noisy index can be built (e.g. two images at least), before training
        try:
            from rcit_bench.data.noise import mismatch_captions

            mismatch_captions(dm.split("train").caption_to_image, entry.mismatch_rate, entry.mismatch_seed)
        except (ValueError, OSError) as err:
            problems.append(f"entry `{entry.id}` (mismatch_rate {entry.mismatch_rate:g}): {err}")
    if problems:
        raise UserError(f"spec {spec.name!r} cannot run, nothing was trained:\n  - " + "\n  - ".join(problems))
    return worlds


def check_method_arguments(method: str, config: dict[str, Any]) -> None:
    """The model arguments of a composed config are all accepted by the method's constructor (checked on the
    signatures, without building the model), with the accepted names and a "did you mean" otherwise."""
    import inspect

    from rcit_bench.models.registry import flatten_method_config, get_method_class
    from rcit_bench.utils import did_you_mean

    from rcit_bench.models.base import RetrievalModule

    cls = get_method_class(method)
    accepted = {name for c in cls.__mro__ if isinstance(c, type) and issubclass(c, RetrievalModule)
                for name in inspect.signature(c.__init__).parameters} - {"self", "unused", "kwargs"}
    given = {k: v for k, v in config.items() if k in ("model", "optim", "data")}
    unknown = sorted(set(flatten_method_config(given)) - accepted - {"data_config"})
    if unknown:
        raise UserError(f"method {method!r} does not take {unknown} (from `model`/`optim` of its config or the "
                        f"entry's overrides); it takes {sorted(accepted)}.{did_you_mean(unknown[0], sorted(accepted))}")


@dataclass
class _Prepared:
    """A trained (entry, seed) with the cells it still needs."""

    entry: Entry
    store: RunStore
    dm: Any
    evaluator: Any
    wb: WandbRun
    pending: list[Cell]
    base_record: dict[str, Any]
    checkpoint: str
    sections: dict[str, Any]  # training budget and composed config, copied into every result record
    logged: list[tuple[str, dict[str, float]]] = field(default_factory=list)

    def record(self, cell: Cell, metrics: dict[str, float] | None, status: str, reason: str, sections: dict[str, Any],
               wall_time_s: float) -> dict[str, Any]:
        return R.make_record(**self.base_record, cell=cell.to_dict(), metrics=metrics, status=status, reason=reason,
                             sections={**self.sections, **sections}, checkpoint=self.checkpoint,
                             wandb_run_id=self.wb.id_or_none, wandb_url=self.wb.url, wall_time_s=wall_time_s)


def _prepare(spec: Spec, entry: Entry, seed: int, results_dir: Path, force: bool, use_wandb: bool,
             wait_for_lock: bool, progress: SweepProgress, summary: SweepSummary) -> _Prepared | None:
    """Lock the (entry, seed) folder and train (or resume, or reuse) its model when it has pending cells; the
    returned entry holds the lock. Divergence writes a failed result file for every pending cell and returns
    None (lock released); the sweep goes on."""
    store = RunStore.of(results_dir, spec.name, entry.id, seed)
    ehash = spec.entry_hash(entry.id)
    cells = spec.cells(entry)
    lead = get_rank() == 0  # in a multi-process job: rank 0 decides and writes, the others follow
    if not broadcast_object(bool(store.pending(cells, ehash, force)) if lead else None):
        _all_done(progress, entry, seed, len(cells))
        return None
    if lead:
        store.lock.acquire(wait=wait_for_lock)
    try:
        prepared = _train_or_load(spec, entry, seed, store, results_dir, ehash, cells, force, use_wandb, progress,
                                  summary)
    except BaseException:
        store.lock.release()
        raise
    if prepared is None:
        store.lock.release()
    return prepared


def _all_done(progress: SweepProgress, entry: Entry, seed: int, n_cells: int) -> None:
    """An (entry, seed) whose cells are all done already: nothing to train or evaluate."""
    progress.message(f"{entry.id}/seed{seed}: all {n_cells} cells done, skipping")
    progress.skip(n_cells)
    progress.fit_not_needed(entry.id, seed)


def _train_or_load(spec: Spec, entry: Entry, seed: int, store: RunStore, results_dir: Path, ehash: str,
                   cells: list[Cell], force: bool, use_wandb: bool, progress: SweepProgress,
                   summary: SweepSummary) -> _Prepared | None:
    where = f"{entry.id}/seed{seed}"
    lead = get_rank() == 0
    # again under the lock: another run may have finished some (rank 0 looks, every rank follows)
    pending = broadcast_object(store.pending(cells, ehash, force) if lead else None)
    progress.skip(len(cells) - len(pending))
    if not pending:
        progress.message(f"{where}: all {len(cells)} cells done (by another run), skipping")
        progress.fit_not_needed(entry.id, seed)
        return None
    progress.entry_started(entry.id, seed, f"{entry.method}, {entry.regime} regime")
    # a changed entry or --force: its old checkpoints go (rank 0 removes them before any rank looks)
    state = broadcast_object(store.begin(ehash, force, lambda: wandb_run_id(spec.name, ehash, seed)) if lead else None)
    composed = composed_config(spec, entry, seed, method_config(spec, entry))
    config_hash = sha256_json(composed)
    if lead:
        store.write_config(composed)
    wb = _wandb_run(spec, entry, seed, results_dir, use_wandb and lead, state["wandb_run_id"], composed, config_hash)
    prepared = _Prepared(entry, store, None, None, wb, pending,
                         {"spec_name": spec.name, "spec_hash": spec.hash, "entry_hash": ehash, "seed": seed,
                          "entry": {"id": entry.id, "method": entry.method, "regime": entry.regime,
                                    "config": entry.config}},
                         "", {"config": composed, "config_hash": config_hash})
    t0 = time.monotonic()
    try:
        if lead:  # rank 0 prepares the data (a synthetic dataset is generated once), then the others read it
            prepared.dm = make_datamodule(composed["data"])
        barrier()
        prepared.dm = prepared.dm or make_datamodule(composed["data"])
        prepared.sections["parallelism"] = parallelism_record(composed["trainer"],
                                                                getattr(prepared.dm, "batch_size", None))
        # nominal and actual correspondence noise of the training split (validation and test stay clean)
        prepared.sections["correspondence_noise"] = prepared.dm.mismatch_record()
        _seed(seed)  # initial weights from the seed alone, not from what ran before in this process
        model = build_model(entry, composed, prepared.dm)
        prepared.checkpoint = _trained_weights(model, prepared, state, seed, composed, spec, summary, progress)
    except FloatingPointError as err:  # training diverged: record it, keep sweeping
        reason = f"training diverged: {err}"
        log.error("%s: %s", where, reason)
        for cell in pending:
            if lead:
                store.write_cell(cell.id, prepared.record(cell, None, "failed", reason, {}, time.monotonic() - t0))
            summary.failed += 1
        progress.cells_failed(len(pending), where, reason)
        return None
    finally:
        wb.finish()  # ends the training phase; after a successful fit the run stays open for the evaluation
    model.to(_eval_device(composed["trainer"]))
    coco_1k = dataset_info(spec.dataset_kind).supports("coco_1k")
    prepared.evaluator = CellEvaluator(model, prepared.dm, seed, coco_1k=coco_1k)
    prepared.sections["training"] = state.get("training")
    return prepared


def _trained_weights(model: Any, p: _Prepared, state: dict[str, Any], seed: int, composed: dict[str, Any],
                     spec: Spec, summary: SweepSummary, progress: SweepProgress) -> str:
    """Load the best checkpoint of a finished training into `model`, or train (resuming) and load it; returns it."""
    where = f"{p.entry.id}/seed{seed}"
    if p.entry.regime == PRETRAINED:  # loaded as published: no fit, no checkpoint
        progress.fit_not_needed(p.entry.id, seed)
        state["training"] = pretrained_record(composed)
        return ""
    best = state.get("best_checkpoint") if state.get("trained") else None
    if best and Path(best).is_file():
        try:
            load_weights(model, best)
            progress.fit_not_needed(p.entry.id, seed)
            return str(best)
        except CheckpointError as err:  # set aside; train() resumes from last.ckpt or starts over
            barrier()  # every rank has read it before rank 0 moves it
            if get_rank() == 0:
                p.store.set_aside(Path(best), err)
    summary.trained.append(where)
    result = train(model, p.dm, p.store, seed, composed["trainer"], p.wb, early_stopping=spec.early_stopping,
                   progress=progress)
    progress.fit_done(_fit_summary(result.training))
    state.update(trained=True, best_checkpoint=result.checkpoint, training=result.training)
    if get_rank() == 0:
        p.store.save_state(state)
    load_weights(model, result.checkpoint)
    return result.checkpoint


def pretrained_record(composed: dict[str, Any]) -> dict[str, Any]:
    """The ``training`` section of an entry of regime 'pretrained': it was loaded, not trained, and from what."""
    return {"trained": False, "regime": PRETRAINED, "pretrained": (composed.get("model") or {}).get("pretrained"),
            "note": "pretrained (not trained): evaluated zero-shot, no fit and no checkpoint"}


def _fit_summary(training: dict[str, Any]) -> str:
    """'best val RSUM 412.3 at epoch 7 of 8, stopped at the cap' from a fit's budget record."""
    if training.get("best_val_rsum") is None:
        return f"{training['epochs']} epoch(s), no validation"
    stop = "stopped on a plateau" if training["stop"] == "plateau" else "stopped at the epoch cap"
    return (f"best val RSUM {training['best_val_rsum']:.1f} at epoch {training['best_epoch']} of "
            f"{training['epochs']}, {stop}")


def wandb_run_id(spec_name: str, entry_hash: str, seed: int) -> str:
    """The W&B run id of a trained model: derived from what identifies it (spec, entry configuration, seed), so a
    rerun of the same code names the same run and the committed leaderboards do not change with random ids."""
    return sha256_json({"spec": spec_name, "entry_hash": entry_hash, "seed": seed})[:16]


def _wandb_run(spec: Spec, entry: Entry, seed: int, results_dir: Path, enabled: bool, run_id: str,
               composed: dict[str, Any], config_hash: str) -> WandbRun:
    noise = ""
    if entry.mismatch_rate:  # the mismatch rate and its seed name the run (sweep ids already carry the rate)
        noise = ("" if f"-mis{entry.mismatch_rate:g}" in entry.id else f"-mis{entry.mismatch_rate:g}") + \
            ("" if f"-mseed{entry.mismatch_seed}" in entry.id else f"-mseed{entry.mismatch_seed}")
    extra_tags = ([f"mismatch{entry.mismatch_rate:g}"] if entry.mismatch_rate else []) + \
        (["small_loss"] if entry.small_loss else [])
    return WandbRun(enabled=enabled, run_id=run_id,
                    name=f"{spec.name}-{entry.id}{noise}-seed{seed}", save_dir=results_dir,
                    project=spec.wandb.get("project"), entity=spec.wandb.get("entity"),
                    tags=[spec.name, entry.method, entry.regime, *extra_tags, *spec.wandb.get("tags", [])],
                    group=spec.name, config={"spec": spec.name, "spec_hash": spec.hash, "entry": entry.id,
                                             "config_hash": config_hash, **composed})


def _evaluate_grid(spec: Spec, prepared: list[_Prepared], seed: int, progress: SweepProgress,
                   summary: SweepSummary) -> None:
    """Cell-major evaluation: each cell's corrupted test images are built once and encoded by every model
    that needs the cell (corrupting is the costly part on CPU), then each model's metrics go to W&B."""
    order: list[Cell] = []
    for p in prepared:
        order += [c for c in p.pending if c not in order]
    progress.evaluation_started(seed, sum(len(p.pending) for p in prepared))
    first: set[str] = set()
    for cell in order:
        shared: dict[str, list[dict[str, Any]]] = {}  # test-data key -> image batches of this cell
        for p in prepared:
            if cell not in p.pending:
                continue
            where = f"{p.entry.id}/seed{seed}"
            c0 = time.monotonic()
            status, reason, metrics, sections, ranks = "ok", "", None, {}, None
            try:
                out = p.evaluator(cell, images=_shared_images(cell, p, prepared, shared))
                if out is None:  # a rank other than 0 of a multi-process job: it encoded its shard, rank 0 writes
                    continue
                metrics = out if isinstance(out, dict) else out.metrics
                sections, ranks = result_sections(out)
                sections.update(corruption_source(cell))
            except FloatingPointError as err:
                status, reason = "failed", f"evaluation failed: {err}"
            except (RuntimeError, ValueError) as err:  # one broken cell must not lose the rest of the sweep
                status, reason = "failed", f"{type(err).__name__}: {err}"
                log.error("%s %s failed:\n%s", where, cell.id, traceback.format_exc())
            if get_rank() != 0:  # rank 0 writes the record (it saw the same failure, or its own)
                continue
            p.store.write_cell(cell.id, p.record(cell, metrics, status, reason, sections, time.monotonic() - c0), ranks)
            if status == "ok":
                summary.evaluated += 1
                p.logged.append((cell.id, metrics or {}))
            else:
                summary.failed += 1
            progress.cell_done(p.entry.id, seed, cell, status if status == "ok" else f"failed: {reason}",
                               time.monotonic() - c0, first_of_entry=p.entry.id not in first)
            first.add(p.entry.id)
    for p in prepared:  # result files are the record; W&B gets the same numbers, one run at a time
        for cell_id, metrics in p.logged:
            p.wb.log_cell(cell_id, metrics)
        p.wb.finish()
    progress.evaluation_done()


def _shared_images(cell: Cell, p: _Prepared, prepared: list[_Prepared],
                   shared: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]] | None:
    """The cell's test image batches, built once for all entries with the same test data (None: one entry
    needs them, or the cell does not use image batches)."""
    if cell.kind not in ("clean", "imagenet_c", "rcit") or is_distributed():  # a job's ranks load their own shards
        return None
    key = p.dm.test_data_key()
    if sum(q.dm.test_data_key() == key and cell in q.pending for q in prepared) < 2:
        return None
    if key not in shared:
        shared[key] = list(p.dm.image_loader("test", corruption=cell.corruption, severity=cell.severity,
                                             rate=cell.rate))
    return shared[key]


def _log_leaderboard(spec: Spec, results_dir: Path, readme: Path) -> None:
    """Log the grid as a wandb.Table and the leaderboard plots as images to a per-spec summary run."""
    import csv

    wb = WandbRun(enabled=True, run_id=f"{spec.name}-board-{spec.hash[:8]}", name=f"{spec.name}-leaderboard",
                  save_dir=results_dir, project=spec.wandb.get("project"), entity=spec.wandb.get("entity"),
                  tags=[spec.name, "leaderboard"], group=spec.name, job_type="leaderboard",
                  config={"spec": spec.name, "spec_hash": spec.hash})
    if not wb.enabled:
        return
    with open(readme.parent / "results.csv", newline="") as f:
        rows = list(csv.reader(f))
    if rows:
        wb.log_table("leaderboard/grid", rows[0], rows[1:])
    wb.log_images({f"leaderboard/{p.stem}": p for p in sorted(readme.parent.glob("*.png"))})
    wb.finish()
