"""The one evaluation path for every method: encode images, encode captions, similarity, metrics.

Why separate image and text encoding: text representations do not depend on the image corruption,
so the runner encodes the captions once per model (:func:`encode_texts`) and re-encodes only the
images for each cell of the corruption grid (:func:`evaluate`).

Representations are dicts of tensors whose first dim is the item (see rcit_bench.models.base); they
stay on the model's device. Each returned dict also carries the item order it was sorted by
(``image_index`` / ``caption_index``), which :func:`evaluate` uses to line up ``caption_to_image``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["encode_images", "encode_texts", "cat_reps", "evaluate", "evaluate_ranks", "CellEvaluation",
           "similarity_matrix"]

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
