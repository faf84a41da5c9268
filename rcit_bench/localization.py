"""Pointing game: does a word's localization heatmap peak inside the box of the object it names?

Used with methods that expose ``localize_batch`` / ``localize`` (``matchmap``), on the synthetic dataset
whose annotations link caption words to object boxes. A query is one (caption, word, object box); it is
a hit when the argmax pixel of the word's heatmap (upsampled to the image size) lies in the box. Clean
and corrupted images go through the same path, so localization robustness is measured like retrieval.
Two chance baselines over the same queries (always the centre pixel; a uniformly random pixel) tell how
much of the accuracy the boxes' sizes and positions alone would give.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from rcit_bench.models.layers import lengths_to_mask
from rcit_bench.utils import PAD_ID

__all__ = ["pointing_hits", "pointing_chance", "pointing_game"]

log = logging.getLogger(__name__)


def pointing_hits(heatmaps: Tensor, pair: Tensor, rows: Tensor, boxes: Tensor) -> Tensor:
    """Hit or miss for each query, batched.

    heatmaps (P, L, H, W): per (image, caption) pair, one map per token row.
    pair (K,), rows (K,): which pair and which token row each query reads.
    boxes (K, 4): ``[x0, y0, x1, y1]`` in pixels of the heatmap's (= image's) frame, x1/y1 exclusive.
    Returns bool (K,). The peak is the first maximal pixel in row-major order (torch.argmax), and a
    pixel (y, x) covers ``[x, x+1) x [y, y+1)``; it is inside when its centre ``(x+.5, y+.5)`` is.
    """
    if heatmaps.dim() != 4:
        raise ValueError(f"Argument `heatmaps` must have shape (P, L, H, W), but got {tuple(heatmaps.shape)}.")
    w = heatmaps.shape[-1]
    maps = heatmaps[pair.long(), rows.long()].flatten(1)  # (K, H*W)
    flat = maps.argmax(dim=1)  # (K,)
    cy = (flat // w).to(boxes.dtype if boxes.is_floating_point() else torch.float32) + 0.5
    cx = (flat % w).to(cy.dtype) + 0.5
    b = boxes.to(cy.dtype)
    return (cx >= b[:, 0]) & (cx < b[:, 2]) & (cy >= b[:, 1]) & (cy < b[:, 3])


def _inside(centres: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """(K, N) bool: pixel centres (N,) in [lo, hi) of each query (K,), the rule of `pointing_hits`."""
    return (centres[None] >= lo[:, None]) & (centres[None] < hi[:, None])


def pointing_chance(boxes: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Chance baselines of the pointing game for each query, on an (H, W) heatmap grid.

    boxes (K, 4): ``[x0, y0, x1, y1]`` in the heatmap's pixels, as in `pointing_hits` (same inside rule:
    pixel (y, x) is inside when its centre ``(x+.5, y+.5)`` is in the box).
    Returns ``(centre, random)``: bool (K,), whether the centre pixel ``(H // 2, W // 2)`` is inside, and
    float (K,), the probability that a uniformly random pixel is, i.e. (pixels inside the box) / (H W).
    """
    h, w = (int(v) for v in size)
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    b = boxes.to(dtype)
    cx, cy = torch.tensor(w // 2 + 0.5, dtype=dtype), torch.tensor(h // 2 + 0.5, dtype=dtype)
    centre = (cx >= b[:, 0]) & (cx < b[:, 2]) & (cy >= b[:, 1]) & (cy < b[:, 3])
    cols = _inside(torch.arange(w, dtype=dtype) + 0.5, b[:, 0], b[:, 2]).sum(1)  # (K,) columns inside
    rows = _inside(torch.arange(h, dtype=dtype) + 0.5, b[:, 1], b[:, 3]).sum(1)
    return centre, (cols * rows).double() / (h * w)


def _load_annotations(annotations: Any, split: Any) -> list[dict]:
    """Per-image annotation dicts aligned with the split's images (None -> ``split.annotations``)."""
    if annotations is None:
        anns = getattr(split, "annotations", None)
        if anns is None:
            raise ValueError(
                f"Split {getattr(split, 'name', '')!r} has no annotations; the pointing game needs object boxes "
                f"linked to caption words (the synthetic dataset's annotations_synthetic.json). Pass `annotations`."
            )
        return list(anns)
    if isinstance(annotations, (str, Path)):
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"Argument `annotations`: file {str(path)!r} does not exist.")
        annotations = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(annotations, dict):  # the annotations_synthetic.json layout: match images by id
        by_id = {int(a["imgid"]): a for a in annotations.get("images", [])}
        return [by_id.get(int(i), {}) for i in split.image_ids]
    anns = list(annotations)
    if len(anns) != len(split):
        raise ValueError(f"Argument `annotations` has {len(anns)} entries but the split has {len(split)} images.")
    return anns


def _queries(split: Any, anns: list[dict]) -> dict[int, list[tuple[int, int, list[float]]]]:
    """image index -> [(caption index, token position, box)] for every word that names an object."""
    out: dict[int, list[tuple[int, int, list[float]]]] = {}
    for i, ann in enumerate(anns):
        objects = ann.get("objects") or []
        cap_anns = ann.get("captions") or []
        for k, cap in enumerate(split.image_captions(i)):
            if k >= len(cap_anns):
                break
            for pos, obj in cap_anns[k].get("word_objects", []):
                out.setdefault(i, []).append((cap, int(pos), [float(v) for v in objects[int(obj)]["box"]]))
    return out


