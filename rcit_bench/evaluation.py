"""The one evaluation path for every method: encode images, encode captions, similarity, metrics.

Why separate image and text encoding: text representations do not depend on the image corruption,
so the runner encodes the captions once per model (:func:`encode_texts`) and re-encodes only the
images for each cell of the corruption grid (:func:`evaluate`).

Representations are dicts of tensors whose first dim is the item (see rcit_bench.models.base); they
stay on the model's device. Each returned dict also carries the item order it was sorted by
(``image_index`` / ``caption_index``), which :func:`evaluate` uses to line up ``caption_to_image``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["encode_images", "encode_texts", "cat_reps", "evaluate", "evaluate_ranks", "CellEvaluation",
           "CellEvaluator", "ImageChange", "similarity_matrix"]

_INDEX_KEYS = ("image_index", "caption_index")


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def cat_reps(reps: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate rep dicts along dim 0; tensors with ndim >= 3 (word features) are zero-padded in dim 1.

    ``lengths`` entries are concatenated unchanged, so padded words stay masked out.
    """
    if not reps:
        raise ValueError("Argument `reps` is empty: no batches were encoded (is the loader empty?).")
    out: dict[str, Tensor] = {}
    for key in reps[0]:
        parts = [r[key] for r in reps]
        if parts[0].ndim >= 3:
            width = max(p.shape[1] for p in parts)
            parts = [F.pad(p, (0, 0) * (p.ndim - 2) + (0, width - p.shape[1])) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    return out


def _sorted_by(reps: dict[str, Tensor], index: Tensor, key: str) -> dict[str, Tensor]:
    order = torch.argsort(index)
    out = {k: v[order] for k, v in reps.items()}
    out[key] = index[order]
    if len(torch.unique(out[key])) != len(out[key]):
        raise ValueError(f"The loader yielded duplicate `{key}` values; each item must appear once.")
    return out


@torch.inference_mode()
def encode_images(model: Any, loader: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Encode every image of a loader yielding ``{images (B,3,H,W), image_index (B,)}``.

    Returns the model's image reps sorted by ``image_index`` plus an ``image_index`` entry.
    """
    model.eval()
    device = _device(model)
    reps, index = [], []
    for batch in loader:
        reps.append(model.encode_image(batch["images"].to(device)))
        index.append(torch.as_tensor(batch["image_index"]).to(device))
    return _sorted_by(cat_reps(reps), torch.cat(index), "image_index")


@torch.inference_mode()
def encode_texts(model: Any, loader: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Encode every caption of a loader yielding ``{tokens (B,L), lengths (B,), caption_index (B,)}``.

    Returns the model's text reps sorted by ``caption_index`` plus a ``caption_index`` entry.
    """
    model.eval()
    device = _device(model)
    reps, index = [], []
    for batch in loader:
        reps.append(model.encode_text(batch["tokens"].to(device), batch["lengths"].to(device)))
        index.append(torch.as_tensor(batch["caption_index"]).to(device))
    return _sorted_by(cat_reps(reps), torch.cat(index), "caption_index")


def _strip(reps: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in reps.items() if k not in _INDEX_KEYS}


@torch.inference_mode()
def similarity_matrix(model: Any, image_reps: dict[str, Tensor], text_reps: dict[str, Tensor]) -> Tensor:
    """(N_img, N_txt) similarities from the model, index entries removed."""
    model.eval()
    return model.similarity(_strip(image_reps), _strip(text_reps))


@dataclass
class CellEvaluation:
    """What one evaluation produced: the metrics, and the per-query ranks they came from (kept so that
    intervals, paired comparisons and later metrics need no model), with the queries tied at their positive."""

    metrics: dict[str, float]
    ranks_i2t: Tensor  # (N_img,) 1-based
    ranks_t2i: Tensor  # (N_cap,) 1-based
    ties_i2t: Tensor  # (N_img,) bool: a non-matching caption scored exactly as the image's best caption
    ties_t2i: Tensor  # (N_cap,) bool: another image scored exactly as the caption's own image
    caption_to_image: Tensor  # (N_cap,) positions of each caption's image in the rank arrays
    image_change: dict[str, Any] | None = None  # how far the test images moved (set by the runner)

    def tie_counts(self) -> dict[str, int]:
        """Queries with a tie at their positive, per direction, and the number of queries."""
        return {"i2t": int(self.ties_i2t.sum()), "t2i": int(self.ties_t2i.sum()),
                "i2t_queries": int(self.ties_i2t.numel()), "t2i_queries": int(self.ties_t2i.numel())}


def evaluate(
    model: Any,
    image_loader: Iterable[dict[str, Tensor]] | dict[str, Tensor],
    text_reps: dict[str, Tensor],
    caption_to_image: Tensor,
    *,
    coco_1k: bool = False,
) -> dict[str, float]:
    """Retrieval metrics of `model` on the images of `image_loader` against precomputed `text_reps`.

    `image_loader` may also be image reps already returned by :func:`encode_images`.
    `caption_to_image` (N_cap,) maps each caption of the split to its image's index in the split;
    only the captions present in `text_reps` (by ``caption_index``) and images present in the loader
    (by ``image_index``) are used. ``coco_1k=True`` adds the 5-fold 1K metrics as ``1k_<key>``.
    """
    return evaluate_ranks(model, image_loader, text_reps, caption_to_image, coco_1k=coco_1k).metrics


def evaluate_ranks(
    model: Any,
    image_loader: Iterable[dict[str, Tensor]] | dict[str, Tensor],
    text_reps: dict[str, Tensor],
    caption_to_image: Tensor,
    *,
    coco_1k: bool = False,
) -> CellEvaluation:
    """As :func:`evaluate`, returning the per-query ranks and tie flags with the metrics."""
    from rcit_bench.metrics import compute_ranks, metrics_from_ranks

    image_reps = image_loader if isinstance(image_loader, dict) else encode_images(model, image_loader)
    c2i = torch.as_tensor(caption_to_image).long()
    cap_idx = text_reps.get("caption_index")
    if cap_idx is not None:
        c2i = c2i.to(cap_idx.device)[cap_idx]
    img_idx = image_reps.get("image_index")
    if img_idx is not None:
        c2i = c2i.to(img_idx.device)
        pos = torch.searchsorted(img_idx, c2i).clamp(max=len(img_idx) - 1)
        if not torch.equal(img_idx[pos], c2i):
            missing = sorted(set(c2i.tolist()) - set(img_idx.tolist()))[:5]
            raise ValueError(
                f"Argument `caption_to_image` refers to images the image loader did not yield, e.g. {missing}."
            )
        c2i = pos
    sims = similarity_matrix(model, image_reps, text_reps).float().cpu()
    if sims.shape[1] != len(c2i):
        raise ValueError(f"Similarity has {sims.shape[1]} captions but `caption_to_image` has {len(c2i)}.")
    c2i = c2i.cpu()
    r_i2t, r_t2i, tie_i2t, tie_t2i = compute_ranks(sims, c2i, return_ties=True)
    metrics = {k: float(v) for k, v in metrics_from_ranks(r_i2t, r_t2i).items()}
    if coco_1k:
        from rcit_bench.metrics import coco_1k_metrics

        metrics.update({f"1k_{k}": float(v) for k, v in coco_1k_metrics(sims, c2i).items()})
    return CellEvaluation(metrics, r_i2t, r_t2i, tie_i2t, tie_t2i, c2i)


class CellEvaluator:
    """Evaluates cells of one model, caching what does not depend on the cell: caption reps (encoded once),
    clean image reps (once, reused by the clean and all text-perturbation cells).

    Under several processes (a DDP job) every rank encodes its block of whole batches of images and captions
    (rcit_bench.distributed.distributed_encode) and the blocks are gathered, so the representations are the
    single-process ones bit for bit; only rank 0 ranks them and returns the cell's result, the other ranks return
    None (rank 0 writes the result files). The pointing game runs on rank 0 alone.
    """

    def __init__(self, model: Any, dm: Any, seed: int, split: str = "test", coco_1k: bool = False) -> None:
        self.model, self.dm, self.seed, self.split, self.coco_1k = model, dm, seed, split, coco_1k
        self._text: dict[str, Any] | None = None
        self._clean_images: dict[str, Any] | None = None
        self._c2i = None

    @property
    def c2i(self) -> Any:
        if self._c2i is None:
            self._c2i = self.dm.caption_to_image(self.split)
        return self._c2i

    def _encode(self, kind: str, loader: Iterable[dict[str, Any]], change: "ImageChange | None" = None) -> dict[str, Any]:
        from rcit_bench.distributed import distributed_encode, is_distributed

        wrap = change.wrap if change is not None else None
        if is_distributed():
            return distributed_encode(self.model, loader, kind, wrap=wrap)  # type: ignore[arg-type]
        batches = wrap(loader) if wrap is not None else loader
        return (encode_images if kind == "image" else encode_texts)(self.model, batches)

    def text_reps(self) -> dict[str, Any]:
        if self._text is None:
            self._text = self._encode("text", self.dm.caption_loader(self.split))
        return self._text

    def image_reps(self, corruption: str | None = None, severity: int | None = None,
                   rate: float | None = None, batches: Iterable[dict[str, Any]] | None = None,
                   change: "ImageChange | None" = None) -> dict[str, Any]:
        if corruption is None and self._clean_images is not None:
            return self._clean_images
        if batches is None:
            batches = self.dm.image_loader(self.split, corruption=corruption, severity=severity, rate=rate)
        reps = self._encode("image", batches, change)
        if corruption is None:
            self._clean_images = reps
        return reps

    def __call__(self, cell: Any, images: Iterable[dict[str, Any]] | None = None) -> Any:
        """One cell: a :class:`~rcit_bench.evaluation.CellEvaluation` (metrics, per-query ranks, ties, and for
        image corruptions how far the images moved), or the pointing game's metrics dict; None on ranks other than
        0 of a multi-process job. `images`: the cell's (corrupted) test image batches when already built for
        another entry (they depend only on the dataset, seed and cell, not on the model); one process only."""
        from rcit_bench.distributed import get_rank, is_distributed

        if images is not None and is_distributed():
            raise ValueError("CellEvaluator: pre-built `images` cannot be sharded over processes; pass None.")
        lead = get_rank() == 0
        if cell.kind == "pointing_game":
            if not lead:
                return None
            from rcit_bench.localization import pointing_game

            out = pointing_game(self.model, self.dm, corruption=cell.corruption, severity=cell.severity,
                                rate=cell.rate, split=self.split, seed=self.seed)
            return {k: float(v) for k, v in out.items()}
        if cell.kind == "text":
            texts = self._encode("text", self.dm.caption_loader(self.split, perturbation=cell.perturbation,
                                                                level=cell.level))
            reps = self.image_reps(batches=images)
            return evaluate_ranks(self.model, reps, texts, self.c2i, coco_1k=self.coco_1k) if lead else None
        change = None
        if cell.corruption is not None:
            if images is None:
                images = self.dm.image_loader(self.split, corruption=cell.corruption, severity=cell.severity,
                                              rate=cell.rate)
            change = ImageChange(self.dm.image_loader(self.split))
        reps = self.image_reps(cell.corruption, cell.severity, cell.rate, batches=images, change=change)
        texts = self.text_reps()
        moved = None if change is None else change.result()  # a collective under several processes: every rank
        if not lead:
            return None
        out = evaluate_ranks(self.model, reps, texts, self.c2i, coco_1k=self.coco_1k)
        out.image_change = moved
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
        self._clean_source = clean_batches
        self._clean: Any = None
        self.images = self.values = self.unchanged = 0
        self.abs_sum = self.sq_sum = self.max_abs = 0.0

    def wrap(self, batches: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        """Measure `batches` against the clean batches while passing them on. A sharded loader (one rank's part,
        rcit_bench.distributed.shard_loader) is compared with the same shard of the clean loader."""
        from rcit_bench.distributed import shard_loader

        sampler = getattr(batches, "sampler", None)
        clean = self._clean_source
        if hasattr(sampler, "indices") and isinstance(clean, torch.utils.data.DataLoader):
            clean = shard_loader(clean, mode=sampler.mode)[0]
        self._clean = iter(clean)
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
        """The figures over the whole split: under several processes each rank measured its shard and the sums
        (and the maximum) are reduced over ranks, so every rank must call it."""
        from rcit_bench.distributed import all_reduce_numbers

        sums = all_reduce_numbers({"images": self.images, "values": self.values, "abs_sum": self.abs_sum,
                                   "sq_sum": self.sq_sum, "unchanged": self.unchanged})
        self.max_abs = all_reduce_numbers({"max_abs": self.max_abs}, op="max")["max_abs"]
        self.images, self.values, self.unchanged = int(sums["images"]), int(sums["values"]), int(sums["unchanged"])
        self.abs_sum, self.sq_sum = sums["abs_sum"], sums["sq_sum"]
        if not self.values:
            return {"images": 0}
        mse = self.sq_sum / self.values
        mad = self.abs_sum / self.values
        return {"images": self.images, "mean_abs_diff": mad, "max_abs_diff": self.max_abs,
                "psnr_db": None if mse == 0 else 10.0 * math.log10(1.0 / mse),  # None: identical images
                "unchanged_images": self.unchanged, "barely_changed": mad < BARELY_CHANGED_MAD}
