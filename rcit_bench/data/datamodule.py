"""RetrievalDataModule: one Lightning DataModule for every dataset, training mode and evaluation loader.

Training iterates over captions (one item = one caption and its image). Evaluation iterates over unique images
and over captions separately, so text representations are computed once and reused across the corruption grid.
Determinism: training order and training corruptions derive from (seed, epoch, caption index) through a sampler
living in the main process, evaluation corruptions from (seed, image id), so results do not depend on
num_workers or batch composition.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rcit_bench.errors import UserError
from rcit_bench.data.captions import CaptionSplit, simple_tokenize
from rcit_bench.data.corruptions import SCALINGS
from rcit_bench.data.datasets import PRETRAINED, TRAIN_REGIMES, DataSource, dataset_info
from rcit_bench.data.karpathy import SPLITS
from rcit_bench.data.vocab import HFTokenizer, Vocabulary
from rcit_bench.utils import check_choice, keep_freed_memory, stable_hash

__all__ = ["RetrievalDataModule", "collate_text", "seed_worker"]

log = logging.getLogger(__name__)

# RCIT's setting: speckle or salt-and-pepper noise on 60% of the pixels
DEFAULT_CORRUPTION_MIX = ({"name": "speckle", "rate": 0.6}, {"name": "salt_pepper", "rate": 0.6})
_SEED_MOD = 2**31 - 1


# ------------------------------------------------------------------------------------------------ helpers


def seed_worker(worker_id: int) -> None:
    """Seed python/numpy in each worker from torch's per-worker seed (itself derived from the loader generator);
    keep freed memory for reuse in the worker, as the main process does (see utils.keep_freed_memory)."""
    keep_freed_memory()
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def collate_text(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to (B, L) int64 with `pad_id`; lengths (B,) count <start>/<end>."""
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    out = torch.full((len(ids), int(lengths.max()) if len(ids) else 0), pad_id, dtype=torch.long)
    for b, x in enumerate(ids):
        out[b, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
    return out, lengths


def _corrupt(images: torch.Tensor, spec: dict, seed: int, image_ids: Sequence[int], scaling: str) -> torch.Tensor:
    """Corrupt a (B, 3, H, W) batch as `spec` says; RNG from (seed, name, level, image id) inside `corrupt`, so
    each image's pixels do not depend on the batch it is in. `scaling`: the DataModule's corruption_scaling,
    required (no default) so that no call can silently fall back to 'image'."""
    from rcit_bench.data.corruptions import corrupt

    return corrupt(images, spec["name"], severity=spec.get("severity"), rate=spec.get("rate"), seed=int(seed),
                   image_ids=[int(i) for i in image_ids], scaling=scaling)


def _corrupt_one(image: torch.Tensor, spec: dict, seed: int, image_id: int, scaling: str) -> torch.Tensor:
    """Corrupt a single (3, H, W) image (training items each have their own noise seed)."""
    return _corrupt(image[None], spec, seed, [image_id], scaling)[0]


def _validate_corruption(name: str, severity: int | None, rate: float | None, where: str, arg: str) -> dict:
    """Check a corruption spec early (before workers start) by the corruptions' own name list and level rule."""
    from rcit_bench.data.corruptions import check_level, list_corruptions

    check_choice(arg, name, list_corruptions())
    try:
        check_level(name, severity, rate)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None
    return {"name": name, "severity": severity, "rate": rate}


# ----------------------------------------------------------------------------------------------- datasets


class _ImageStore:
    """Images of one split at the DataModule's resolution, optionally decoded once into a uint8 cache."""

    def __init__(self, split: CaptionSplit, image_size: int, cache: bool) -> None:
        self.split, self.image_size = split, image_size
        self.cache: torch.Tensor | None = None
        if cache:
            self.cache = torch.stack([split.load_image_uint8(i, image_size) for i in range(len(split))])  # (N,3,S,S)

    def __len__(self) -> int:
        return len(self.split)

    def get(self, i: int) -> torch.Tensor:
        """Float (3, S, S) in [0, 1]."""
        img = self.cache[i] if self.cache is not None else self.split.load_image_uint8(i, self.image_size)
        return img.float().div_(255.0)


class _EpochSampler(Sampler):
    """Yields (caption index, epoch): a per-epoch permutation from (seed, epoch), carrying the epoch to workers.

    Lightning calls ``set_epoch`` before each epoch (on a loader's ``sampler`` or its batch sampler's ``sampler``);
    without it, each new iteration advances the epoch.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        if self.shuffle:
            g = torch.Generator().manual_seed(stable_hash(self.seed, "shuffle", epoch) % _SEED_MOD)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = range(self.n)
        return iter([(int(k), epoch) for k in order])


class _GlobalBatchSampler(Sampler):
    """Yields this rank's part of each global training batch (lists of the `sampler`'s items).

    The global batches are consecutive runs of ``batch_size`` items of the sampler's epoch; rank r of ``world_size``
    takes the r-th contiguous part of each (parts differ by at most one item). Gathered in rank order
    (rcit_bench.models.global_batch), the parts are the very batch one process draws, so a multi-process step sees
    the same pairs in the same order as a single-process one; with one process this is ``BatchSampler(sampler,
    batch_size, drop_last=False)``. A last global batch smaller than the world size is dropped (a rank would get
    none). ``sampler`` is an attribute by that name so that Lightning's ``set_epoch`` reaches it.
    """

    def __init__(self, sampler: _EpochSampler, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.sampler, self.batch_size, self.rank, self.world_size = sampler, batch_size, rank, world_size

    def _sizes(self) -> list[int]:
        full, last = divmod(len(self.sampler), self.batch_size)
        sizes = [self.batch_size] * full + ([last] if last else [])
        return [m for m in sizes if m >= self.world_size]

    def __len__(self) -> int:
        return len(self._sizes())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        items = list(self.sampler)
        for k, m in enumerate(self._sizes()):
            base, extra = divmod(m, self.world_size)
            start = k * self.batch_size + self.rank * base + min(self.rank, extra)
            yield items[start:start + base + (1 if self.rank < extra else 0)]


class _CaptionImageDataset(Dataset):
    """One item per caption with its image; training corruption decided per (seed, epoch, caption index)."""

    def __init__(self, store: _ImageStore, token_ids: list[list[int]], mode: str, mix: Sequence[dict],
                 fraction: float, seed: int, scaling: str, caption_to_image: torch.Tensor | None = None) -> None:
        self.store, self.token_ids, self.mode, self.mix = store, token_ids, mode, list(mix)
        self.fraction, self.seed, self.scaling = fraction, seed, scaling
        # the pairing the model is given: the split's own, or a mismatched one (correspondence noise)
        self.c2i = (store.split.caption_to_image if caption_to_image is None else caption_to_image).tolist()

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        k, epoch = index if isinstance(index, tuple) else (index, 0)
        i = self.c2i[k]
        image = self.store.get(i)
        item: dict[str, Any] = {"image": image, "ids": self.token_ids[k], "image_index": i, "caption_index": k}
        if self.mode == "clean":
            return item
        rng = random.Random(stable_hash(self.seed, "train-corruption", epoch, k))
        spec = self.mix[rng.randrange(len(self.mix))]
        cseed = stable_hash(self.seed, "train-noise", epoch, k) % _SEED_MOD
        image_id = self.store.split.image_ids[i]
        if self.mode == "paired":
            item["corrupted_image"] = _corrupt_one(image, spec, cseed, image_id, self.scaling)
        else:  # augment
            item["corrupted"] = rng.random() < self.fraction
            if item["corrupted"]:
                item["image"] = _corrupt_one(image, spec, cseed, image_id, self.scaling)
        return item


def _collate_caption_image(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    tokens, lengths = collate_text([b["ids"] for b in batch], pad_id)
    out = {
        "images": torch.stack([b["image"] for b in batch]),  # (B, 3, H, W)
        "tokens": tokens,  # (B, L)
        "lengths": lengths,  # (B,)
        "image_index": torch.tensor([b["image_index"] for b in batch], dtype=torch.long),
        "caption_index": torch.tensor([b["caption_index"] for b in batch], dtype=torch.long),
    }
    if "corrupted_image" in batch[0]:
        out["corrupted_images"] = torch.stack([b["corrupted_image"] for b in batch])  # (B, 3, H, W)
    if "corrupted" in batch[0]:  # augment mode: which images were replaced by a corrupted copy
        out["corrupted"] = torch.tensor([b["corrupted"] for b in batch], dtype=torch.bool)
    return out


class _ImageDataset(Dataset):
    """Unique images, clean; the evaluation corruption is applied to the whole batch in `_CorruptingCollate`."""

    def __init__(self, store: _ImageStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.store.get(i), "image_index": i, "image_id": self.store.split.image_ids[i]}


class _CorruptingCollate:
    """Stack unique images and corrupt the batch in one call, deterministic per (seed, image id) as one image at a
    time would be, and ~2x cheaper over the corruptions at 64 px (batched torch ops instead of per-image calls)."""

    def __init__(self, spec: dict | None, seed: int, scaling: str) -> None:
        self.spec, self.seed, self.scaling = spec, seed, scaling

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        images = torch.stack([b["image"] for b in batch])
        if self.spec is not None:
            images = _corrupt(images, self.spec, self.seed, [b["image_id"] for b in batch], self.scaling)
        return {"images": images, "image_index": torch.tensor([b["image_index"] for b in batch], dtype=torch.long)}


class _CaptionDataset(Dataset):
    def __init__(self, token_ids: list[list[int]]) -> None:
        self.token_ids = token_ids

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return {"ids": self.token_ids[k], "caption_index": k}


def _collate_captions(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    tokens, lengths = collate_text([b["ids"] for b in batch], pad_id)
    return {"tokens": tokens, "lengths": lengths,
            "caption_index": torch.tensor([b["caption_index"] for b in batch], dtype=torch.long)}


class _Collate:
    """Picklable collate with a bound pad id (lambdas do not survive spawn-started workers)."""

    def __init__(self, fn: Any, pad_id: int | None = None) -> None:
        self.fn, self.pad_id = fn, pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        return self.fn(batch) if self.pad_id is None else self.fn(batch, self.pad_id)


# --------------------------------------------------------------------------------------------- datamodule


class RetrievalDataModule(L.LightningDataModule):
    """Image-text retrieval data for every dataset source, with clean / augmented / paired corrupted training.

    Args:
        dataset: a registered kind (rcit_bench.data.datasets.list_datasets(): 'synthetic', 'flickr30k', 'coco',
            'karpathy', 'hf_imagefolder', 'hf_parquet', 'hf_hub', and any the user registers).
        root: dataset directory (synthetic: generated there, default 'data/synthetic'; flickr30k/coco: holds
            dataset_<name>.json and images/; karpathy: the image root; hf_imagefolder: the folder; hf_parquet: a
            file, directory or glob; hf_hub: the dataset name).
        json_path: the Karpathy JSON for dataset='karpathy'.
        image_size: images are delivered as (3, S, S) (shorter side resized, center crop); the synthetic set is
            generated at this size.
        train_corruption: 'clean'; 'augment' replaces `augment_fraction` of training images by a corrupted copy
            (corruption drawn from `corruption_mix`); 'paired' adds `corrupted_images` to every training batch.
        corruption_mix: list of {name, severity | rate}; default RCIT's speckle / salt-and-pepper at rate 0.6.
        seed: training order, training corruptions and worker seeds.
        eval_seed: seed of evaluation corruptions / caption perturbations, separate from `seed` so models trained
            with different seeds are all tested on the very same corrupted pixels.
        n_train / n_val / n_test / synthetic_seed: size and generation seed of the synthetic set (the data does
            not change with the training `seed`).
        text_encoder: 'vocab' (word vocabulary from the training split), a local Hugging Face tokenizer path, or
            ``{path: <dir or hub id>, local_files_only: bool}``, or ``{open_clip: <arch>, model_config: <json>}``. A method with its own tokenizer (``tokenizer_for``,
            e.g. a pretrained dual encoder) sets this itself through the runner.
        limit_train / limit_val / limit_test: keep the first N images (and their captions) for tiny runs.
        cache_images: decode all images once into memory as uint8 (default: as the dataset registers; synthetic).
        corruption_scaling: how every corruption made here (evaluation images, training corruptions) meets the
            image size: 'image' (default: constants scaled by min(H, W) / 224, i.e. as on a 224 px image) or
            'published' (the 224 px constants as published, as the `imagecorruptions` package); see
            rcit_bench.data.corruptions. With 'image', pixelate at severities 1-3 is the identity at 64 px.
        mismatch_rate / mismatch_seed: correspondence noise: exactly round(rate * N_cap) training captions are
            paired with another image, chosen from `mismatch_seed` (rcit_bench.data.noise.mismatch_captions).
            Only the training split; validation and test stay clean.
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str | os.PathLike | None = None,
        *,
        json_path: str | os.PathLike | None = None,
        image_size: int = 64,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        eval_seed: int = 0,
        train_corruption: str = "clean",
        corruption_mix: Sequence[dict] | None = None,
        augment_fraction: float = 0.5,
        n_train: int = 10000,
        n_val: int = 1000,
        n_test: int = 1000,
        synthetic_seed: int = 0,
        text_encoder: str | dict[str, Any] = "vocab",
        vocab_min_count: int = 1,
        max_length: int | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        cache_images: bool | None = None,
        skip_unreadable: bool = False,
        corruption_scaling: str = "image",
        mismatch_rate: float = 0.0,
        mismatch_seed: int = 0,
    ) -> None:
        super().__init__()
        info = dataset_info(dataset)
        check_choice("train_corruption", train_corruption, TRAIN_REGIMES)
        check_choice("corruption_scaling", corruption_scaling, SCALINGS)
        for arg, value in (("image_size", image_size), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"Argument `{arg}` must be a positive integer, but got {value!r}.")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"Argument `num_workers` must be an integer >= 0, but got {num_workers!r}.")
        if not 0.0 <= float(augment_fraction) <= 1.0:
            raise UserError(f"Argument `augment_fraction` must be in [0, 1], but got {augment_fraction!r}.")
        for arg, value in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"Argument `{arg}` must be a positive integer or None, but got {value!r}.")
        from rcit_bench.data.noise import check_mismatch_rate, check_mismatch_seed

        mismatch_rate = check_mismatch_rate(mismatch_rate, "mismatch_rate")
        mismatch_seed = check_mismatch_seed(mismatch_seed, "mismatch_seed")
        if info.needs_json and (json_path is None or root is None):
            raise UserError(f"dataset={dataset!r} needs `json_path` (the Karpathy JSON) and `root` (the image root).")
        if root is None and info.default_root is None:
            raise UserError(f"dataset={dataset!r} needs `root` ({info.description or 'where the data is'}).")
        # logger=False: model and datamodule both name a `text_encoder` (a network vs a tokenizer), which
        # Lightning refuses to merge for the logger; the runner records the datamodule's options itself
        self.save_hyperparameters(logger=False)
        self.dataset, self.info = dataset, info
        root = root if root is not None else info.default_root
        self.root = Path(root) if info.root_is_path else root
        self.json_path = Path(json_path) if json_path is not None else None
        self.image_size, self.batch_size, self.eval_batch_size = image_size, batch_size, eval_batch_size
        self.num_workers, self.seed, self.eval_seed = num_workers, int(seed), int(eval_seed)
        self.train_corruption, self.augment_fraction = train_corruption, float(augment_fraction)
        self.synthetic_sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
        self.synthetic_seed = int(synthetic_seed)
        self.text_encoder_name, self.vocab_min_count, self.max_length = text_encoder, vocab_min_count, max_length
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.cache_images = info.cache_images if cache_images is None else bool(cache_images)
        self.skip_unreadable = skip_unreadable
        self.corruption_scaling = corruption_scaling
        self.mismatch_rate, self.mismatch_seed = mismatch_rate, int(mismatch_seed)
        self._train_c2i: torch.Tensor | None = None
        self.corruption_mix: list[dict] = []
        if train_corruption in ("augment", "paired"):
            mix = list(corruption_mix) if corruption_mix is not None else [dict(d) for d in DEFAULT_CORRUPTION_MIX]
            if not mix:
                raise UserError(f"Argument `corruption_mix` must not be empty when train_corruption={train_corruption!r}.")
            for j, spec in enumerate(mix):
                if not isinstance(spec, dict) or "name" not in spec or set(spec) - {"name", "severity", "rate"}:
                    raise UserError(f"Argument `corruption_mix[{j}]` must be a dict with 'name' and 'severity' or "
                                     f"'rate', but got {spec!r}.")
                self.corruption_mix.append(_validate_corruption(spec["name"], spec.get("severity"), spec.get("rate"),
                                                                f"corruption_mix[{j}]", f"corruption_mix[{j}].name"))
        self._splits: dict[str, CaptionSplit] = {}
        self._stores: dict[str, _ImageStore] = {}
        self._encoded: dict[tuple[str, Any, Any], list[list[int]]] = {}
        self._encoder: Vocabulary | HFTokenizer | None = None
        self._train_sampler: _EpochSampler | None = None

    # ---------------------------------------------------------------------------------------- loading

    #: options that change only how training data is drawn and batched: two datamodules differing only in these
    #: deliver the very same test images, so the runner corrupts a cell's test images once for both
    TRAINING_ONLY_OPTIONS = ("train_corruption", "corruption_mix", "augment_fraction", "batch_size",
                             "eval_batch_size", "num_workers", "mismatch_rate", "mismatch_seed")

    def test_data_key(self) -> str:
        """A key equal for datamodules that deliver identical test images (see TRAINING_ONLY_OPTIONS)."""
        return json.dumps({k: v for k, v in self.hparams.items() if k not in self.TRAINING_ONLY_OPTIONS},
                          sort_keys=True, default=str)

    @property
    def source(self) -> DataSource:
        """What the dataset's registered loader is handed."""
        return DataSource(self.dataset, self.root, self.json_path, self.image_size, self.skip_unreadable,
                          {**self.synthetic_sizes, "synthetic_seed": self.synthetic_seed})

    def prepare_data(self) -> None:
        if self.info.prepare is not None:
            self.info.prepare(self.source)

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for s in needed.get(stage, SPLITS) if stage else SPLITS:
            self.split(s)

    def _load(self, split: str) -> CaptionSplit:
        self.prepare_data()
        return self.info.load(self.source, split)

    def check_data(self) -> dict[str, int]:
        """Load and validate every split (fields, paths, files present and non-empty; the first image of each
        split decoded) before anything trains, so a broken test split fails in seconds, not after training.
        Returns the images per split."""
        counts = {}
        for name in SPLITS:
            cs = self.split(name)
            if len(cs) == 0:
                raise UserError(f"Split {name!r} of dataset={self.dataset!r} at {self.root} has no images.")
            cs.load_image_uint8(0, self.image_size)
            counts[name] = len(cs)
        return counts

    def split(self, split: str) -> CaptionSplit:
        """The (limited) CaptionSplit of 'train' | 'val' | 'test', loaded once."""
        check_choice("split", split, SPLITS)
        if split not in self._splits:
            self._splits[split] = self._load(split).head(self.limits[split])
            log.debug("loaded %r", self._splits[split])
        return self._splits[split]

    def caption_to_image(self, split: str) -> torch.Tensor:
        """LongTensor (N_cap,) image index of each caption of `split`."""
        return self.split(split).caption_to_image.clone()

    def training_caption_to_image(self, split: str = "train") -> torch.Tensor:
        """LongTensor (N_cap,) of the image each training caption is paired with: the split's own index, or with
        ``mismatch_rate`` > 0 the mismatched one (fixed for the whole training). Only 'train' has one: validation
        and test stay clean, so asking for another split is an error."""
        if split != "train":
            raise UserError(f"`mismatch_rate` {self.mismatch_rate!r} applies to the training split only, but split "
                            f"{split!r} was asked for; validation and test stay clean (as in NCR).")
        if self._train_c2i is None:
            from rcit_bench.data.noise import mismatch_captions

            self._train_c2i = mismatch_captions(self.split("train").caption_to_image, self.mismatch_rate,
                                                self.mismatch_seed)
        return self._train_c2i.clone()

    def mismatched_captions(self) -> torch.Tensor:
        """BoolTensor (N_cap_train,): True where a training caption is paired with another image than its own."""
        return self.training_caption_to_image() != self.split("train").caption_to_image

    def mismatch_record(self) -> dict[str, Any]:
        """What a result file records of the correspondence noise: the nominal rate, the actual fraction of
        training captions paired with another image, the seed, and the counts."""
        from rcit_bench.data.noise import mismatch_fraction

        noisy, own = self.training_caption_to_image(), self.split("train").caption_to_image
        return {"mismatch_rate": self.mismatch_rate, "mismatch_actual": mismatch_fraction(own, noisy),
                "mismatch_seed": self.mismatch_seed, "mismatched_captions": int((noisy != own).sum()),
                "train_captions": int(len(own)), "split": "train"}

    def _store(self, split: str) -> _ImageStore:
        if split not in self._stores:
            self._stores[split] = _ImageStore(self.split(split), self.image_size, self.cache_images)
        return self._stores[split]

    @property
    def vocab(self) -> Vocabulary | HFTokenizer:
        """The text encoder: a Vocabulary built from the (limited) TRAINING split only, or an HFTokenizer."""
        if self._encoder is None:
            name = self.text_encoder_name
            if name == "vocab":
                self._encoder = Vocabulary.build(self.split("train").tokens, min_count=self.vocab_min_count)
            elif isinstance(name, dict) and "open_clip" in name:
                from rcit_bench.models.open_clip_model import OpenClipTokenizer

                self._encoder = OpenClipTokenizer(name["open_clip"], name.get("model_config"))
            elif isinstance(name, dict):
                if set(name) - {"path", "local_files_only"} or "path" not in name:
                    raise UserError(f"Argument `text_encoder` as a mapping takes `path` and `local_files_only`, but "
                                    f"got {name!r}.")
                self._encoder = HFTokenizer(name["path"], max_length=self.max_length,
                                            local_files_only=bool(name.get("local_files_only", True)))
            else:
                self._encoder = HFTokenizer(name, max_length=self.max_length)
        return self._encoder

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return int(self.vocab.pad_id)

    def _token_ids(self, split: str, perturbation: str | None = None, level: int | None = None) -> list[list[int]]:
        """Encoded captions of a split, optionally perturbed (deterministic per (seed, caption index))."""
        key = (split, perturbation, level)
        if key not in self._encoded:
            cs, enc = self.split(split), self.vocab
            use_words = isinstance(enc, Vocabulary)
            if perturbation is None:
                texts: list = cs.tokens if use_words else cs.captions
            else:
                from rcit_bench.data.text_perturbations import perturb_caption

                raw = [perturb_caption(c, perturbation, int(level), seed=self.eval_seed, caption_id=k)
                       for k, c in enumerate(cs.captions)]
                texts = [simple_tokenize(r) for r in raw] if use_words else raw
            self._encoded[key] = [enc.encode(t, max_length=self.max_length) for t in texts]
        return self._encoded[key]

    # ------------------------------------------------------------------------------------- dataloaders

    def _loader(self, dataset: Dataset, batch_size: int | None, collate: _Collate, sampler: Sampler | None = None,
                persistent: bool = False, batch_sampler: Sampler | None = None) -> DataLoader:
        if batch_sampler is not None:  # DataLoader refuses batch_size/shuffle beside a batch sampler
            return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.num_workers, collate_fn=collate,
                              worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(self.seed),
                              persistent_workers=persistent and self.num_workers > 0)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
            num_workers=self.num_workers, collate_fn=collate, worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.seed), persistent_workers=persistent and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled captions with their images; batch dict images/tokens/lengths/image_index/caption_index
        (+ corrupted_images in 'paired' mode). ``batch_size`` is the global batch: under several processes each
        rank loads its contiguous part of it (see :class:`_GlobalBatchSampler`)."""
        from rcit_bench.distributed import get_rank, get_world_size

        mode = "clean" if self.train_corruption == PRETRAINED else self.train_corruption  # never fitted; as is
        ds = _CaptionImageDataset(self._store("train"), self._token_ids("train"), mode,
                                  self.corruption_mix, self.augment_fraction, self.seed, self.corruption_scaling,
                                  caption_to_image=self.training_caption_to_image())
        self._train_sampler = _EpochSampler(len(ds), self.seed, shuffle=True)
        batches = _GlobalBatchSampler(self._train_sampler, self.batch_size, get_rank(), get_world_size())
        return self._loader(ds, None, _Collate(_collate_caption_image, self.pad_id), persistent=True,
                            batch_sampler=batches)

    def _ordered_pairs(self, split: str) -> DataLoader:
        """Captions of `split` in order with their images; under several processes this rank's block of whole
        batches (rcit_bench.distributed.ShardSampler, mode 'batches': no item padded or repeated)."""
        from rcit_bench.distributed import ShardSampler, get_world_size, is_distributed

        ds = _CaptionImageDataset(self._store(split), self._token_ids(split), "clean", [], 0.0, self.seed,
                                  self.corruption_scaling)
        sampler = None
        if is_distributed():  # whole batches when every rank gets one (Lightning skips a rank with none: a hang)
            whole = -(-len(ds) // self.eval_batch_size) >= get_world_size()
            sampler = ShardSampler(len(ds), mode="batches" if whole else "contiguous", batch_size=self.eval_batch_size)
        return self._loader(ds, self.eval_batch_size, _Collate(_collate_caption_image, self.pad_id), sampler)

    def val_dataloader(self) -> DataLoader:
        """Clean val captions in caption order, each with its image (same dict format as training); under several
        processes, this rank's shard (the model gathers the shards before computing the metrics)."""
        return self._ordered_pairs("val")

    def test_dataloader(self) -> DataLoader:
        return self._ordered_pairs("test")

    def image_loader(self, split: str, corruption: str | None = None, severity: int | None = None,
                     rate: float | None = None) -> DataLoader:
        """Unique images of `split` as {images (B,3,S,S), image_index (B,)}, optionally corrupted per
        (eval_seed, image id) so the pixels do not depend on batch size, order or num_workers, with the
        DataModule's `corruption_scaling`."""
        spec = None
        if corruption is not None:
            spec = _validate_corruption(corruption, severity, rate, "corruption", "corruption")
        elif severity is not None or rate is not None:
            raise UserError(f"`severity`/`rate` given ({severity!r}/{rate!r}) without a `corruption` name.")
        return self._loader(_ImageDataset(self._store(split)), self.eval_batch_size,
                            _CorruptingCollate(spec, self.eval_seed, self.corruption_scaling))

    def caption_loader(self, split: str, perturbation: str | None = None, level: int | None = None) -> DataLoader:
        """Captions of `split` as {tokens (B,L), lengths (B,), caption_index (B,)}, optionally perturbed."""
        if perturbation is not None:
            from rcit_bench.data.text_perturbations import list_perturbations

            check_choice("perturbation", perturbation, list_perturbations())
            if level is None:
                raise UserError(f"Argument `level` is required with perturbation={perturbation!r}.")
        return self._loader(_CaptionDataset(self._token_ids(split, perturbation, level)), self.eval_batch_size,
                            _Collate(_collate_captions, self.pad_id))