def _image_batches(data: Any, split_name: str, split: Any, corruption: str | None, severity: int | None,
                   rate: float | None, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(images (B, 3, H, W), image_index (B,)) at the dataset's resolution, corrupted when asked."""
    if hasattr(data, "image_loader"):
        for batch in data.image_loader(split_name, corruption=corruption, severity=severity, rate=rate):
            yield batch["images"], torch.as_tensor(batch["image_index"])
        return
    for start in range(0, len(split), batch_size):
        idx = list(range(start, min(len(split), start + batch_size)))
        images = torch.stack([split.load_image(i) for i in idx])
        if corruption is not None:
            from rcit_bench.data.corruptions import corrupt

            images = corrupt(images, corruption, severity=severity, rate=rate, seed=seed,
                             image_ids=[split.image_ids[i] for i in idx])
        yield images, torch.tensor(idx)


@torch.inference_mode()
def pointing_game(
    model: Any,
    data: Any,
    annotations: Any = None,
    corruption: str | None = None,
    severity: int | None = None,
    rate: float | None = None,
    *,
    split: str = "test",
    vocab: Any = None,
    pairs_per_batch: int = 64,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Pointing-game accuracy of `model` on (optionally corrupted) images, in percent over ``n`` queries:
    ``{accuracy, centre_accuracy, random_accuracy, n}``.

    centre_accuracy: the hit rate of always pointing at the centre pixel ``(H // 2, W // 2)`` of the heatmap
      grid; random_accuracy: the expected hit rate of a uniformly random pixel, the mean over queries of
      (pixels inside the box) / (H W). Both use the same queries, boxes and pixel-inside rule as the model's
      hits (see `pointing_hits`, `pointing_chance`), so accuracy is only meaningful above them. They do not
      depend on the corruption.

    data: a RetrievalDataModule (its ``image_loader`` applies the corruption, seeded per image like the
      retrieval evaluation, and its ``vocab`` encodes the captions) or a CaptionSplit (then pass `vocab`;
      corruption via ``rcit_bench.data.corruptions.corrupt`` with `seed` and the split's image ids).
    annotations: None (the split's own), a path to ``annotations_synthetic.json``, its parsed dict, or a
      list of per-image dicts ``{objects: [{box: [x0, y0, x1, y1]}], captions: [{word_objects: [[pos, obj]]}]}``
      where ``pos`` indexes the caption's word tokens.
    The model must have ``localize_batch(images, tokens, lengths) -> (P, L, H, W)``; captions are encoded
    with ``<start>`` first, so word ``pos`` reads heatmap row ``pos + 1``, and padded with the vocabulary's
    ``pad_id`` (:data:`rcit_bench.utils.PAD_ID` when it has none).
    """
    if not hasattr(model, "localize_batch"):
        raise ValueError(
            f"Argument `model` ({type(model).__name__}) has no `localize_batch`; the pointing game needs a "
            f"method that yields word heatmaps (e.g. 'matchmap')."
        )
    cap_split = data.split(split) if hasattr(data, "image_loader") else data
    vocab = vocab if vocab is not None else getattr(data, "vocab", None)
    if vocab is None:
        raise ValueError("Argument `vocab` is required when `data` is a CaptionSplit (it encodes the captions).")
    pad_id = int(getattr(vocab, "pad_id", PAD_ID))
    queries = _queries(cap_split, _load_annotations(annotations, cap_split))
    model.eval()
    device = next(model.parameters()).device
    hits = total = centre_hits = 0
    random_hits = 0.0
    for images, image_index in _image_batches(data, split, cap_split, corruption, severity, rate, batch_size, seed):
        pairs: list[tuple[int, int]] = []  # (row in images, caption index)
        q_pair, q_row, q_box = [], [], []
        for r, i in enumerate(image_index.tolist()):
            by_cap: dict[int, int] = {}
            for cap, pos, box in queries.get(int(i), []):
                if cap not in by_cap:
                    by_cap[cap] = len(pairs)
                    pairs.append((r, cap))
                q_pair.append(by_cap[cap])
                q_row.append(pos + 1)
                q_box.append(box)
        if not pairs:
            continue
        q_pair_t, q_row_t, q_box_t = torch.tensor(q_pair), torch.tensor(q_row), torch.tensor(q_box)
        for start in range(0, len(pairs), pairs_per_batch):
            chunk = pairs[start:start + pairs_per_batch]
            ids = [vocab.encode(cap_split.tokens[c]) for _, c in chunk]
            for (_, c), seq in zip(chunk, ids):
                if len(seq) != len(cap_split.tokens[c]) + 2:
                    raise ValueError(
                        "The pointing game needs a word-level vocabulary (one id per word plus <start>/<end>); "
                        f"caption {c} has {len(cap_split.tokens[c])} words but {len(seq)} ids."
                    )
            lengths = torch.tensor([len(s) for s in ids])
            tokens = torch.full((len(ids), int(lengths.max())), pad_id, dtype=torch.long)
            tokens[lengths_to_mask(lengths, tokens.shape[1])] = torch.tensor([t for s in ids for t in s])  # row-major
            rows = torch.tensor([r for r, _ in chunk])
            heat = model.localize_batch(images[rows].to(device), tokens.to(device), lengths.to(device))
            sel = (q_pair_t >= start) & (q_pair_t < start + len(chunk))
            h = pointing_hits(heat.float().cpu(), q_pair_t[sel] - start, q_row_t[sel], q_box_t[sel])
            centre, random = pointing_chance(q_box_t[sel], tuple(heat.shape[-2:]))
            hits += int(h.sum())
            centre_hits += int(centre.sum())
            random_hits += float(random.sum())
            total += int(sel.sum())
    if total == 0:
        log.warning("pointing game: no annotated words found in split %r", split)

    def pct(v: float) -> float:
        return 100.0 * v / total if total else float("nan")

    return {"accuracy": pct(hits), "centre_accuracy": pct(centre_hits), "random_accuracy": pct(random_hits),
            "n": total}
