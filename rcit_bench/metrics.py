"""Retrieval metrics (R@K hit rate, rsum, ranks), bootstrap intervals, and robustness summaries (relative
robustness, MMI, mCE).

The ranking code is our own, not torchmetrics': ``RetrievalRecall`` is true recall (not the paper metric), some
torchmetrics versions drop non-positive scores, and at COCO 5K x 25K it needs tens of seconds and ~10 GB. Here the
score of the positive is gathered once and the items scoring *at least as high* are counted, a chunk of rows at a
time, so memory stays bounded by ``chunk_size * N_cap`` booleans.

Tie policy (deterministic, independent of item order): ties count against the model.

- i2t: rank of an image = 1 + number of non-matching captions (captions of other images) scoring >= the score of
  the image's best matching caption. Other captions of the same image never count.
- t2i: rank of a caption = 1 + number of other images scoring >= its own image's score.

A scorer that cannot tell items apart (constant scores, all-zero embeddings) thus ranks every query last
(i2t: ``N_cap - n_captions_of_image + 1``, t2i: ``N_img``) instead of first: under the earlier optimistic rule,
which counted only higher scores, ``retrieval_metrics(torch.zeros(100, 500), torch.arange(500) // 5)`` had RSUM 600.
``compute_ranks(..., return_ties=True)`` also reports which queries had a non-matching item tied exactly with
their positive, so a leaderboard can say how much ties matter.

Bootstrap intervals resample test *images* (a cluster bootstrap: an image brings all its captions, which are not
independent queries) while the gallery stays the whole split, so ranks are computed once and only re-weighted.
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

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

BOOTSTRAP_KEYS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS) + ("rsum",)
"""Keys that :func:`bootstrap_intervals` and :func:`paired_bootstrap` resample (ranks' medians are too coarse)."""

_DEFAULT_CHUNK_ELEMENTS = 1 << 22  # ~4M scores per chunk: 4 MB of bools, fast and cache friendly


def _check_caption_to_image(
    caption_to_image: Tensor | Sequence[int], n_img: int, n_cap: int, device: torch.device, *,
    n_cap_from: str, n_img_from: str, fix: str,
) -> Tensor:
    """Check the caption -> image index against N_img / N_cap (named by where they come from); int64 on device."""
    c2i = torch.as_tensor(caption_to_image)
    if c2i.ndim != 1 or c2i.numel() != n_cap:
        raise ValueError(
            f"Argument `caption_to_image` must be 1-D with one entry per caption (N_cap={n_cap}, {n_cap_from}), "
            f"but got shape {tuple(c2i.shape)}."
        )
    if c2i.is_floating_point() or c2i.is_complex() or c2i.dtype == torch.bool:
        raise ValueError(f"Argument `caption_to_image` must hold integer image indices, but got dtype {c2i.dtype}.")
    c2i = c2i.to(device=device, dtype=torch.long)
    lo, hi = int(c2i.min()), int(c2i.max())
    if lo < 0 or hi >= n_img:
        raise ValueError(
            f"Argument `caption_to_image` must hold image indices in [0, {n_img}) (N_img = {n_img_from}), "
            f"but got values in [{lo}, {hi}]."
        )
    counts = torch.bincount(c2i, minlength=n_img)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(
            f"Every image needs at least one caption, but {int((counts == 0).sum())} image(s) have none in "
            f"`caption_to_image` (first: {missing}). {fix}"
        )
    return c2i


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
    c2i = _check_caption_to_image(
        caption_to_image, n_img, n_cap, sims.device, n_cap_from="the number of columns of `sims`",
        n_img_from="rows of `sims`", fix="Drop those rows from `sims` or fix the index.",
    )
    return sims, c2i


def _floor_median(ranks: Tensor) -> float:
    """floor of the median (even count: mean of the two middle values), as in the VSE++ evaluation."""
    r = torch.sort(ranks.double()).values
    n = r.numel()
    med = r[n // 2] if n % 2 else (r[n // 2 - 1] + r[n // 2]) / 2
    return float(math.floor(float(med)))


def compute_ranks(
    sims: Tensor,
    caption_to_image: Tensor | Sequence[int],
    *,
    chunk_size: int | None = None,
    return_ties: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """1-based ranks ``(i2t (N_img,), t2i (N_cap,))`` with ties counted against the model (module docstring).

    i2t: 1 + #captions of other images scoring >= the image's best caption. t2i: 1 + #other images scoring >=
    the caption's own image. With ``return_ties=True`` also returns bool flags ``(tie_i2t (N_img,), tie_t2i
    (N_cap,))``: True where at least one non-matching item scores exactly the positive's score (one more
    comparison per block; without it the cost is that of the ranks alone).
    """
    sims, c2i = _validate(sims, caption_to_image)
    n_img, n_cap = sims.shape
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_CHUNK_ELEMENTS // n_cap)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"Argument `chunk_size` must be a positive int (rows per chunk) or None, got {chunk_size!r}.")
    if not isinstance(return_ties, bool):
        raise ValueError(f"Argument `return_ties` must be a bool, but got {return_ties!r}.")
    cap_idx = torch.arange(n_cap, device=sims.device)
    pos_t2i = sims[c2i, cap_idx]  # (N_cap,) score of each caption's own image
    # (N_img,) best score among each image's captions
    pos_i2t = torch.full((n_img,), -math.inf, dtype=sims.dtype, device=sims.device)
    pos_i2t = pos_i2t.scatter_reduce(0, c2i, pos_t2i, reduce="amax", include_self=True)
    ge_i2t = torch.empty(n_img, dtype=torch.int32, device=sims.device)
    ge_t2i = torch.zeros(n_cap, dtype=torch.int32, device=sims.device)
    if return_ties:
        eq_i2t = torch.empty(n_img, dtype=torch.int32, device=sims.device)
        eq_t2i = torch.zeros(n_cap, dtype=torch.int32, device=sims.device)
    for start in range(0, n_img, chunk_size):
        block = sims[start : start + chunk_size]  # (chunk, N_cap), a view
        stop = start + block.shape[0]
        # A NaN makes the block's sum NaN: a cheap screen before the exact (slower) check.
        if not bool(torch.isfinite(block.sum())) and bool(torch.isnan(block).any()):
            raise ValueError("Argument `sims` contains NaN; ranks would be meaningless.")
        best = pos_i2t[start:stop, None]
        # int32 counts: reducing bools to int32 is ~5x faster than the default int64 (N <= 2**31 items)
        ge_i2t[start:stop] = (block >= best).sum(1, dtype=torch.int32)
        ge_t2i += (block >= pos_t2i[None, :]).sum(0, dtype=torch.int32)
        if return_ties:
            eq_i2t[start:stop] = (block == best).sum(1, dtype=torch.int32)
            eq_t2i += (block == pos_t2i[None, :]).sum(0, dtype=torch.int32)
    # The image's own captions counted above are those scoring >= its best one, i.e. exactly those == it (>= 1).
    own_at_best = torch.bincount(c2i[pos_t2i == pos_i2t[c2i]], minlength=n_img)  # (N_img,) int64
    r_i2t = ge_i2t.long() - own_at_best + 1
    r_t2i = ge_t2i.long()  # the own image scores >= itself: counted once, it is the "1 +"
    if not return_ties:
        return r_i2t, r_t2i
    return r_i2t, r_t2i, eq_i2t.long() > own_at_best, eq_t2i > 1


def _check_ranks(arg: str, ranks: Tensor | Sequence[int]) -> Tensor:
    """Check 1-based ranks (1-D, non-empty, integers >= 1); return them as int64."""
    r = torch.as_tensor(ranks)
    if r.ndim != 1 or r.numel() == 0:
        raise ValueError(f"Argument `{arg}` must be a non-empty 1-D tensor of ranks, but got shape {tuple(r.shape)}.")
    if r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
        raise ValueError(
            f"Argument `{arg}` must hold integer 1-based ranks (as compute_ranks returns), but got dtype {r.dtype}."
        )
    lo = int(r.min())
    if lo < 1:
        raise ValueError(f"Argument `{arg}` must hold 1-based ranks (>= 1), but its smallest value is {lo}.")
    return r.long()


def metrics_from_ranks(r_i2t: Tensor | Sequence[int], r_t2i: Tensor | Sequence[int]) -> dict[str, float]:
    """The ``METRIC_KEYS`` dict from 1-based ranks (as :func:`compute_ranks` returns them), so stored ranks can
    be re-scored without the similarity matrix.

    R@K (percent) counts a query whose rank is <= K. ``*_medr`` = floor(median rank) as in VSE++; ``*_meanr`` =
    the mean rank, unrounded (flooring hid differences of up to a whole rank between models).
    """
    ranks = {"i2t": _check_ranks("r_i2t", r_i2t), "t2i": _check_ranks("r_t2i", r_t2i)}
    out: dict[str, float] = {}
    for name, r in ranks.items():
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = 100.0 * float((r <= k).double().mean())
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    for name, r in ranks.items():
        out[f"{name}_medr"] = _floor_median(r)
        out[f"{name}_meanr"] = float(r.double().mean())
    return {k: out[k] for k in METRIC_KEYS}


def retrieval_metrics(
    sims: Tensor, caption_to_image: Tensor | Sequence[int], *, chunk_size: int | None = None
) -> dict[str, float]:
    """R@1/5/10 hit rates (percent) in both directions, rsum, and median/mean ranks from a similarity matrix.

    Args:
        sims: (N_img, N_cap) float scores, higher = more similar.
        caption_to_image: (N_cap,) int image index of each caption, any order, any number (>= 1) per image.
        chunk_size: rows of ``sims`` processed at once (memory ~ chunk_size * N_cap bytes); default ~4M scores.

    Returns keys ``METRIC_KEYS``. R@K counts a query when at least one correct item ranks within K. Ties count
    against the model: rank = 1 + number of non-matching items scoring >= the positive (module docstring).
    ``*_medr`` = floor(median of 1-based ranks); ``*_meanr`` = mean of 1-based ranks, unrounded.

    >>> sims = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.8, 0.7]])
    >>> m = retrieval_metrics(sims, torch.tensor([0, 1, 1]))
    >>> m["i2t_r1"], m["t2i_r1"], m["rsum"]
    (100.0, 100.0, 600.0)
    >>> flat = retrieval_metrics(torch.zeros(100, 500), torch.arange(500) // 5)  # all tied: every query ranks last
    >>> flat["rsum"], flat["i2t_medr"], flat["t2i_meanr"]
    (0.0, 496.0, 100.0)
    """
    r_i2t, r_t2i = compute_ranks(sims, caption_to_image, chunk_size=chunk_size)
    return metrics_from_ranks(r_i2t, r_t2i)


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

    Ranks in the result are means of per-fold values (floored medians, unrounded means), so they may be
    fractional, as in VSE++.
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


def _check_bootstrap_args(n_resamples: int, confidence: float, seed: int) -> None:
    if not isinstance(n_resamples, int) or isinstance(n_resamples, bool) or n_resamples < 1:
        raise ValueError(f"Argument `n_resamples` must be a positive int, but got {n_resamples!r}.")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(
            f"Argument `confidence` must be a number in (0, 1), e.g. 0.95 for a 95% interval, but got {confidence!r}."
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"Argument `seed` must be an int, but got {seed!r}.")


def _check_rank_pair(
    arg: str, ranks: tuple[Tensor, Tensor] | Sequence[Tensor], caption_to_image: Tensor | Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Check ``(r_i2t, r_t2i)`` against the caption index; return (r_i2t, r_t2i, c2i) int64 on r_i2t's device."""
    if isinstance(ranks, Tensor) or not isinstance(ranks, Sequence) or len(ranks) != 2:
        raise ValueError(f"Argument `{arg}` must be a pair (r_i2t, r_t2i) as compute_ranks returns, got {ranks!r}.")
    i2t_name, t2i_name = ("r_i2t", "r_t2i") if arg == "ranks" else (f"{arg}[0]", f"{arg}[1]")
    r_i2t = _check_ranks(i2t_name, ranks[0])
    r_t2i = _check_ranks(t2i_name, ranks[1]).to(r_i2t.device)
    c2i = _check_caption_to_image(
        caption_to_image, r_i2t.numel(), r_t2i.numel(), r_i2t.device, n_cap_from=f"the length of `{t2i_name}`",
        n_img_from=f"the length of `{i2t_name}`", fix=f"Every image of `{i2t_name}` must have captions in the cell.",
    )
    return r_i2t, r_t2i, c2i


def _per_image_hits(r_i2t: Tensor, r_t2i: Tensor, c2i: Tensor) -> Tensor:
    """(N_img, 7) float64 per image: its i2t hit at K = 1, 5, 10 (0/1), how many of its captions hit at each K
    in t2i, and its caption count. A resample's recalls are ratios of these rows summed with multiplicities."""
    ks = torch.tensor(RECALL_KS, device=r_i2t.device)
    cap_rows = torch.cat([(r_t2i[:, None] <= ks).double(), torch.ones_like(r_t2i, dtype=torch.float64)[:, None]], 1)
    per_image = torch.zeros(r_i2t.numel(), 4, dtype=torch.float64, device=r_i2t.device).index_add_(0, c2i, cap_rows)
    return torch.cat([(r_i2t[:, None] <= ks).double(), per_image], 1)


def _draw_blocks(n_img: int, n_resamples: int, seed: int) -> Iterator[Tensor]:
    """The resampled images, in (rows, N_img) int64 blocks of draws with replacement from one CPU generator seeded
    by ``seed`` (the same on every device); blocks of ~4M draws bound the memory."""
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, _DEFAULT_CHUNK_ELEMENTS // n_img)
    for start in range(0, n_resamples, rows):
        yield torch.randint(0, n_img, (min(rows, n_resamples - start), n_img), generator=gen)


def _multiplicities(draws: Tensor, n_img: int) -> Tensor:
    """(rows, N_img) float64: how many times each image was drawn in each resample (one bincount for all rows)."""
    rows = draws.shape[0]
    flat = (draws + torch.arange(rows)[:, None] * n_img).flatten()
    return torch.bincount(flat, minlength=rows * n_img).view(rows, n_img).double()


def _resampled_values(hits: Tensor, weights: Tensor) -> Tensor:
    """(rows, 7) ``BOOTSTRAP_KEYS`` values per resample from ``_per_image_hits`` rows and (rows, N_img)
    multiplicities: an image drawn k times counts k times as an i2t query and its captions k times as t2i ones."""
    s = weights @ hits  # (rows, 7)
    i2t = 100.0 * s[:, 0:3] / weights.sum(1, keepdim=True)  # the weights of a row sum to N_img
    t2i = 100.0 * s[:, 3:6] / s[:, 6:7]
    return torch.cat([i2t, t2i, (i2t.sum(1) + t2i.sum(1))[:, None]], 1)


def _bootstrap_values(hit_sets: Sequence[Tensor], n_resamples: int, seed: int) -> list[Tensor]:
    """(n_resamples, 7) values for each element of ``hit_sets``, all on the SAME resampled images."""
    n_img = hit_sets[0].shape[0]
    out: list[list[Tensor]] = [[] for _ in hit_sets]
    for draws in _draw_blocks(n_img, n_resamples, seed):
        weights = _multiplicities(draws, n_img).to(hit_sets[0].device)
        for acc, hits in zip(out, hit_sets):
            acc.append(_resampled_values(hits, weights))
    return [torch.cat(acc) for acc in out]


def _percentile_interval(values: Tensor, confidence: float) -> Tensor:
    """(2, ...) lower / upper percentile (linear interpolation) of ``values`` over dim 0."""
    alpha = (1.0 - confidence) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=values.dtype, device=values.device)
    return torch.quantile(values, q, dim=0)


def bootstrap_from_ranks(
    r_i2t: Tensor | Sequence[int],
    r_t2i: Tensor | Sequence[int],
    caption_to_image: Tensor | Sequence[int],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals ``{key: (lo, hi)}`` for ``BOOTSTRAP_KEYS`` from stored 1-based ranks.

    Image-level cluster bootstrap: each resample draws N_img test images with replacement; a drawn image is an
    i2t query and brings all its captions as t2i queries (drawn k times = weight k). The gallery stays the whole
    split, so the ranks are only re-weighted, never recomputed. Same ``seed`` -> same intervals.
    """
    _check_bootstrap_args(n_resamples, confidence, seed)
    r_i2t, r_t2i, c2i = _check_rank_pair("ranks", (r_i2t, r_t2i), caption_to_image)
    (values,) = _bootstrap_values([_per_image_hits(r_i2t, r_t2i, c2i)], n_resamples, seed)
    bounds = _percentile_interval(values, confidence).tolist()  # (2, 7)
    return {k: (bounds[0][j], bounds[1][j]) for j, k in enumerate(BOOTSTRAP_KEYS)}


def bootstrap_samples(
    r_i2t: Tensor | Sequence[int],
    r_t2i: Tensor | Sequence[int],
    caption_to_image: Tensor | Sequence[int],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The per-resample values ``{key: (n_resamples,) float64}`` behind :func:`bootstrap_from_ranks`.

    The resampled images depend only on (N_img, ``n_resamples``, ``seed``), so samples of several cells or models
    on the same test split are drawn on the SAME images: their means and differences are paired bootstraps
    (the leaderboard averages them over corruption cells and seeds, and subtracts two entries)."""
    _check_bootstrap_args(n_resamples, 0.5, seed)
    r_i2t, r_t2i, c2i = _check_rank_pair("ranks", (r_i2t, r_t2i), caption_to_image)
    (values,) = _bootstrap_values([_per_image_hits(r_i2t, r_t2i, c2i)], n_resamples, seed)
    return {k: values[:, j] for j, k in enumerate(BOOTSTRAP_KEYS)}


def bootstrap_intervals(
    sims: Tensor,
    caption_to_image: Tensor | Sequence[int],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """:func:`bootstrap_from_ranks` on the ranks of ``sims`` (computed once with :func:`compute_ranks`)."""
    _check_bootstrap_args(n_resamples, confidence, seed)
    r_i2t, r_t2i = compute_ranks(sims, caption_to_image)
    return bootstrap_from_ranks(
        r_i2t, r_t2i, caption_to_image, n_resamples=n_resamples, confidence=confidence, seed=seed
    )


def paired_bootstrap(
    ranks_a: tuple[Tensor, Tensor] | Sequence[Tensor],
    ranks_b: tuple[Tensor, Tensor] | Sequence[Tensor],
    caption_to_image: Tensor | Sequence[int],
    *,
    key: str = "rsum",
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | bool]:
    """Paired bootstrap of the difference ``a - b`` of one metric between two models on the SAME cell.

    ``ranks_a`` / ``ranks_b`` are ``(r_i2t, r_t2i)`` of each model over the same images and captions; both are
    re-weighted by the same resampled images (as :func:`bootstrap_from_ranks`), which cancels the variation the
    two share. Returns ``{"diff": point estimate, "lo", "hi": percentile interval, "significant": the interval
    excludes 0}``. ``key`` is one of ``BOOTSTRAP_KEYS``.
    """
    if key not in BOOTSTRAP_KEYS:
        raise ValueError(f"Argument `key` must be one of {', '.join(BOOTSTRAP_KEYS)}, but got {key!r}.")
    _check_bootstrap_args(n_resamples, confidence, seed)
    a_i2t, a_t2i, c2i = _check_rank_pair("ranks_a", ranks_a, caption_to_image)
    b_i2t, b_t2i, _ = _check_rank_pair("ranks_b", ranks_b, caption_to_image)
    if a_i2t.shape != b_i2t.shape or a_t2i.shape != b_t2i.shape:
        raise ValueError(
            f"Arguments `ranks_a` and `ranks_b` must rank the same cell (same images and captions), but got "
            f"{a_i2t.numel()} x {a_t2i.numel()} and {b_i2t.numel()} x {b_t2i.numel()} (images x captions)."
        )
    b_i2t, b_t2i = b_i2t.to(a_i2t.device), b_t2i.to(a_i2t.device)
    vals_a, vals_b = _bootstrap_values(
        [_per_image_hits(a_i2t, a_t2i, c2i), _per_image_hits(b_i2t, b_t2i, c2i)], n_resamples, seed
    )
    col = BOOTSTRAP_KEYS.index(key)
    lo, hi = _percentile_interval(vals_a[:, col] - vals_b[:, col], confidence).tolist()
    diff = metrics_from_ranks(a_i2t, a_t2i)[key] - metrics_from_ranks(b_i2t, b_t2i)[key]
    return {"diff": diff, "lo": lo, "hi": hi, "significant": bool(lo > 0.0 or hi < 0.0)}


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
