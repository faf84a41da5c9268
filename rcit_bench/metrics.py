"""Retrieval metrics (R@K hit rate, rsum, ranks) and robustness summaries (relative robustness, MMI, mCE).

The ranking code is our own, not torchmetrics': ``RetrievalRecall`` is true recall (not the paper metric), some
torchmetrics versions drop non-positive scores, and at COCO 5K x 25K it needs tens of seconds and ~10 GB. Here the
score of the positive is gathered once and the items scoring *strictly* higher are counted, a chunk of rows at a
time, so memory stays bounded by ``chunk_size * N_cap`` booleans.

Tie policy (deterministic, independent of item order): ``rank = 1 + number of items with a strictly greater
score``. Items tied with the positive do not push it down (optimistic ranking).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)
RSUM_MAX = 600.0

METRIC_INFO: dict[str, dict[str, object]] = {
    **{f"{d}_r{k}": {"higher_is_better": True, "unit": "percent"} for d in ("i2t", "t2i") for k in RECALL_KS},
    "rsum": {"higher_is_better": True, "unit": "sum of six recalls in percent (max 600)"},
    "i2t_medr": {"higher_is_better": False, "unit": "rank (1-based)"},
    "t2i_medr": {"higher_is_better": False, "unit": "rank (1-based)"},
    "i2t_meanr": {"higher_is_better": False, "unit": "rank (1-based)"},
    "t2i_meanr": {"higher_is_better": False, "unit": "rank (1-based)"},
    "relative_robustness": {"higher_is_better": True, "unit": "fraction (corrupted / clean rsum)"},
    "mmi": {"higher_is_better": False, "unit": "fraction (1 - corrupted / clean rsum)"},
    "mce": {"higher_is_better": False, "unit": "percent of the baseline's error"},
}
"""Sort order (and unit) of every metric key this module produces, for leaderboards."""

METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
    "rsum", "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr",
)  # fmt: skip

_DEFAULT_CHUNK_ELEMENTS = 1 << 22  # ~4M scores per chunk: 4 MB of bools, fast and cache friendly


def _validate(sims: Tensor, caption_to_image: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Check shapes/dtypes/ranges; return (sims, caption_to_image as int64 on sims' device)."""
    if not isinstance(sims, Tensor):
        raise ValueError(f"Argument `sims` must be a torch.Tensor of shape (N_img, N_cap), got {type(sims).__name__}.")
    if sims.ndim != 2:
        raise ValueError(f"Argument `sims` must be 2-D (N_img, N_cap), but got shape {tuple(sims.shape)}.")
    if not sims.is_floating_point():
        raise ValueError(f"Argument `sims` must be a floating point tensor, but got dtype {sims.dtype}.")
    n_img, n_cap = sims.shape
    if n_img == 0 or n_cap == 0:
        raise ValueError(f"Argument `sims` must be non-empty, but got shape {tuple(sims.shape)}.")
    c2i = torch.as_tensor(caption_to_image)
    if c2i.ndim != 1 or c2i.numel() != n_cap:
        raise ValueError(
            f"Argument `caption_to_image` must be 1-D with one entry per caption (N_cap={n_cap}, the number of "
            f"columns of `sims`), but got shape {tuple(c2i.shape)}."
        )
    if c2i.is_floating_point() or c2i.is_complex() or c2i.dtype == torch.bool:
        raise ValueError(f"Argument `caption_to_image` must hold integer image indices, but got dtype {c2i.dtype}.")
    c2i = c2i.to(device=sims.device, dtype=torch.long)
    lo, hi = int(c2i.min()), int(c2i.max())
    if lo < 0 or hi >= n_img:
        raise ValueError(
            f"Argument `caption_to_image` must hold image indices in [0, {n_img}) (N_img = rows of `sims`), "
            f"but got values in [{lo}, {hi}]."
        )
    counts = torch.bincount(c2i, minlength=n_img)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(
            f"Every image needs at least one caption, but {int((counts == 0).sum())} image(s) have none in "
            f"`caption_to_image` (first: {missing}). Drop those rows from `sims` or fix the index."
        )
    return sims, c2i


