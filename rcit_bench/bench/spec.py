"""Benchmark spec: load a YAML file, validate every key before anything runs, expand the evaluation grid.

A spec names a dataset, the entries to train (method + config + training regime), the seeds and the
evaluation grid. Validation happens up front so that a typo in entry 5 fails in a second, not after
entries 1 to 4 have trained: every error names the key path (``entries[2].method``), the bad value,
the allowed values and a "did you mean".
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from rcit_bench.errors import UserError
from rcit_bench.data.datasets import PRETRAINED, TRAIN_REGIMES as REGIMES  # torch-free
from rcit_bench.utils import did_you_mean

CELL_KINDS = ("clean", "imagenet_c", "rcit", "text", "pointing_game")
#: Trainer arguments a spec may set (others would change what is measured or where files go).
TRAINER_KEYS = (
    "max_epochs", "max_steps", "limit_train_batches", "limit_val_batches", "accelerator", "devices",
    "precision", "gradient_clip_val", "accumulate_grad_batches", "check_val_every_n_epoch",
    "log_every_n_steps", "deterministic", "enable_progress_bar", "num_sanity_val_steps",
)
#: Datamodule options the runner sets itself from the entry and seed, so a spec may not set them.
RUNNER_SET_DATA_OPTIONS = ("dataset", "seed", "train_corruption", "corruption_mix", "augment_fraction", "mismatch_rate",
                           "mismatch_seed")
SEVERITIES = (1, 2, 3, 4, 5)
TEXT_LEVELS = (1, 2, 3, 4, 5)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

TOP_KEYS = ("name", "description", "imports", "dataset", "entries", "evaluation", "seeds", "baseline", "trainer",
            "early_stopping",
            "wandb")
EARLY_STOPPING_KEYS = ("patience", "min_delta")
#: Every entry trains until val RSUM has not improved for `patience` validations, within the trainer's budget.
DEFAULT_EARLY_STOPPING = {"patience": 3, "min_delta": 0.0}
DATASET_KEYS = ("kind", "options")
ENTRY_KEYS = ("id", "method", "config", "regime", "corruption_mix", "augment_fraction", "mismatch_rate",
              "mismatch_rates", "mismatch_seed", "small_loss", "evaluate", "overrides", "description")
#: `pixel_noise_rate` is the RCIT noise rate (fraction of corrupted pixels); `rate` is its older spelling
MIX_KEYS = ("name", "severity", "pixel_noise_rate", "rate")
EVAL_KEYS = ("clean", "imagenet_c", "rcit_protocol", "text", "pointing_game")
IC_KEYS = ("corruptions", "severities")
RCIT_KEYS = ("corruptions", "pixel_noise_rates", "main_pixel_noise_rate", "rates", "main_rate")
#: older spellings of the RCIT protocol keys, still accepted (a spec may not give both spellings of one key)
RCIT_OLD_SPELLINGS = {"rates": "pixel_noise_rates", "main_rate": "main_pixel_noise_rate"}
TEXT_KEYS = ("perturbations", "levels")
WANDB_KEYS = ("project", "entity", "tags")
#: Sections of a method config an entry may override (deep-merged, see rcit_bench/configs/*.yaml).
OVERRIDE_KEYS = ("model", "optim", "data", "trainer")


# ----------------------------------------------------------------------------------------------------------
# names known to the other modules (imported lazily: the spec module must import without torch models)


def import_plugins(imports: Any, spec_dir: Path | None = None) -> list[Any]:
    """Import the user's modules a spec names under ``imports`` (a module name, or a ``.py`` file relative to
    the spec), so that the corruptions, datasets and methods they register can be used in the spec."""
    import importlib
    import importlib.util
    import sys

    modules = []
    for i, item in enumerate(_check_list("imports", imports)):
        where = f"imports[{i}]"
        if not isinstance(item, str) or not item:
            raise UserError(f"Spec key `{where}` must be a module name or a .py file, but got {item!r}.")
        if item.endswith(".py"):
            path = Path(item)
            if not path.is_absolute() and spec_dir is not None:
                path = spec_dir / path
            if not path.is_file():
                raise UserError(f"Spec key `{where}`: file {item!r} not found (looked at {path}).")
            name = f"rcit_bench_plugin_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}_{path.stem}"
            if name not in sys.modules:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            modules.append(sys.modules[name])
        else:
            try:
                modules.append(importlib.import_module(item))
            except ModuleNotFoundError as err:
                if err.name != item.split(".")[0] and err.name != item:
                    raise
                raise UserError(f"Spec key `{where}`: module {item!r} not found; give an importable module name "
                                f"(on PYTHONPATH) or a .py file path relative to the spec.") from None
    return modules


def known_methods() -> list[str]:
    """Registered method names (the registry imports the built-in method modules on first use)."""
    from rcit_bench.models.registry import list_methods

    return sorted(list_methods())


def known_corruptions() -> tuple[list[str], list[str], list[str]]:
    """(all names, severity-mode names, rate-mode names) of the registered corruptions, a user's included."""
    from rcit_bench.data.corruptions import corruption_info, list_corruptions

    allnames = list(list_corruptions())
    rate = [n for n in allnames if corruption_info(n).mode == "rate"]
    return allnames, [n for n in allnames if n not in rate], rate


def known_perturbations() -> list[str]:
    """Text perturbation names from rcit_bench.data.text_perturbations."""
    from rcit_bench.data.text_perturbations import list_perturbations

    return list(list_perturbations())


