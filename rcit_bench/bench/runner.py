"""Benchmark runner: train each (entry, seed) once with Lightning, then evaluate every cell of the grid.

Work is organised so the expensive parts happen once: a model is trained once per (entry, seed)
(resumed from ``last.ckpt`` after an interruption), its caption representations are computed once and
reused for every image corruption cell, clean image representations once for the clean and the
text-perturbation cells, and corrupted image representations once per corruption cell. Every finished
cell is written to its own JSON file immediately (:mod:`rcit_bench.bench.results`), so a sweep can be
killed at any point and rerun: finished cells are skipped, a trained model is not retrained.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from rcit_bench.bench import results as R
from rcit_bench.bench.spec import (
    REGIME_TO_TRAIN_CORRUPTION,
    Cell,
    Entry,
    Spec,
    config_path,
    deep_merge,
    load_spec,
    sha256_json,
)
from rcit_bench.bench.wandb_log import WandbRun, new_run_id
from rcit_bench.utils import atomic_write_text

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# progress over the whole sweep


class SweepProgress:
    """Sweep-level progress lines (cells done / total, current entry, ETA), printed via logging on top of
    Lightning's own per-epoch bar. ETA = mean wall time per cell processed in this run (training time is
    spread over that model's cells) x cells left."""

    def __init__(self, total: int, logger: logging.Logger = log) -> None:
        self.total = total
        self.done = 0
        self.skipped = 0
        self.processed = 0
        self.start = time.monotonic()
        self.log = logger

    def skip(self, n: int) -> None:
        self.done += n
        self.skipped += n

    def advance(self, where: str, cell: str, status: str) -> None:
        self.done += 1
        self.processed += 1
        self.log.info("[%d/%d cells] %s %s %s | elapsed %s | ETA %s", self.done, self.total, where, cell, status,
                      _fmt_s(self.elapsed), self.eta_str())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def eta(self) -> float | None:
        if self.processed == 0:
            return None
        return self.elapsed / self.processed * (self.total - self.done)

    def eta_str(self) -> str:
        eta = self.eta()
        return "?" if eta is None else _fmt_s(eta)


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


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
    kw["train_corruption"] = REGIME_TO_TRAIN_CORRUPTION[entry.regime]
    if entry.regime == "clean":
        kw.pop("corruption_mix", None)
        kw.pop("augment_fraction", None)
    else:
        kw["corruption_mix"] = [dict(m) for m in entry.corruption_mix]
        if entry.augment_fraction is not None:
            kw["augment_fraction"] = entry.augment_fraction
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
    return {"method": entry.method, "regime": entry.regime, "seed": seed,
            "model": dict(cfg.get("model") or {}), "optim": dict(cfg.get("optim") or {}),
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


def _state_path(rd: Path) -> Path:
    return rd / "state.json"


def _read_state(rd: Path) -> dict[str, Any]:
    try:
        return json.loads(_state_path(rd).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(rd: Path, state: dict[str, Any]) -> None:
    atomic_write_text(_state_path(rd), json.dumps(state, indent=2, sort_keys=True) + "\n")


def _eval_device(trainer_kw: dict[str, Any]) -> Any:
    import torch

    acc = str(trainer_kw.get("accelerator", "auto"))
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


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
            self._t0: float | None = None

        @property
        def state_key(self) -> str:
            return "BudgetMeter"

        def elapsed(self) -> float:
            return self.wall_s + (time.monotonic() - self._t0 if self._t0 is not None else 0.0)

        def state_dict(self) -> dict[str, Any]:
            return {"pairs": self.pairs, "images": self.images, "wall_s": self.elapsed(),
                    "curve": [dict(c) for c in self.curve]}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.pairs, self.images = int(state["pairs"]), int(state["images"])
            self.wall_s, self.curve = float(state["wall_s"]), [dict(c) for c in state["curve"]]

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self._t0 = time.monotonic()

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self.wall_s, self._t0 = self.elapsed(), None

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
    return out


def train(model: Any, dm: Any, rd: Path, seed: int, trainer_kw: dict[str, Any], wb: WandbRun,
          early_stopping: dict[str, Any] | None = None) -> TrainResult:
    """Fit with Lightning (resuming from ``last.ckpt``, RNG states and budget counters included) until val RSUM
    has not improved for ``early_stopping['patience']`` validations or the trainer's maximum budget is spent;
    returns the best checkpoint (val/rsum, max) and the budget used."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    _seed(seed)
    ckpt_dir = rd / "checkpoints"
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor="val/rsum", mode="max",
                           save_top_k=1, auto_insert_metric_name=False)
    # `save_last=True` only copies when the best improves, so after an epoch without improvement a killed run
    # would resume from an older epoch: its own callback writes last.ckpt after every epoch instead.
    latest = ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1,
                             every_n_epochs=1, enable_version_counter=False, auto_insert_metric_name=False)
    meter = budget_meter()
    callbacks: list[Any] = [meter, ckpt, latest, _rng_checkpoint()]
    stopper = None
    if early_stopping is not None:
        stopper = EarlyStopping(monitor="val/rsum", mode="max", patience=int(early_stopping["patience"]),
                                min_delta=float(early_stopping.get("min_delta", 0.0)), check_on_train_epoch_end=False)
        callbacks.append(stopper)
    kw = {"enable_model_summary": False, **trainer_kw}
    # Model and datamodule both name a `text_encoder` (a network vs a tokenizer); Lightning refuses to merge
    # such hparams for the logger. The datamodule's are recorded in the W&B config by the runner anyway.
    dm._log_hyperparams = False
    trainer = L.Trainer(default_root_dir=str(rd), callbacks=callbacks, logger=wb.lightning_logger() or False, **kw)
    last = ckpt_dir / "last.ckpt"
    resume = str(last) if last.is_file() and _readable_checkpoint(last) else None
    trainer.fit(model, datamodule=dm, ckpt_path=resume, weights_only=True)
    best = ckpt.best_model_path if ckpt.best_model_path and Path(ckpt.best_model_path).is_file() else ""
    best = best or (str(last) if last.is_file() else "")
    if not best:
        raise RuntimeError(f"Training of {rd} produced no checkpoint (is max_epochs 0?).")
    stopped = stopper is not None and stopper.wait_count >= stopper.patience
    return TrainResult(best, budget_record(meter, trainer_kw, early_stopping, stopped, trainer.current_epoch,
                                                  trainer.global_step))


def _load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with the safe loader (``weights_only=True``: tensors and plain containers only, no
    pickled code); an unreadable file raises :class:`CheckpointError` naming it and the fix."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle error, foreign file: all mean "cannot use it"
        raise CheckpointError(
            f"Checkpoint {path} cannot be loaded safely ({type(err).__name__}: {err}). It is corrupt or not a "
            "rcit-bench checkpoint: delete it (or rerun with --force) to train this entry again."
        ) from err


def _set_aside(path: Path, err: Exception) -> None:
    """Rename a corrupt checkpoint to ``*.corrupt`` (kept for inspection, never deleted) so the entry is
    trained again instead of failing on every rerun."""
    aside = path.with_name(path.name + ".corrupt")
    path.replace(aside)
    log.warning("%s Moved it to %s and training this entry again.", err, aside)


def _readable_checkpoint(path: Path) -> bool:
    """True when Lightning can resume from `path`; a corrupt file is set aside first."""
    try:
        _load_checkpoint(path)
        return True
    except CheckpointError as err:
        _set_aside(path, err)
        return False


def load_weights(model: Any, path: str) -> None:
    """Load a Lightning checkpoint's state dict into an already built model, with the safe loader."""
    state = _load_checkpoint(path)  # first: a bad file is reported before anything touches the model
    model.load_state_dict(state["state_dict"])


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded with the safe loader."""


class CellEvaluator:
    """Evaluates cells of one model, caching what does not depend on the cell: caption reps (encoded once),
    clean image reps (once, reused by the clean and all text-perturbation cells)."""

    def __init__(self, model: Any, dm: Any, seed: int, split: str = "test", coco_1k: bool = False) -> None:
        self.model, self.dm, self.seed, self.split, self.coco_1k = model, dm, seed, split, coco_1k
        self._text: dict[str, Any] | None = None
        self._clean_images: dict[str, Any] | None = None
        self._c2i = None
        self.image_encodings = 0  # how many times the test images were encoded (tests count this)
        self.text_encodings = 0

    @property
    def c2i(self) -> Any:
        if self._c2i is None:
            self._c2i = self.dm.caption_to_image(self.split)
        return self._c2i

    def text_reps(self) -> dict[str, Any]:
        from rcit_bench.evaluation import encode_texts

        if self._text is None:
            self._text = encode_texts(self.model, self.dm.caption_loader(self.split))
            self.text_encodings += 1
        return self._text

    def image_reps(self, corruption: str | None = None, severity: int | None = None,
                   rate: float | None = None, batches: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
        from rcit_bench.evaluation import encode_images

        if corruption is None and self._clean_images is not None:
            return self._clean_images
        if batches is None:
            batches = self.dm.image_loader(self.split, corruption=corruption, severity=severity, rate=rate)
        reps = encode_images(self.model, batches)
        self.image_encodings += 1
        if corruption is None:
            self._clean_images = reps
        return reps

    def __call__(self, cell: Cell, images: Iterable[dict[str, Any]] | None = None) -> Any:
        """One cell: a :class:`~rcit_bench.evaluation.CellEvaluation` (metrics, per-query ranks, ties, and for
        image corruptions how far the images moved), or the pointing game's metrics dict. `images`: the cell's
        (corrupted) test image batches when already built for another entry (they depend only on the dataset,
        seed and cell, not on the model)."""
        from rcit_bench.evaluation import encode_texts, evaluate_ranks

        if cell.kind == "pointing_game":
            from rcit_bench.localization import pointing_game

            out = pointing_game(self.model, self.dm, corruption=cell.corruption, severity=cell.severity,
                                rate=cell.rate, split=self.split, seed=self.seed)
            return {k: float(v) for k, v in out.items()}
        if cell.kind == "text":
            texts = encode_texts(self.model, self.dm.caption_loader(self.split, perturbation=cell.perturbation,
                                                                    level=cell.level))
            self.text_encodings += 1
            return evaluate_ranks(self.model, self.image_reps(batches=images), texts, self.c2i, coco_1k=self.coco_1k)
        change = None
        if cell.corruption is not None:
            if images is None:
                images = self.dm.image_loader(self.split, corruption=cell.corruption, severity=cell.severity,
                                              rate=cell.rate)
            change = ImageChange(self.dm.image_loader(self.split))
            images = change.wrap(images)
        reps = self.image_reps(cell.corruption, cell.severity, cell.rate, batches=images)
        out = evaluate_ranks(self.model, reps, self.text_reps(), self.c2i, coco_1k=self.coco_1k)
        out.image_change = None if change is None else change.result()
        return out


#: Below one 8-bit grey level of mean absolute change, a corruption cell is marked "barely changed": the
#: images differ from the clean ones by less than the rounding of the 8-bit files they were decoded from.
BARELY_CHANGED_MAD = 1.0 / 255.0


class ImageChange:
    """How far a cell's corrupted test images moved from the clean ones (mean and max absolute difference,
    PSNR over the split, images left exactly unchanged), measured while the batches stream to the encoder.

    A corruption whose constants are scaled to a small image can leave it untouched (pixelate at 64 px);
    without this figure such a cell would read as "robust to pixelate"."""

    def __init__(self, clean_batches: Iterable[dict[str, Any]]) -> None:
        self._clean = iter(clean_batches)
        self.images = self.values = self.unchanged = 0
        self.abs_sum = self.sq_sum = self.max_abs = 0.0

    def wrap(self, batches: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        import torch

        for batch in batches:
            clean = next(self._clean)
            if not torch.equal(torch.as_tensor(clean["image_index"]), torch.as_tensor(batch["image_index"])):
                raise RuntimeError("Corrupted and clean test images came in a different order; cannot compare them.")
            d = (batch["images"].double() - clean["images"].double()).abs_()
            self.images += d.shape[0]
            self.values += d.numel()
            self.abs_sum += float(d.sum())
            self.sq_sum += float(d.square().sum())
            per_image_max = d.flatten(1).amax(1)
            self.max_abs = max(self.max_abs, float(per_image_max.max()))
            self.unchanged += int((per_image_max == 0).sum())
            yield batch

    def result(self) -> dict[str, Any]:
        import math

        if not self.values:
            return {"images": 0}
        mse = self.sq_sum / self.values
        mad = self.abs_sum / self.values
        return {"images": self.images, "mean_abs_diff": mad, "max_abs_diff": self.max_abs,
                "psnr_db": None if mse == 0 else 10.0 * math.log10(1.0 / mse),  # None: identical images
                "unchanged_images": self.unchanged, "barely_changed": mad < BARELY_CHANGED_MAD}


def result_sections(out: Any, result_path: Path) -> dict[str, Any]:
    """Record sections of one evaluated cell: tie counts, 95% bootstrap intervals, image change, and the
    per-query ranks written beside the record (before it, so a record always has its ranks)."""
    from rcit_bench.evaluation import CellEvaluation
    from rcit_bench.metrics import bootstrap_from_ranks

    if not isinstance(out, CellEvaluation):
        return {}
    rp = R.ranks_path(result_path)
    R.write_ranks(rp, out.ranks_i2t.numpy(), out.ranks_t2i.numpy(), out.caption_to_image.numpy())
    ci = bootstrap_from_ranks(out.ranks_i2t, out.ranks_t2i, out.caption_to_image, n_resamples=BOOTSTRAP_RESAMPLES,
                              confidence=0.95, seed=0)
    sec: dict[str, Any] = {"ties": out.tie_counts(), "ranks_file": rp.name,
                           "intervals": {k: [float(lo), float(hi)] for k, (lo, hi) in ci.items()}}
    if out.image_change is not None:
        sec["image_change"] = out.image_change
    return sec


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
) -> SweepSummary:
    """Train and evaluate every (entry, seed) of a spec, writing one result file per cell.

    results_dir: result files at ``results_dir/<spec>/<entry>/seed<k>/<cell>.json`` plus checkpoints and
      W&B runs (``results_dir/wandb``). force: retrain and re-evaluate everything. use_wandb: False means
      no W&B at all (else mode from WANDB_MODE, default offline). only: entry id(s) to run. leaderboard_dir:
      default ``leaderboards/<spec name>``; build_board=False skips the leaderboard.
    """
    spec = spec_path if isinstance(spec_path, Spec) else load_spec(spec_path)
    only_ids = [only] if isinstance(only, str) else list(only or [])
    entries = [spec.entry(e) for e in only_ids] if only_ids else list(spec.entries)
    results_dir = Path(results_dir)
    summary = SweepSummary(spec.name, results_dir)
    plan = [(e, s) for e in entries for s in spec.seeds]
    summary.total_cells = sum(len(spec.cells(e)) for e, _ in plan)
    progress = SweepProgress(summary.total_cells)
    log.info("spec %s (hash %s): %d entries x %d seeds, %d cells", spec.name, spec.hash[:12], len(entries),
             len(spec.seeds), summary.total_cells)
    for seed in spec.seeds:
        prepared = [p for e in entries
                    if (p := _prepare(spec, e, seed, results_dir, force, use_wandb, progress, summary)) is not None]
        _evaluate_grid(spec, prepared, seed, results_dir, progress, summary)
    summary.skipped = progress.skipped
    if build_board:
        from rcit_bench.bench.leaderboard import build_leaderboard

        summary.leaderboard = build_leaderboard(spec, results_dir=results_dir, out_dir=leaderboard_dir)
        if use_wandb:
            _log_leaderboard(spec, results_dir, summary.leaderboard)
    log.info("spec %s done: %d cells evaluated, %d skipped, %d failed in %s", spec.name, summary.evaluated,
             summary.skipped, summary.failed, _fmt_s(progress.elapsed))
    return summary


@dataclass
class _Prepared:
    """A trained (entry, seed) with the cells it still needs."""

    entry: Entry
    dm: Any
    evaluator: Any
    wb: WandbRun
    pending: list[Cell]
    base_record: dict[str, Any]
    checkpoint: str
    test_key: str
    sections: dict[str, Any]  # training budget and composed config, copied into every result record
    logged: list[tuple[str, dict[str, float]]] = field(default_factory=list)


# datamodule options that change training only: entries differing only in these share test images
_TRAIN_ONLY_OPTIONS = ("train_corruption", "corruption_mix", "augment_fraction", "batch_size", "eval_batch_size",
                       "num_workers")


def _prepare(spec: Spec, entry: Entry, seed: int, results_dir: Path, force: bool, use_wandb: bool,
             progress: SweepProgress, summary: SweepSummary) -> _Prepared | None:
    """Train (or resume, or reuse) the model of (entry, seed) when it has pending cells. Divergence writes a
    failed result file for every pending cell and returns None; the sweep goes on."""
    where = f"{entry.id}/seed{seed}"
    rd = R.run_dir(results_dir, spec.name, entry.id, seed)
    ehash = spec.entry_hash(entry.id)
    cells = spec.cells(entry)
    pending = [c for c in cells
               if force or not R.is_done(R.cell_path(results_dir, spec.name, entry.id, seed, c.id), ehash)]
    progress.skip(len(cells) - len(pending))
    if not pending:
        log.info("%s: all %d cells done, skipping", where, len(cells))
        return None
    state = _read_state(rd)
    if force or state.get("entry_hash") != ehash:  # retrain: forced, or the entry/config changed
        shutil.rmtree(rd / "checkpoints", ignore_errors=True)
        state = {"entry_hash": ehash, "wandb_run_id": state.get("wandb_run_id") or new_run_id()}
        _write_state(rd, state)
    cfg = method_config(spec, entry)
    composed = composed_config(spec, entry, seed, cfg)
    config_hash = sha256_json(composed)
    atomic_write_text(rd / "config.yaml", yaml.safe_dump(composed, sort_keys=True))
    wb = WandbRun(enabled=use_wandb, run_id=state["wandb_run_id"], name=f"{spec.name}-{entry.id}-seed{seed}",
                  save_dir=results_dir, project=spec.wandb.get("project"), entity=spec.wandb.get("entity"),
                  tags=[spec.name, entry.method, entry.regime, *spec.wandb.get("tags", [])], group=spec.name,
                  config={"spec": spec.name, "spec_hash": spec.hash, "entry": entry.id, "config_hash": config_hash,
                          **composed})
    base_record = {"spec_name": spec.name, "spec_hash": spec.hash, "entry_hash": ehash, "seed": seed,
                   "entry": {"id": entry.id, "method": entry.method, "regime": entry.regime, "config": entry.config}}
    tkw, dkw = composed["trainer"], composed["data"]
    t0 = time.monotonic()
    try:
        dm = make_datamodule(dkw)
        _seed(seed)  # initial weights from the seed alone, not from what ran before in this process
        model = build_model(entry, composed, dm)
        best = state.get("best_checkpoint") if state.get("trained") else None
        loaded = False
        if best and Path(best).is_file():
            try:
                load_weights(model, best)
                loaded = True
            except CheckpointError as err:  # set aside; train() resumes from last.ckpt or starts over
                _set_aside(Path(best), err)
        if not loaded:
            log.info("%s: training %s (%s regime)", where, entry.method, entry.regime)
            summary.trained.append(where)
            result = train(model, dm, rd, seed, tkw, wb, early_stopping=spec.early_stopping)
            best = result.checkpoint
            state.update(trained=True, best_checkpoint=best, training=result.training)
            _write_state(rd, state)
            load_weights(model, best)
    except FloatingPointError as err:  # training diverged: record it, keep sweeping
        reason = f"training diverged: {err}"
        log.error("%s: %s", where, reason)
        for cell in pending:
            rec = R.make_record(**base_record, cell=cell.to_dict(), metrics=None, status="failed", reason=reason,
                                sections={"config": composed, "config_hash": config_hash},
                                wandb_run_id=wb.id_or_none, wandb_url=wb.url, wall_time_s=time.monotonic() - t0)
            R.write_result(R.cell_path(results_dir, spec.name, entry.id, seed, cell.id), rec)
            summary.failed += 1
            progress.advance(where, cell.id, "failed")
        return None
    finally:
        wb.finish()  # one active W&B run at a time; evaluation resumes it by id
    model.to(_eval_device(tkw))
    evaluator = CellEvaluator(model, dm, seed, coco_1k=spec.dataset_kind == "coco")
    sections = {"training": state.get("training"), "config": composed, "config_hash": config_hash}
    test_key = json.dumps({k: v for k, v in dkw.items() if k not in _TRAIN_ONLY_OPTIONS}, sort_keys=True, default=str)
    return _Prepared(entry, dm, evaluator, wb, pending, base_record, str(best), test_key,
                     sections)


def _evaluate_grid(spec: Spec, prepared: list[_Prepared], seed: int, results_dir: Path, progress: SweepProgress,
                   summary: SweepSummary) -> None:
    """Cell-major evaluation: each cell's corrupted test images are built once and encoded by every model
    that needs the cell (corrupting is the costly part on CPU), then each model's metrics go to W&B."""
    order: list[Cell] = []
    for p in prepared:
        order += [c for c in p.pending if c not in order]
    for cell in order:
        shared: dict[str, list[dict[str, Any]]] = {}  # test_key -> image batches of this cell
        for p in prepared:
            if cell not in p.pending:
                continue
            where = f"{p.entry.id}/seed{seed}"
            c0 = time.monotonic()
            status, reason, metrics, cell_sections = "ok", "", None, {}
            path = R.cell_path(results_dir, spec.name, p.entry.id, seed, cell.id)
            try:
                images = None
                if cell.kind in ("clean", "imagenet_c", "rcit") and sum(
                        q.test_key == p.test_key and cell in q.pending for q in prepared) > 1:
                    if p.test_key not in shared:
                        shared[p.test_key] = list(p.dm.image_loader("test", corruption=cell.corruption,
                                                                    severity=cell.severity, rate=cell.rate))
                    images = shared[p.test_key]
                out = p.evaluator(cell, images=images)
                metrics = out if isinstance(out, dict) else out.metrics
                cell_sections = result_sections(out, path)
            except FloatingPointError as err:
                status, reason = "failed", f"evaluation failed: {err}"
            except (RuntimeError, ValueError) as err:  # one broken cell must not lose the rest of the sweep
                status, reason = "failed", f"{type(err).__name__}: {err}"
                log.error("%s %s failed:\n%s", where, cell.id, traceback.format_exc())
            rec = R.make_record(**p.base_record, cell=cell.to_dict(), metrics=metrics, status=status, reason=reason,
                                sections={**p.sections, **cell_sections}, checkpoint=p.checkpoint,
                                wandb_run_id=p.wb.id_or_none, wandb_url=p.wb.url, wall_time_s=time.monotonic() - c0)
            R.write_result(path, rec)
            if status == "ok":
                summary.evaluated += 1
                p.logged.append((cell.id, metrics or {}))
            else:
                summary.failed += 1
            progress.advance(where, cell.id, _short(status, metrics))
    for p in prepared:  # result files are the record; W&B gets the same numbers, one run at a time
        for cell_id, metrics in p.logged:
            p.wb.log_cell(cell_id, metrics)
        p.wb.finish()


def _short(status: str, metrics: dict[str, float] | None) -> str:
    if status != "ok" or not metrics:
        return status
    key = "rsum" if "rsum" in metrics else next(iter(metrics))
    return f"{key} {metrics[key]:.1f}"


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