def _floor_median(ranks: Tensor) -> float:
    """floor of the median (even count: mean of the two middle values), as in the VSE++ evaluation."""
    r = torch.sort(ranks.double()).values
    n = r.numel()
    med = r[n // 2] if n % 2 else (r[n // 2 - 1] + r[n // 2]) / 2
    return float(math.floor(float(med)))


def compute_ranks(
    sims: Tensor, caption_to_image: Tensor | Sequence[int], *, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """1-based ranks ``(i2t (N_img,), t2i (N_cap,))`` with the strictly-greater tie policy (module docstring).

    i2t: an image's rank is the best rank among its captions = 1 + #captions scoring strictly above its best
    caption. t2i: a caption's rank is 1 + #images scoring strictly above its own image.
    """
    sims, c2i = _validate(sims, caption_to_image)
    n_img, n_cap = sims.shape
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_CHUNK_ELEMENTS // n_cap)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"Argument `chunk_size` must be a positive int (rows per chunk) or None, got {chunk_size!r}.")
    cap_idx = torch.arange(n_cap, device=sims.device)
    pos_t2i = sims[c2i, cap_idx]  # (N_cap,) score of each caption's own image
    # (N_img,) best score among each image's captions
    pos_i2t = torch.full((n_img,), -math.inf, dtype=sims.dtype, device=sims.device)
    pos_i2t = pos_i2t.scatter_reduce(0, c2i, pos_t2i, reduce="amax", include_self=True)
    above_i2t = torch.empty(n_img, dtype=torch.int32, device=sims.device)
    above_t2i = torch.zeros(n_cap, dtype=torch.int32, device=sims.device)
    for start in range(0, n_img, chunk_size):
        block = sims[start : start + chunk_size]  # (chunk, N_cap), a view
        # A NaN makes the block's sum NaN: a cheap screen before the exact (slower) check.
        if not bool(torch.isfinite(block.sum())) and bool(torch.isnan(block).any()):
            raise ValueError("Argument `sims` contains NaN; ranks would be meaningless.")
        # int32 counts: reducing bools to int32 is ~5x faster than the default int64 (N <= 2**31 items)
        above_i2t[start : start + block.shape[0]] = (block > pos_i2t[start : start + chunk_size, None]).sum(
            1, dtype=torch.int32
        )
        above_t2i += (block > pos_t2i[None, :]).sum(0, dtype=torch.int32)
    return above_i2t.long() + 1, above_t2i.long() + 1


def retrieval_metrics(
    sims: Tensor, caption_to_image: Tensor | Sequence[int], *, chunk_size: int | None = None
) -> dict[str, float]:
    """R@1/5/10 hit rates (percent) in both directions, rsum, and median/mean ranks from a similarity matrix.

    Args:
        sims: (N_img, N_cap) float scores, higher = more similar.
        caption_to_image: (N_cap,) int image index of each caption, any order, any number (>= 1) per image.
        chunk_size: rows of ``sims`` processed at once (memory ~ chunk_size * N_cap bytes); default ~4M scores.

    Returns keys ``METRIC_KEYS``. R@K counts a query when at least one correct item ranks within K. Ties: rank =
    1 + number of strictly greater scores. ``*_medr`` = floor(median of 1-based ranks); ``*_meanr`` = floor(mean
    of 1-based ranks), as DESIGN.md section 3 specifies.

    >>> sims = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.8, 0.7]])
    >>> m = retrieval_metrics(sims, torch.tensor([0, 1, 1]))
    >>> m["i2t_r1"], m["t2i_r1"], m["rsum"]
    (100.0, 100.0, 600.0)
    """
    r_i2t, r_t2i = compute_ranks(sims, caption_to_image, chunk_size=chunk_size)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", r_i2t), ("t2i", r_t2i)):
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = 100.0 * float((ranks <= k).double().mean())
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    for name, ranks in (("i2t", r_i2t), ("t2i", r_t2i)):
        out[f"{name}_medr"] = _floor_median(ranks)
        out[f"{name}_meanr"] = float(math.floor(float(ranks.double().mean())))
    return {k: out[k] for k in METRIC_KEYS}


def coco_1k_metrics(
    sims: Tensor,
    caption_to_image: Tensor | Sequence[int],
    folds: int = 5,
    *,
    fold_size: int = 1000,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """COCO "1K" protocol: the mean of :func:`retrieval_metrics` over ``folds`` blocks of ``fold_size`` consecutive
    images, each scored against only its own images' captions (selected through ``caption_to_image``).

    Ranks in the result are means of per-fold floored ranks (so they may be fractional), as in VSE++.
    """
    sims, c2i = _validate(sims, caption_to_image)
    for arg, val in (("folds", folds), ("fold_size", fold_size)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"Argument `{arg}` must be a positive int, but got {val!r}.")
    n_img = sims.shape[0]
    if n_img != folds * fold_size:
        raise ValueError(
            f"coco_1k_metrics needs N_img == folds * fold_size = {folds} * {fold_size} = {folds * fold_size} "
            f"images, but `sims` has {n_img} rows. Pass the 5K test split, or set `folds`/`fold_size`."
        )
    per_fold = []
    for f in range(folds):
        lo, hi = f * fold_size, (f + 1) * fold_size
        cap_sel = torch.nonzero((c2i >= lo) & (c2i < hi)).flatten()  # (n_cap_fold,) in caption order
        per_fold.append(retrieval_metrics(sims[lo:hi][:, cap_sel], c2i[cap_sel] - lo, chunk_size=chunk_size))
    return {k: sum(m[k] for m in per_fold) / folds for k in METRIC_KEYS}


def _as_floats(arg: str, values: float | Sequence[float] | Tensor) -> list[float]:
    vals = torch.as_tensor(values, dtype=torch.float64).flatten().tolist()
    if not vals:
        raise ValueError(f"Argument `{arg}` must hold at least one rsum, but got an empty sequence.")
    for v in vals:
        if not (0.0 <= v <= RSUM_MAX):
            raise ValueError(f"Argument `{arg}` must hold rsums in [0, {RSUM_MAX:g}], but got {v!r}.")
    return vals


def _check_clean(clean_rsum: float) -> float:
    clean = float(clean_rsum)
    if not (0.0 < clean <= RSUM_MAX):
        raise ValueError(f"Argument `clean_rsum` must be in (0, {RSUM_MAX:g}], but got {clean_rsum!r}.")
    return clean


def relative_robustness(clean_rsum: float, corrupted_rsums: float | Sequence[float] | Tensor) -> float:
    """Mean corrupted rsum / clean rsum (a fraction; 1.0 = no loss). Accepts one mean value or a sequence."""
    vals = _as_floats("corrupted_rsums", corrupted_rsums)
    return (sum(vals) / len(vals)) / _check_clean(clean_rsum)


def mmi(clean_rsum: float, corrupted_rsums: float | Sequence[float] | Tensor) -> float:
    """Multimodal impact score (Qiu et al. 2022): ``1 - mean(corrupted rsum) / clean rsum`` (a fraction; lower is
    better)."""
    return 1.0 - relative_robustness(clean_rsum, corrupted_rsums)


def mce(
    model_rsums: Mapping[str, Sequence[float]], baseline_rsums: Mapping[str, Sequence[float]]
) -> float:
    """mCE-style error in percent: per corruption ``sum_s (600 - rsum) / sum_s (600 - baseline rsum)`` over its
    severities, averaged over corruptions, x100. 100 = as bad as the baseline (VSE++ in this suite)."""
    if not model_rsums:
        raise ValueError("Argument `model_rsums` must map at least one corruption to its per-severity rsums.")
    missing = sorted(set(model_rsums) - set(baseline_rsums))
    if missing:
        raise ValueError(
            f"Argument `baseline_rsums` lacks corruption(s) {missing} that `model_rsums` has; "
            f"baseline has {sorted(baseline_rsums)}."
        )
    ratios = []
    for name, vals in model_rsums.items():
        m = _as_floats(f"model_rsums[{name!r}]", vals)
        b = _as_floats(f"baseline_rsums[{name!r}]", baseline_rsums[name])
        if len(m) != len(b):
            raise ValueError(
                f"Corruption {name!r}: `model_rsums` has {len(m)} severities but `baseline_rsums` has {len(b)}; "
                "they must match one to one."
            )
        base_err = sum(RSUM_MAX - v for v in b)
        if base_err <= 0:
            raise ValueError(f"Corruption {name!r}: the baseline's error is 0 (rsum 600 everywhere); mCE undefined.")
        ratios.append(sum(RSUM_MAX - v for v in m) / base_err)
    return 100.0 * sum(ratios) / len(ratios)