def known_datasets() -> list[str]:
    """Registered dataset kinds (rcit_bench.data.datasets)."""
    from rcit_bench.data.datasets import list_datasets

    return list_datasets()


def method_class(name: str) -> type:
    """The registered class of method `name`: what it needs from the data is declared on it."""
    from rcit_bench.models.registry import get_method_class

    return get_method_class(name)


def config_dir() -> Path:
    """Directory of the shipped method configs (``rcit_bench/configs``)."""
    from rcit_bench.models.registry import CONFIG_DIR

    return CONFIG_DIR


# ----------------------------------------------------------------------------------------------------------
# data classes


def cell_id(kind: str, corruption: str | None = None, severity: int | None = None, rate: float | None = None,
            perturbation: str | None = None, level: int | None = None) -> str:
    """The id of a cell, the name of its result file: ``clean``, ``ic-<name>-s<severity>``,
    ``rcit-<name>-r<rate>``, ``text-<perturbation>-l<level>``, ``pg-clean`` / ``pg-<name>-r<rate>``. The one
    place this format is written; the leaderboard looks cells up through it."""
    if kind == "clean":
        return "clean"
    if kind == "imagenet_c":
        return f"ic-{corruption}-s{severity}"
    if kind == "rcit":
        return f"rcit-{corruption}-r{rate:g}"
    if kind == "text":
        return f"text-{perturbation}-l{level}"
    if kind == "pointing_game":
        return "pg-clean" if corruption is None else f"pg-{corruption}-r{rate:g}"
    raise UserError(f"Argument `kind` must be one of {_fmt(CELL_KINDS)}, but got {kind!r}.")


def make_cell(kind: str, **condition: Any) -> "Cell":
    """A :class:`Cell` of `kind` under `condition` (corruption, severity | rate, perturbation, level)."""
    return Cell(cell_id(kind, **condition), kind, **condition)


