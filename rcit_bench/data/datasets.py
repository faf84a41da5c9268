"""The dataset registry: every dataset kind the DataModule loads, and what the rest of the suite reads about it.

Why: a dataset is one decorated loader in one file. The DataModule, the spec validator and the runner ask
the registry (its default root, how to get the data, which evaluation protocols it supports) and never
compare dataset names. Built-in kinds register in ``synthetic.py``, ``karpathy.py`` (Flickr30k, COCO, any
Karpathy JSON) and ``hf.py`` (Hugging Face formats); those modules are imported on first lookup, and a
missing one is an ImportError, never a silently shorter list.

A loader is ``load(source: DataSource, split: str) -> CaptionSplit`` for split 'train' | 'val' | 'test'.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rcit_bench.errors import UserError
from rcit_bench.utils import check_choice

__all__ = ["DataSource", "DatasetInfo", "PRETRAINED", "PROTOCOLS", "TRAIN_REGIMES", "dataset_info", "list_datasets",
           "register_dataset"]

#: How the training images of any dataset are presented (the spec's entry `regime` and the DataModule's
#: `train_corruption` take these names): 'clean' as they are; 'augment' a fraction replaced by a corrupted
#: copy; 'paired' every image with a corrupted copy beside it (for methods with ``needs_paired_views``);
#: 'pretrained' not trained at all: the model is loaded as published and only evaluated (methods with ``zero_shot``).
TRAIN_REGIMES = ("clean", "augment", "paired", "pretrained")
#: the regime of an entry that is loaded, never trained (no fit, no checkpoint)
PRETRAINED = "pretrained"

#: Evaluation protocols a dataset may support beyond the full test split:
#: 'coco_1k' (COCO's 5-fold 1K test: metrics averaged over five folds of 1,000 images, as published), and
#: 'pointing_game' (object boxes per caption word, for the localization methods).
PROTOCOLS = ("coco_1k", "pointing_game")

_BUILTIN_MODULES = ("rcit_bench.data.synthetic", "rcit_bench.data.karpathy", "rcit_bench.data.hf")
_DATASETS: dict[str, "DatasetInfo"] = {}
_loaded = False


@dataclass(frozen=True)
class DataSource:
    """Where a dataset lives and the DataModule options that describe it, as handed to a loader."""

    kind: str
    root: Path | str  # a folder or file; a Hub name (str) for kinds with ``root_is_path=False``
    json_path: Path | None = None
    image_size: int = 64
    skip_unreadable: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # generator options (synthetic: n_train, n_val, ...)


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset kind (see :func:`register_dataset`)."""

    kind: str
    load: Callable[[DataSource, str], Any]
    default_root: str | None = None
    get_data: str = ""
    protocols: frozenset[str] = frozenset()
    prepare: Callable[[DataSource], None] | None = None
    root_is_path: bool = True
    needs_json: bool = False
    cache_images: bool = False
    description: str = ""

    def supports(self, protocol: str) -> bool:
        return protocol in self.protocols

    def missing(self, path: str | os.PathLike) -> FileNotFoundError:
        """The error for a dataset that is not where it was looked for, saying how to get it."""
        how = self.get_data or "Check the `root` argument"
        return FileNotFoundError(
            f"Dataset root for dataset={self.kind!r} not found: {path}. {how} (or pass root=...). "
            f"To run without downloading anything use dataset='synthetic'."
        )


def register_dataset(
    kind: str,
    *,
    default_root: str | None = None,
    get_data: str = "",
    protocols: tuple[str, ...] | frozenset[str] = (),
    prepare: Callable[[DataSource], None] | None = None,
    root_is_path: bool = True,
    needs_json: bool = False,
    cache_images: bool = False,
    description: str = "",
) -> Callable[[Callable[[DataSource, str], Any]], Callable[[DataSource, str], Any]]:
    """Decorator registering ``load(source, split) -> CaptionSplit`` as dataset `kind`.

    default_root: used when the user gives no root (None: a root is required). get_data: one sentence on
    how to get the data, shown when it is missing. protocols: the evaluation protocols of :data:`PROTOCOLS`
    it supports. prepare: run once before loading (e.g. generate the data). root_is_path: False when the
    root is a name (a Hub id). needs_json: the Karpathy JSON comes in ``json_path``. cache_images: decode all
    images into memory by default (small datasets).
    """
    bad = sorted(set(protocols) - set(PROTOCOLS))
    if bad:
        raise UserError(f"Argument `protocols` of dataset {kind!r} has unknown protocols {bad}; known: {list(PROTOCOLS)}.")

    def deco(fn: Callable[[DataSource, str], Any]) -> Callable[[DataSource, str], Any]:
        if kind in _DATASETS and _DATASETS[kind].load is not fn:
            raise UserError(f"Dataset {kind!r} is already registered by {_DATASETS[kind].load.__qualname__}.")
        _DATASETS[kind] = DatasetInfo(kind, fn, default_root, get_data, frozenset(protocols), prepare, root_is_path,
                                      needs_json, cache_images, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def _ensure_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def list_datasets() -> list[str]:
    """Registered dataset kinds, sorted."""
    _ensure_builtins()
    return sorted(_DATASETS)


def dataset_info(kind: str, arg: str = "dataset") -> DatasetInfo:
    """The registration of `kind`; ValueError naming the registered kinds otherwise."""
    _ensure_builtins()
    check_choice(arg, kind, sorted(_DATASETS))
    return _DATASETS[kind]