@dataclass(frozen=True)
class Cell:
    """One evaluation cell: a (test-time condition) the model is measured under."""

    id: str
    kind: str  # one of CELL_KINDS
    corruption: str | None = None
    severity: int | None = None
    rate: float | None = None
    perturbation: str | None = None
    level: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The cell as result files record it; its rate is written as ``pixel_noise_rate`` (the RCIT noise rate,
        named apart from the training pairs' mismatch rate; files written before say ``rate``)."""
        out = {k: getattr(self, k) for k in ("id", "kind", "corruption", "severity", "rate", "perturbation", "level")}
        out["pixel_noise_rate"] = out.pop("rate")
        return out


@dataclass
class Entry:
    """A trained model in the sweep: method + config + training regime."""

    id: str
    method: str
    config: str
    regime: str = "clean"
    corruption_mix: list[dict[str, Any]] = field(default_factory=list)
    augment_fraction: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # {model|optim|data|trainer: {...}}
    description: str = ""
    #: correspondence noise: the fraction of training captions paired with another image (0: none), and its seed
    mismatch_rate: float = 0.0
    mismatch_seed: int = 0
    #: the small-loss selection of noisy pairs (True or its options), for any method; None: off
    small_loss: bool | dict[str, Any] | None = None
    #: the cell kinds this entry is evaluated on (None: the whole grid of the spec)
    evaluate: list[str] | None = None

    def evaluates(self, kind: str) -> bool:
        """Whether this entry is evaluated on cells of `kind` (its `evaluate` may narrow the spec's grid)."""
        return self.evaluate is None or kind in self.evaluate


@dataclass
class Spec:
    """A validated benchmark spec. ``raw`` is the normalised dict the hash is computed from."""

    name: str
    path: Path | None
    description: str
    dataset_kind: str
    dataset_options: dict[str, Any]
    entries: list[Entry]
    evaluation: dict[str, Any]
    seeds: list[int]
    baseline: str | None
    trainer: dict[str, Any]
    wandb: dict[str, Any]
    raw: dict[str, Any]
    early_stopping: dict[str, Any] | None = None  # {patience, min_delta}; None: train to the budget cap

    @property
    def hash(self) -> str:
        """sha256 of the normalised spec (defaults filled in, keys sorted)."""
        return sha256_json(self.raw)

    def entry(self, entry_id: str) -> Entry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        ids = [e.id for e in self.entries]
        raise UserError(
            f"Argument `only` must name an entry of spec '{self.name}' ({', '.join(repr(i) for i in ids)}), "
            f"but got {entry_id!r}.{did_you_mean(entry_id, ids)}"
        )

    def entry_hash(self, entry_id: str) -> str:
        """Hash of what determines a trained model (dataset, trainer, entry): result files of another
        entry hash are stale. Changing only the evaluation grid keeps the trained models and results."""
        e = {k: v for k, v in next(x for x in self.raw["entries"] if x["id"] == entry_id).items() if k != "evaluate"}
        cfg = config_path(self, self.entry(entry_id))
        cfg_text = cfg.read_text(encoding="utf-8") if cfg.is_file() else ""  # an edited config means retraining
        return sha256_json({"dataset": self.raw["dataset"], "trainer": self.raw["trainer"], "entry": e,
                            "early_stopping": self.raw["early_stopping"],
                            "config_sha256": hashlib.sha256(cfg_text.encode("utf-8")).hexdigest()})

    def cells(self, entry: Entry | str | None = None) -> list[Cell]:
        """The evaluation grid for an entry, in evaluation order (pointing game only for methods that localize)."""
        localizes, kinds = True, None
        if entry is not None:
            e = self.entry(entry) if isinstance(entry, str) else entry
            localizes, kinds = method_class(e.method).localizes, e.evaluate
        if kinds is not None:
            return [c for c in self.cells() if e.evaluates(c.kind) and (c.kind != "pointing_game" or localizes)]
        ev = self.evaluation
        cells: list[Cell] = []
        if ev["clean"]:
            cells.append(make_cell("clean"))
        ic = ev.get("imagenet_c")
        if ic:
            cells += [make_cell("imagenet_c", corruption=n, severity=s) for n in ic["corruptions"] for s in ic["severities"]]
        rc = ev.get("rcit_protocol")
        if rc:
            cells += [make_cell("rcit", corruption=n, rate=float(r)) for n in rc["corruptions"]
                      for r in rc["pixel_noise_rates"]]
        tx = ev.get("text")
        if tx:
            cells += [make_cell("text", perturbation=p, level=lv) for p in tx["perturbations"] for lv in tx["levels"]]
        if ev["pointing_game"] and localizes:
            cells.append(make_cell("pointing_game"))
            if rc:
                cells += [make_cell("pointing_game", corruption=n, rate=float(rc["main_pixel_noise_rate"]))
                          for n in rc["corruptions"]]
        return cells


def sha256_json(obj: Any) -> str:
    """sha256 hex digest of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# validation helpers


def _fmt(choices: Iterable[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


def _check_keys(obj: Any, where: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise UserError(f"Spec key `{where}` must be a mapping, but got {type(obj).__name__} {obj!r}.")
    allowed = list(allowed)
    for k in obj:
        if k not in allowed:
            path = f"{where}.{k}" if where else str(k)
            raise UserError(
                f"Unknown spec key `{path}`. Allowed keys in `{where or 'top level'}`: {_fmt(allowed)}."
                f"{did_you_mean(str(k), allowed)}"
            )
    for k in required:
        if k not in obj:
            path = f"{where}.{k}" if where else k
            raise UserError(f"Spec key `{path}` is required (allowed keys: {_fmt(allowed)}).")
    return obj


def _check_method(where: str, value: Any, methods: list[str], spec_dir: Path | None) -> str:
    """A registered method, an installed plugin's, or ``package.module:ClassName`` in the user's code (importable,
    or a module in the spec's folder), whose class is a RetrievalModule; errors name the spec key and the cause."""
    if not isinstance(value, str) or ":" not in value:
        _check_name(where, value, methods)
    import sys

    if ":" in value and spec_dir is not None and str(spec_dir) not in sys.path:
        top = value.split(":", 1)[0].split(".")[0]
        if (spec_dir / top).is_dir() or (spec_dir / f"{top}.py").is_file():  # the user's code next to the spec
            sys.path.append(str(spec_dir))
    try:
        method_class(value)
    except UserError as err:
        raise UserError(f"Spec key `{where}`: {err}") from err.__cause__
    return value


def _check_name(where: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise UserError(
            f"Spec key `{where}` must be one of {_fmt(choices)}, but got {value!r}.{did_you_mean(str(value), choices)}"
        )
    return value


def _check_list(where: str, value: Any) -> list[Any]:
    if isinstance(value, (str, int, float)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UserError(f"Spec key `{where}` must be a non-empty list, but got {value!r}.")
    return value


def _check_levels(where: str, value: Any, allowed: Iterable[int]) -> list[int]:
    allowed = list(allowed)
    out = []
    for i, v in enumerate(_check_list(where, value)):
        if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
            raise UserError(f"Spec key `{where}[{i}]` must be one of {_fmt(allowed)}, but got {v!r}.")
        out.append(v)
    return sorted(set(out))


def _check_rate(where: str, v: Any) -> float:
    """A pixel noise rate of the evaluation grid: in (0, 1] (rate 0 is the clean cell, already in the grid)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise UserError(f"Spec key `{where}` must be a pixel noise rate (fraction of corrupted pixels) in (0, 1], "
                         f"but got {v!r}.")
    return float(v)


def _check_mix(where: str, value: Any) -> list[dict[str, Any]]:
    """Corruption mix for training: [{name, severity | rate}], the level checked by the corruptions' own rule."""
    allnames, _, rate_names = known_corruptions()
    mix = []
    for i, item in enumerate(_check_list(where, value)):
        w = f"{where}[{i}]"
        _check_keys(item, w, MIX_KEYS, required=("name",))
        if "rate" in item and "pixel_noise_rate" in item:
            raise UserError(f"Spec key `{w}` gives both `pixel_noise_rate` and its older spelling `rate`; keep "
                             f"`pixel_noise_rate`.")
        name = _check_name(f"{w}.name", item["name"], allnames)
        level = corruption_level(w, name, item.get("severity"), item.get("pixel_noise_rate", item.get("rate")))
        mix.append({"name": name, ("rate" if name in rate_names else "severity"): level})
    return mix


def corruption_level(where: str, name: str, severity: Any = None, rate: Any = None) -> int | float:
    """The severity or rate of corruption `name`, by the one severity-or-rate rule
    (rcit_bench.data.corruptions.check_level), its error prefixed with the spec key."""
    from rcit_bench.data.corruptions import check_level

    try:
        return check_level(name, severity, rate)
    except ValueError as err:
        raise UserError(f"Spec key `{where}`: {err}") from None


def _resolve_config(where: str, value: str, method: str, spec_dir: Path | None) -> str:
    """Config is a shipped name (``vsepp``, ``paper/vsepp_flickr30k``) or a YAML path relative to the spec;
    it must load and be a config of the entry's method."""
    from rcit_bench.models.registry import load_method_config

    target: str | Path = value
    if value.endswith((".yaml", ".yml")):
        p = Path(value)
        if not p.is_absolute() and spec_dir is not None:
            p = spec_dir / p
        if not p.is_file():
            raise FileNotFoundError(f"Spec key `{where}`: config file {value!r} not found (looked at {p}).")
        target = p
    try:
        cfg = load_method_config(target)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"Spec key `{where}`: {err}") from None
    if cfg["method"] != method:
        raise UserError(f"Spec key `{where}`: config {value!r} is for method {cfg['method']!r}, "
                         f"but the entry's method is {method!r}.")
    return value


def config_path(spec: Spec, entry: Entry) -> Path:
    """The YAML file an entry's config resolves to."""
    if entry.config.endswith((".yaml", ".yml")):
        p = Path(entry.config)
        if not p.is_absolute() and spec.path is not None:
            p = spec.path.parent / p
        return p
    return config_dir() / f"{entry.config}.yaml"


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``over`` wins); lists and scalars are replaced, not merged. A mapping that names another
    ``name`` than the one it overrides (e.g. ``image_encoder: {name: hf, ...}`` over the config's ``small_cnn``)
    replaces it whole: the other encoder's arguments do not apply to it."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        old = out.get(k)
        renamed = isinstance(v, dict) and isinstance(old, dict) and "name" in v and v["name"] != old.get("name")
        if isinstance(v, dict) and isinstance(old, dict) and not renamed:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _datamodule_params() -> list[str] | None:
    """Constructor arguments of RetrievalDataModule, or None while the module is not importable."""
    try:
        from rcit_bench.data.datamodule import RetrievalDataModule
    except ImportError:
        return None
    params = inspect.signature(RetrievalDataModule.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n in params if n != "self"]


#: Values of Lightning's ``precision`` argument (lightning 2.x; ints 16/32/64 and their strings also work).
TRAINER_PRECISIONS = ("16-mixed", "bf16-mixed", "32-true", "64-true", "16-true", "bf16-true", "transformer-engine",
                      "transformer-engine-float16", "16", "32", "64", "bf16", 16, 32, 64)
#: Values of Lightning's ``accelerator`` argument a spec may give ('gpu' is Lightning's alias of 'cuda').
TRAINER_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
_DEVICES_RE = re.compile(r"^\s*(-1|\d+\s*(,\s*\d+\s*)*,?)\s*$")  # Lightning's string forms: '2', '0,1', '0,'


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _trainer_value_problem(key: str, v: Any) -> str | None:
    """What is wrong with trainer argument `key` = `v` (the expected type and range), or None when it is fine."""
    if key in ("max_epochs", "max_steps", "num_sanity_val_steps"):
        if (v is None and key != "max_steps") or (_is_int(v) and v >= -1):
            return None
        return {"max_epochs": "an integer >= 0, or -1 for no epoch limit (then `max_steps` bounds training)",
                "max_steps": "an integer >= 0, or -1 for no step limit (the default)",
                "num_sanity_val_steps": "an integer >= 0, or -1 to check every validation batch"}[key]
    if key in ("limit_train_batches", "limit_val_batches"):
        if v is None or (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0):
            return None
        return "an integer >= 0 (a number of batches) or a fraction in [0.0, 1.0] (of the batches; 1.0 = all)"
    if key == "accelerator":
        if v in TRAINER_ACCELERATORS:
            return None
        return f"one of {_fmt(TRAINER_ACCELERATORS)}"
    if key == "devices":
        ok = (v == "auto" or (_is_int(v) and (v >= 1 or v == -1))
              or (isinstance(v, str) and _DEVICES_RE.match(v) is not None and v.strip() != "0")
              or (isinstance(v, list) and v and all(_is_int(d) and d >= 0 for d in v) and len(set(v)) == len(v)))
        return None if ok else ("a number of devices >= 1, -1 (all), 'auto', or a list of distinct device indices "
                                "such as [0, 1]")
    if key == "precision":
        if v is None or (isinstance(v, (str, int)) and not isinstance(v, bool) and v in TRAINER_PRECISIONS):
            return None
        return f"one of {_fmt(TRAINER_PRECISIONS)}"
    if key == "gradient_clip_val":
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            return None
        return "a number >= 0 (the gradient norm to clip to; 0 or null: no clipping)"
    if key in ("accumulate_grad_batches", "log_every_n_steps", "check_val_every_n_epoch"):
        if (v is None and key != "accumulate_grad_batches") or (_is_int(v) and v >= 1):
            return None
        return "an integer >= 1"
    if key == "deterministic":
        return None if v is None or isinstance(v, bool) or v == "warn" else "true, false or 'warn'"
    if key == "enable_progress_bar":
        return None if v is None or isinstance(v, bool) else "true or false"
    return None


def _check_trainer(where: str, value: Any, check_devices: bool = True) -> dict[str, Any]:
    """A spec's trainer arguments (spec-level `trainer` or an entry's `overrides.trainer`): only the keys of
    TRAINER_KEYS, each of the type and range Lightning accepts, so that a wrong value fails here and not as a
    Lightning traceback after the data is prepared. With `check_devices`, an accelerator this machine does not
    have (`gpu`/`cuda` without CUDA, `mps` without MPS) is refused too."""
    trainer = _check_keys(value, where, TRAINER_KEYS)
    for key, v in trainer.items():
        problem = _trainer_value_problem(key, v)
        if problem is not None:
            named = {"accelerator": TRAINER_ACCELERATORS, "precision": TRAINER_PRECISIONS}.get(key, ())
            hint = did_you_mean(str(v), [str(c) for c in named]) if isinstance(v, str) else ""
            raise UserError(f"Spec key `{where}.{key}` must be {problem}, but got {v!r}.{hint}")
    if check_devices and trainer.get("accelerator") in ("gpu", "cuda", "mps"):
        _check_accelerator_available(f"{where}.accelerator", trainer["accelerator"])
    return trainer


def _check_accelerator_available(where: str, accelerator: str) -> None:
    """Refuse an accelerator this machine does not have (torch is imported here only: the spec module is
    torch-free)."""
    import torch

    if accelerator == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise UserError(f"Spec key `{where}` is 'mps', but this machine has no MPS device (Apple GPU); "
                             f"use 'cpu' or 'auto'.")
        return
    if not torch.cuda.is_available():
        raise UserError(f"Spec key `{where}` is {accelerator!r}, but this machine has no CUDA GPU "
                         f"(torch.cuda.is_available() is False); use 'cpu', or 'auto' to take a GPU where there is one.")


# ----------------------------------------------------------------------------------------------------------
# public API


def validate_spec(data: Any, path: str | Path | None = None, *, check_devices: bool = True) -> Spec:
    """Validate a parsed spec dict and return a :class:`Spec` (defaults filled in). Raises ValueError.

    check_devices: also refuse a trainer accelerator this machine lacks (``gpu`` without CUDA); pass False
    where the spec is only read, not trained (building a leaderboard, submitting jobs from a login node)."""
    spec_dir = Path(path).resolve().parent if path is not None else None
    _check_keys(data, "", TOP_KEYS, required=("name", "dataset", "entries", "evaluation"))
    if "imports" in data:
        import_plugins(data["imports"], spec_dir)  # first: they register the names checked below
    name = data["name"]
    if not isinstance(name, str) or not _ID_RE.match(name):
        raise UserError(f"Spec key `name` must be a short identifier (letters, digits, _ . -), but got {name!r}.")

    # dataset
    ds = _check_keys(data["dataset"], "dataset", DATASET_KEYS, required=("kind",))
    kind = _check_name("dataset.kind", ds["kind"], known_datasets())
    options = ds.get("options") or {}
    if not isinstance(options, dict):
        raise UserError(f"Spec key `dataset.options` must be a mapping, but got {options!r}.")
    for k in RUNNER_SET_DATA_OPTIONS:
        if k in options and k.startswith("mismatch_"):
            raise UserError(f"Spec key `dataset.options.{k}`: correspondence noise applies to the training pairs of "
                             f"one entry (validation and test stay clean); set `entries[i].{k}` instead.")
        if k in options:
            raise UserError(
                f"Spec key `dataset.options.{k}` is set by the runner (from `dataset.kind`, the entry's regime "
                f"and the seed); remove it."
            )
    dm_params = _datamodule_params()
    if dm_params is not None:
        allowed = [p for p in dm_params if p not in RUNNER_SET_DATA_OPTIONS]
        _check_keys(options, "dataset.options", allowed)

    # trainer
    trainer = dict(_check_trainer("trainer", data.get("trainer") or {}, check_devices))
    early = _validate_early_stopping(data.get("early_stopping", DEFAULT_EARLY_STOPPING))

    # entries
    methods = known_methods()
    entries: list[Entry] = []
    raw_entries = _check_list("entries", data["entries"])
    for i, e in enumerate(raw_entries):
        w = f"entries[{i}]"
        _check_keys(e, w, ENTRY_KEYS, required=("id", "method"))
        eid = e["id"]
        if not isinstance(eid, str) or not _ID_RE.match(eid):
            raise UserError(f"Spec key `{w}.id` must be an identifier (letters, digits, _ . -), but got {eid!r}.")
        if eid in [x.id for x in entries]:
            raise UserError(f"Spec key `{w}.id`: duplicate entry id {eid!r}.")
        method = _check_method(f"{w}.method", e["method"], methods, spec_dir)
        regime = _check_name(f"{w}.regime", e.get("regime", "clean"), REGIMES)
        cls = method_class(method)
        zero_shot = bool(getattr(cls, "zero_shot", False))
        if zero_shot and regime != PRETRAINED:
            raise UserError(f"Spec key `{w}.regime`: method {method!r} is evaluated zero-shot and never trained here, "
                             f"so it needs regime '{PRETRAINED}', but got {regime!r}; set `{w}.regime: {PRETRAINED}`.")
        if regime == PRETRAINED and not zero_shot:
            takers = [m for m in methods if getattr(method_class(m), "zero_shot", False)]
            raise UserError(f"Spec key `{w}.regime`: '{PRETRAINED}' (loaded, never trained) is for zero-shot methods "
                             f"({_fmt(takers)}), but method {method!r} needs training; use regime 'clean', 'augment'"
                             f"{' or paired' if cls.needs_paired_views else ''}.")
        paired = cls.needs_paired_views
        if regime == "paired" and not paired:
            takers = [m for m in methods if method_class(m).needs_paired_views]
            raise UserError(f"Spec key `{w}.regime`: 'paired' training (clean + corrupted copy) is for methods that "
                             f"train on both views ({_fmt(takers)}), but the entry's method is {method!r}; use regime "
                             f"'augment' for other methods.")
        if paired and regime != "paired":
            raise UserError(f"Spec key `{w}.regime`: method {method!r} trains on (clean, corrupted) pairs and needs "
                             f"regime 'paired', but got {regime!r}.")
        mix: list[dict[str, Any]] = []
        if regime in ("augment", "paired"):
            if "corruption_mix" not in e:
                raise UserError(f"Spec key `{w}.corruption_mix` is required for regime {regime!r} "
                                 f"(e.g. [{{name: speckle, rate: 0.6}}, {{name: salt_pepper, rate: 0.6}}]).")
            mix = _check_mix(f"{w}.corruption_mix", e["corruption_mix"])
        elif "corruption_mix" in e:
            raise UserError(f"Spec key `{w}.corruption_mix` only applies to regimes 'augment' and 'paired', "
                             f"but the entry's regime is {regime!r}.")
        frac = e.get("augment_fraction")
        if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1):
            raise UserError(f"Spec key `{w}.augment_fraction` must be a number in [0, 1], but got {frac!r}.")
        if ":" in method and not e.get("config"):
            raise UserError(f"Spec key `{w}.config` is required for a method in your own code ({method!r}): a YAML "
                             f"file next to the spec with `method: {method}` and its `model` / `optim` arguments.")
        config = e.get("config") or method
        if not isinstance(config, str):
            raise UserError(f"Spec key `{w}.config` must be a config name or .yaml path, but got {config!r}.")
        config = _resolve_config(f"{w}.config", config, method, spec_dir)
        overrides = _check_keys(e.get("overrides") or {}, f"{w}.overrides", OVERRIDE_KEYS)
        for sec, val in overrides.items():
            if not isinstance(val, dict):
                raise UserError(f"Spec key `{w}.overrides.{sec}` must be a mapping, but got {val!r}.")
        _check_trainer(f"{w}.overrides.trainer", overrides.get("trainer", {}), check_devices)
        small_loss = _check_small_loss(f"{w}.small_loss", e.get("small_loss"))
        evaluate = _check_evaluate(f"{w}.evaluate", e.get("evaluate"))
        rates, swept = _check_mismatch(w, e)
        if regime == PRETRAINED:
            for key in ("mismatch_rate", "mismatch_rates", "mismatch_seed", "small_loss", "augment_fraction"):
                if key in e:
                    raise UserError(f"Spec key `{w}.{key}` is a training option, but the entry's regime is "
                                     f"'{PRETRAINED}' (loaded, never trained); remove it.")
        from rcit_bench.data.noise import check_mismatch_seed

        mseed = check_mismatch_seed(e.get("mismatch_seed", 0), f"{w}.mismatch_seed")
        if "mismatch_seed" in e and not any(rates):
            raise UserError(f"Spec key `{w}.mismatch_seed` applies only with a `mismatch_rate` above 0; remove it or "
                             f"set `{w}.mismatch_rate`.")
        for rate in rates:
            rid = _mismatch_entry_id(eid, rate, mseed) if swept else eid
            if rid in [x.id for x in entries]:
                raise UserError(f"Spec key `{w}.id`: entry id {rid!r} is already used"
                                 f"{' (by another sweep member)' if swept else ''}; give the entry another id.")
            entries.append(Entry(rid, method, config, regime, mix, None if frac is None else float(frac),
                                 copy.deepcopy(overrides), str(e.get("description", "")), rate,
                                 int(mseed) if rate else 0, small_loss, evaluate))

    # seeds
    seeds = _check_list("seeds", data.get("seeds", [0]))
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise UserError(f"Spec key `seeds[{i}]` must be a non-negative integer, but got {s!r}.")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"Spec key `seeds` has duplicates: {seeds!r}.")

    # baseline
    ids = [x.id for x in entries]
    baseline = data.get("baseline")
    if baseline is not None:
        _check_name("baseline", baseline, ids)

    evaluation = _validate_evaluation(data["evaluation"], kind)
    for x in entries:
        if x.evaluate is not None and not any(evaluation.get(k) for k in x.evaluate):
            raise UserError(f"Spec key `evaluate` of entry {x.id!r} selects {_fmt(x.evaluate)}, none of which the "
                             f"spec's `evaluation` grid enables; enable them there or change the entry's `evaluate`.")

    wandb_cfg = dict(_check_keys(data.get("wandb") or {}, "wandb", WANDB_KEYS))

    raw = {
        "name": name,
        "dataset": {"kind": kind, "options": dict(options)},
        "trainer": trainer,
        "early_stopping": early,
        "seeds": list(seeds),
        "baseline": baseline,
        "entries": [_raw_entry(x) for x in entries],
        "evaluation": evaluation,
    }
    if data.get("imports"):  # recorded when given (specs without keep their hash)
        raw["imports"] = list(data["imports"])
    return Spec(name, Path(path) if path is not None else None, str(data.get("description", "")), kind,
                dict(options), entries, evaluation, list(seeds), baseline, trainer, wandb_cfg, copy.deepcopy(raw),
                None if early is None else dict(early))


def _raw_entry(x: Entry) -> dict[str, Any]:
    """An entry as hashed: the options that are off (no mismatch, no small-loss selection, the whole grid) are left
    out, so that entries written before these options existed keep their hash and their trained models."""
    raw: dict[str, Any] = {"id": x.id, "method": x.method, "config": x.config, "regime": x.regime,
                           "corruption_mix": x.corruption_mix, "augment_fraction": x.augment_fraction,
                           "overrides": x.overrides}
    if x.mismatch_rate:
        raw.update(mismatch_rate=x.mismatch_rate, mismatch_seed=x.mismatch_seed)
    if x.small_loss is not None:
        raw["small_loss"] = x.small_loss
    if x.evaluate is not None:
        raw["evaluate"] = list(x.evaluate)
    return raw


def _mismatch_entry_id(base: str, rate: float, mismatch_seed: int) -> str:
    """The id of one member of a `mismatch_rates` sweep: ``<id>-mis<rate>`` (``-mseed<k>`` with a mismatch seed
    other than 0), so the rate and its seed name the run directory and the W&B run."""
    return f"{base}-mis{rate:g}" + (f"-mseed{mismatch_seed}" if rate and mismatch_seed else "")


def _check_mismatch(where: str, e: dict[str, Any]) -> tuple[list[float], bool]:
    """(the entry's mismatch rates, whether it is a sweep): `mismatch_rate` (one model) or `mismatch_rates`
    (one model per rate), each a fraction of training pairs in [0, 1)."""
    from rcit_bench.data.noise import check_mismatch_rate

    if "mismatch_rate" in e and "mismatch_rates" in e:
        raise UserError(f"Spec key `{where}` gives both `mismatch_rate` (one model) and `mismatch_rates` (a sweep, "
                         f"one model per rate); keep one.")
    if "mismatch_rates" not in e:
        return [check_mismatch_rate(e.get("mismatch_rate", 0.0), f"{where}.mismatch_rate")], False
    rates = [check_mismatch_rate(r, f"{where}.mismatch_rates[{j}]")
             for j, r in enumerate(_check_list(f"{where}.mismatch_rates", e["mismatch_rates"]))]
    if len(set(rates)) != len(rates):
        raise UserError(f"Spec key `{where}.mismatch_rates` has duplicates: {e['mismatch_rates']!r}.")
    return rates, True


def _check_small_loss(where: str, value: Any) -> bool | dict[str, Any] | None:
    """`true` / `false` or a mapping of the small-loss selection's options, checked by the method's own rule (a bad
    key or value names the spec key); kept as written (None when off), so the hash follows the spec's text."""
    from rcit_bench.models.small_loss import small_loss_options

    if small_loss_options(value, where) is None:
        return None
    return copy.deepcopy(value)


def _check_evaluate(where: str, value: Any) -> list[str] | None:
    """The cell kinds an entry is evaluated on, a subset of CELL_KINDS (None: the spec's whole grid)."""
    if value is None:
        return None
    kinds = [_check_name(f"{where}[{i}]", k, CELL_KINDS) for i, k in enumerate(_check_list(where, value))]
    return list(dict.fromkeys(kinds))


def entry_family(spec: Spec, entry_id: str, small_loss: bool = True) -> str:
    """Entries that differ only in their mismatch rate (and its seed, their id, description and evaluated cells)
    share a family: one row of the leaderboard's correspondence-noise table. ``small_loss=False`` also ignores
    the small-loss option, which pairs a defended row with its plain method."""
    e = next(x for x in spec.raw["entries"] if x["id"] == entry_id)
    ignored = {"id", "mismatch_rate", "mismatch_seed", "evaluate"} | (set() if small_loss else {"small_loss"})
    return sha256_json({k: v for k, v in e.items() if k not in ignored})[:12]


def _validate_early_stopping(value: Any) -> dict[str, Any] | None:
    """``{patience: int >= 1, min_delta: float >= 0}``, or ``false`` to train every entry to its budget cap."""
    if value is False or value is None:
        return None
    es = _check_keys(value, "early_stopping", EARLY_STOPPING_KEYS)
    out = {**DEFAULT_EARLY_STOPPING, **es}
    pat, delta = out["patience"], out["min_delta"]
    if isinstance(pat, bool) or not isinstance(pat, int) or pat < 1:
        raise UserError(f"Spec key `early_stopping.patience` must be an integer >= 1 (validations without "
                         f"improvement of val RSUM before training stops), but got {pat!r}.")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or delta < 0:
        raise UserError(f"Spec key `early_stopping.min_delta` must be a number >= 0 (RSUM points), but got {delta!r}.")
    return {"patience": pat, "min_delta": float(delta)}


def _validate_evaluation(ev: Any, dataset_kind: str) -> dict[str, Any]:
    for k in ("mismatch_rate", "mismatch_rates") if isinstance(ev, dict) else ():
        if k in ev:
            raise UserError(f"Spec key `evaluation.{k}` ({ev[k]!r}): correspondence noise applies to training pairs "
                             f"only; validation and test stay clean (as in NCR). Set `entries[i].{k}` instead.")
    _check_keys(ev, "evaluation", EVAL_KEYS)
    out: dict[str, Any] = {"clean": True, "imagenet_c": None, "rcit_protocol": None, "text": None,
                           "pointing_game": False}
    for flag in ("clean", "pointing_game"):
        if flag in ev:
            if not isinstance(ev[flag], bool):
                raise UserError(f"Spec key `evaluation.{flag}` must be true or false, but got {ev[flag]!r}.")
            out[flag] = ev[flag]
    if ev.get("imagenet_c"):
        ic = _check_keys(ev["imagenet_c"], "evaluation.imagenet_c", IC_KEYS, required=("corruptions",))
        _, sev_names, _ = known_corruptions()
        names = ic["corruptions"]
        if names == "all":
            names = list(sev_names)
        names = [_check_name(f"evaluation.imagenet_c.corruptions[{i}]", n, sev_names)
                 for i, n in enumerate(_check_list("evaluation.imagenet_c.corruptions", names))]
        sev = _check_levels("evaluation.imagenet_c.severities", ic.get("severities", [1, 2, 3, 4, 5]), SEVERITIES)
        out["imagenet_c"] = {"corruptions": list(dict.fromkeys(names)), "severities": sev}
    if ev.get("rcit_protocol"):
        rc = dict(_check_keys(ev["rcit_protocol"], "evaluation.rcit_protocol", RCIT_KEYS, required=("corruptions",)))
        w = "evaluation.rcit_protocol"
        spelled = {}  # errors name the key as the spec spells it
        for old, new in RCIT_OLD_SPELLINGS.items():
            if old in rc and new in rc:
                raise UserError(f"Spec key `{w}` gives both `{new}` and its older spelling `{old}`; keep `{new}`.")
            spelled[new] = old if old in rc else new
            if old in rc:
                rc[new] = rc.pop(old)
        _, _, rate_names = known_corruptions()
        names = [_check_name(f"{w}.corruptions[{i}]", n, rate_names)
                 for i, n in enumerate(_check_list(f"{w}.corruptions", rc["corruptions"]))]
        key, main_key = f"{w}.{spelled['pixel_noise_rates']}", f"{w}.{spelled['main_pixel_noise_rate']}"
        rates = [_check_rate(f"{key}[{i}]", r)
                 for i, r in enumerate(_check_list(key, rc.get("pixel_noise_rates", [0.6])))]
        main = _check_rate(main_key, rc.get("main_pixel_noise_rate", rates[0]))
        if main not in rates:
            raise UserError(f"Spec key `{main_key}` must be one of the pixel noise rates {_fmt(rates)}, but got "
                             f"{main!r}.")
        out["rcit_protocol"] = {"corruptions": list(dict.fromkeys(names)), "pixel_noise_rates": sorted(set(rates)),
                                "main_pixel_noise_rate": main}
    if ev.get("text"):
        tx = _check_keys(ev["text"], "evaluation.text", TEXT_KEYS, required=("perturbations",))
        allowed = known_perturbations()
        names = tx["perturbations"]
        if names == "all":
            names = list(allowed)
        names = [_check_name(f"evaluation.text.perturbations[{i}]", n, allowed)
                 for i, n in enumerate(_check_list("evaluation.text.perturbations", names))]
        levels = _check_levels("evaluation.text.levels", tx.get("levels", [1, 3, 5]), TEXT_LEVELS)
        out["text"] = {"perturbations": list(dict.fromkeys(names)), "levels": levels}
    if out["pointing_game"]:
        from rcit_bench.data.datasets import dataset_info

        if not dataset_info(dataset_kind).supports("pointing_game"):
            have = [k for k in known_datasets() if dataset_info(k).supports("pointing_game")]
            raise UserError(f"Spec key `evaluation.pointing_game` needs object boxes, which only dataset(s) "
                             f"{_fmt(have)} have, but `dataset.kind` is {dataset_kind!r}; set it to false.")
    if not any(out[k] for k in ("clean", "imagenet_c", "rcit_protocol", "text")):
        raise UserError("Spec key `evaluation` selects no cells; enable `clean` or add a corruption grid.")
    return out


def load_spec(path: str | Path, *, check_devices: bool = True) -> Spec:
    """Read and validate a spec YAML file. Also accepts a shipped spec name ('quick', 'smoke', ...).
    check_devices: as in :func:`validate_spec`."""
    p = Path(path)
    if not p.exists() and not p.suffix:
        shipped = shipped_specs()
        if str(path) in shipped:
            p = shipped[str(path)]
        else:
            raise FileNotFoundError(
                f"Spec {str(path)!r} is neither a file nor a shipped spec ({_fmt(sorted(shipped))})."
                f"{did_you_mean(str(path), shipped)}"
            )
    if not p.is_file():
        raise FileNotFoundError(f"Spec file {str(path)!r} not found.")
    data = _read_spec_file(p, str(path) if p == Path(path) else str(p))
    return validate_spec(data, p, check_devices=check_devices)


def _read_spec_file(p: Path, shown: str) -> dict[str, Any]:
    """The mapping a spec file holds; a UserError (one line, the file named as `shown`) when the file is not
    UTF-8, not YAML (with the line and column, 1-based), empty, or holds a list or a scalar instead."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"Spec file {shown!r} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        context_mark = getattr(err, "context_mark", None)
        if context and context_mark is not None and context_mark is not mark:
            problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
        elif context:
            problem += f" ({context})"
        problem = " ".join(str(problem).split())  # one line
        raise UserError(f"Spec file {shown!r} is not valid YAML{where}: {problem}; fix the YAML syntax there "
                        f"(indentation, a ':' or quote).") from None
    if data is None:
        raise UserError(f"Spec file {shown!r} is empty; a spec is a YAML mapping with the keys name, dataset, "
                        f"entries and evaluation (see benchmarks/smoke.yaml).")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single {type(data).__name__} value ({data!r:.40})"
        raise UserError(f"Spec file {shown!r} holds {kind}, not a mapping; a spec is a YAML mapping with the keys "
                        f"name, dataset, entries and evaluation (see benchmarks/smoke.yaml).")
    return data


def shipped_specs() -> dict[str, Path]:
    """Specs in the repository's ``benchmarks/`` folder (when run from a source checkout)."""
    found: dict[str, Path] = {}
    for root in (Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"):
        if root.is_dir():
            for p in sorted(root.glob("*.yaml")):
                found.setdefault(p.stem, p)
    return found
