"""Similarity heads: cosine (VSE++/RCIT/MIIE), SCAN cross attention (VSR++ local branch), DAVEnet matchmaps,
and a generic block scorer that bounds the memory of all-pairs cross-attention scoring.

SCAN follows the reference implementation (Lee et al., ECCV 2018, github.com/kuanghuei/SCAN, ``func_attention``
with ``raw_feature_norm='clipped_l2norm'``): raw scores ``s = v . e`` on l2-normalised features, LeakyReLU(0.1),
l2-normalised over the *query* dimension (words for t2i, regions for i2t), softmax over the context of
``lambda1 * s``, then the cosine between each query item and its attended context vector, aggregated with
LogSumExp (``agg='lse'``) or the mean. To avoid an (N, M, L, D) attended tensor, the attended vectors are never
built: ``e_j . a_j = sum_i alpha_ij (v_i . e_j)`` and ``|a_j|^2 = alpha_j^T (V V^T) alpha_j`` give the same cosine.
The largest intermediates are therefore (N, R, M, L) floats per block.

Chunking never changes a score: torch's CPU reductions over an inner dimension sum in an order that depends on
the whole tensor's shape, and BLAS uses other kernels for tiny operands. So reductions run over the last dimension
or in a fixed sequential order (``_seq_sum``), and products go through ``stable_matmul``. Without autograd the
intermediates are updated in place, which keeps the peak near 2-3 (N, R, M, L) float tensors per block.

All functions take the device and dtype of their inputs and support autograd (no in-place ops on inputs).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rcit_bench.models.layers import lengths_to_mask
from rcit_bench.utils import check_choice

SCAN_AGGREGATIONS = ("lse", "mean")
MATCHMAP_MODES = ("misa", "sisa", "sima")

# Peak bytes per (image, caption) pair of one call without autograd, in units of R * L * itemsize: measured
# (peak RSS growth / (pairs * R * L * 4), one 19 x 1000 block, 36 x 12, glibc forced to mmap) as t2i 3.1,
# i2t 4.9, matchmap 1.44; rounded up. Autograd keeps more tensors alive (training blocks are small).
SCAN_T2I_BYTES_FACTOR = 3.5
SCAN_I2T_BYTES_FACTOR = 5.5
MATCHMAP_BYTES_FACTOR = 1.75
SCAN_BYTES_FACTOR = SCAN_I2T_BYTES_FACTOR  # default for an unknown fn: the largest known


def _sqrt(x: Tensor, inplace: bool = False) -> Tensor:
    """``sqrt(max(x, 0))`` with a zero gradient (vector_norm's subgradient) where ``x <= 0``; NaN stays NaN.

    ``Tensor.sqrt`` has an infinite derivative at 0 and inf * 0 = NaN: a single zero norm (a padded word, a zero
    feature vector) would make the gradients of the whole block NaN. ``inplace``: overwrite ``x`` (no autograd)."""
    if inplace:
        return x.clamp_(min=0).sqrt_()
    nonpos = x <= 0
    return torch.where(nonpos, 0.0, torch.where(nonpos, 1.0, x).sqrt())


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / (||x|| + eps)`` along ``dim``, SCAN's l2norm (zero vectors stay zero, with finite gradients).

    The suite's one l2norm: every scorer here normalises its inputs with it, whatever the method did before.
    The methods' heads (VSR++, Matchmap, the VSRN reasoning blocks, MIIE's classifier input) normalise with
    torch's ``F.normalize`` instead (``x / max(||x||, eps)``, also finite at zero). The two are not merged
    because they differ in the last bits: ``+ eps`` moves norms below ~0.25, and the norm is summed in another
    order. Swapping one for the other changes VSR++'s and Matchmap's scores in the last bits, and through
    training their figures, which must stay reproducible bit for bit. This is also why VSR++ normalises twice:
    its heads return unit vectors (their contract) and the scorers normalise those again.
    """
    return x / (_sqrt(x.pow(2).sum(dim=dim, keepdim=True), inplace=_inplace_ok(x)) + eps)


_MIN_GEMM_SIDE = 32


def stable_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` whose every entry is independent of how many rows/columns the operands have.

    For tiny operands (a side < 16, or a matrix-vector product) the BLAS switches to kernels that sum in another
    order, so a 1 x 1 block would differ from the full product in the last bit. Zero-padding both free sides to
    at least 32 keeps every call on the same kernel (checked by tests/test_similarity.py); big blocks are not copied.
    a (..., P, K), b (..., K, Q) -> (..., P, Q).
    """
    p, q = a.shape[-2], b.shape[-1]
    if p < _MIN_GEMM_SIDE:
        a = F.pad(a, (0, 0, 0, _MIN_GEMM_SIDE - p))
    if q < _MIN_GEMM_SIDE:
        b = F.pad(b, (0, _MIN_GEMM_SIDE - q))
    out = a @ b
    return out[..., :p, :q] if (p < _MIN_GEMM_SIDE or q < _MIN_GEMM_SIDE) else out


def cosine_sim(img: Tensor, txt: Tensor) -> Tensor:
    """Cosine similarity of every image with every text: img (N, D), txt (M, D) -> (N, M); normalises inside."""
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"Arguments `img` and `txt` must be (N, D) and (M, D) with the same D, but got {tuple(img.shape)} "
            f"and {tuple(txt.shape)}."
        )
    return stable_matmul(l2norm(img), l2norm(txt).t())


def _check_cross(regions: Tensor, words: Tensor, word_lengths: Tensor, region_arg: str = "regions") -> Tensor:
    """Validate (N, R, D), (M, L, D), (M,) inputs; return the (M, L) bool mask of valid words."""
    if regions.ndim != 3 or words.ndim != 3 or regions.shape[2] != words.shape[2]:
        raise ValueError(
            f"Arguments `{region_arg}` and `words` must be (N, R, D) and (M, L, D) with the same D, but got "
            f"{tuple(regions.shape)} and {tuple(words.shape)}."
        )
    m, l_max, _ = words.shape
    lengths = torch.as_tensor(word_lengths, device=words.device)
    if lengths.shape != (m,):
        raise ValueError(f"Argument `word_lengths` must be (M,) = ({m},), but got shape {tuple(lengths.shape)}.")
    if m and (bool((lengths < 1).any()) or bool((lengths > l_max).any())):
        raise ValueError(
            f"Argument `word_lengths` must be in [1, L={l_max}] (the padded length of `words`), but got values in "
            f"[{int(lengths.min())}, {int(lengths.max())}]."
        )
    return lengths_to_mask(lengths, l_max)  # (M, L)


def _pair_dots(a: Tensor, b: Tensor) -> Tensor:
    """All dot products a (N, R, D) x b (M, L, D) -> (N, R, M, L) as one GEMM (no broadcast copies)."""
    n, r, d = a.shape
    m, l_max, _ = b.shape
    return stable_matmul(a.reshape(n * r, d), b.reshape(m * l_max, d).t()).view(n, r, m, l_max)


def _aggregate(scores: Tensor, valid: Tensor | None, agg: str, lambda2: float) -> Tensor:
    """LogSumExp ``(1/lambda2) log sum exp(lambda2 x)`` or mean of ``scores`` over the last dim, valid entries only."""
    if agg == "lse":
        x = lambda2 * scores
        if valid is not None:
            x = x.masked_fill(~valid, -math.inf)
        return torch.logsumexp(x, dim=-1) / lambda2
    if valid is None:
        return scores.mean(dim=-1)
    return scores.masked_fill(~valid, 0).sum(dim=-1) / valid.sum(dim=-1).to(scores.dtype)


def _seq_sum(x: Tensor, dim: int) -> Tensor:
    """Sum over a non-last ``dim`` in a fixed left-to-right order.

    torch's own reduction over an inner dimension sums in an order that depends on the whole tensor's shape, which
    would make a block's scores differ in the last bit from the full matrix's; this order depends on nothing else.
    """
    acc = x.select(dim, 0).clone()
    for i in range(1, x.shape[dim]):
        acc = acc + x.select(dim, i)
    return acc


def _seq_dot(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """``(a * b).sum(dim)`` in a fixed order without materialising ``a * b`` (one slice at a time)."""
    acc = a.select(dim, 0) * b.select(dim, 0)
    for i in range(1, a.shape[dim]):
        acc = acc + a.select(dim, i) * b.select(dim, i)
    return acc


def _inplace_ok(*tensors: Tensor) -> bool:
    """In-place ops on intermediates are safe (and halve peak memory) when no gradient is being recorded."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def _scan_inputs(regions: Tensor, words: Tensor, word_lengths: Tensor, agg: str,
                 eps: float) -> tuple[Tensor, bool, Tensor, Tensor, Tensor, Tensor]:
    """What both SCAN directions start from: the valid-word mask (M, L), whether intermediates may be written in
    place, the l2-normalised regions v (N, R, D) and words e (M, L, D; padded words zeroed), the raw dots
    s_ij = v_i . e_j (N, R, M, L) and their LeakyReLU(0.1)."""
    check_choice("agg", agg, SCAN_AGGREGATIONS)
    valid = _check_cross(regions, words, word_lengths)
    v = l2norm(regions, eps=eps)
    e = l2norm(words, eps=eps) * valid[:, :, None]
    raw = _pair_dots(v, e)
    return valid, _inplace_ok(regions, words), v, e, raw, F.leaky_relu(raw, 0.1)


def scan_t2i(
    regions: Tensor,
    words: Tensor,
    word_lengths: Tensor,
    lambda1: float = 9.0,
    lambda2: float = 6.0,
    agg: str = "lse",
    eps: float = 1e-8,
) -> Tensor:
    """SCAN text-to-image score: each word attends over the regions. regions (N, R, D), words (M, L, D) padded,
    word_lengths (M,) -> (N, M). Padded words do not change the score. Features are l2-normalised inside."""
    valid, inplace, v, e, raw, s = _scan_inputs(regions, words, word_lengths, agg, eps)
    n, r, _ = regions.shape
    m, l_max, _ = words.shape
    norm = torch.linalg.vector_norm(s, dim=3, keepdim=True) + eps  # over words; padded words are 0
    s = s.div_(norm).mul_(lambda1) if inplace else s / norm * lambda1  # (N, R, M, L) attention logits
    mx = s.amax(dim=1, keepdim=True)  # softmax over regions (dim 1), summed in a fixed order
    s = s.sub_(mx).exp_() if inplace else (s - mx).exp()
    den = _seq_sum(s, 1).unsqueeze(1)
    alpha = s.div_(den) if inplace else s / den  # (N, R, M, L)
    del s
    num = _seq_dot(alpha, raw, 1)  # (N, M, L)  e_j . a_j = sum_i alpha_ij s_ij
    del raw
    gram = stable_matmul(v, v.transpose(1, 2))  # (N, R, R)
    g_alpha = stable_matmul(gram, alpha.reshape(n, r, m * l_max)).view(n, r, m, l_max)  # (N, R, M, L)
    sq_norm = _seq_dot(alpha, g_alpha, 1)  # (N, M, L)  |a_j|^2 = alpha_j^T G alpha_j
    del g_alpha, alpha
    e_norm = torch.linalg.vector_norm(e, dim=2)  # (M, L)
    rel = num / (e_norm[None] * _sqrt(sq_norm, inplace)).clamp(min=eps)  # (N, M, L)  R_j = cos(e_j, a_j)
    return _aggregate(rel, valid[None], agg=agg, lambda2=lambda2)


def scan_i2t(
    regions: Tensor,
    words: Tensor,
    word_lengths: Tensor,
    lambda1: float = 4.0,
    lambda2: float = 5.0,
    agg: str = "lse",
    eps: float = 1e-8,
) -> Tensor:
    """SCAN image-to-text score: each region attends over the caption's valid words. regions (N, R, D),
    words (M, L, D) padded, word_lengths (M,) -> (N, M). Features are l2-normalised inside."""
    valid, inplace, v, e, raw, s = _scan_inputs(regions, words, word_lengths, agg, eps)
    n, r, _ = regions.shape
    m, l_max, _ = words.shape
    # (N, 1, M, L) over regions, per word; 0 for padded words (all their s are 0), whose gradient must stay finite
    norm = (_sqrt(_seq_dot(s, s, 1), inplace) + eps).unsqueeze(1)
    s = s.div_(norm).mul_(lambda1) if inplace else s / norm * lambda1
    s = s.masked_fill_(~valid[None, None], -math.inf) if inplace else s.masked_fill(~valid[None, None], -math.inf)
    alpha = torch.softmax(s, dim=3)  # (N, R, M, L) over valid words (last dim)
    del s
    num = (raw.mul_(alpha) if inplace else raw * alpha).sum(dim=3)  # (N, R, M)  v_i . a_i
    del raw
    gram = stable_matmul(e, e.transpose(1, 2))  # (M, L, L)
    alpha_m = alpha.permute(2, 0, 1, 3).reshape(m, n * r, l_max)  # (M, N*R, L)
    del alpha
    g_alpha = stable_matmul(alpha_m, gram)  # (M, N*R, L)
    sq_norm = (g_alpha.mul_(alpha_m) if inplace else g_alpha * alpha_m).sum(dim=2)  # (M, N*R)  |a_i|^2
    del g_alpha, alpha_m
    a_norm = _sqrt(sq_norm, inplace).view(m, n, r).permute(1, 0, 2)  # (N, M, R)
    v_norm = torch.linalg.vector_norm(v, dim=2)  # (N, R)
    rel = num.permute(0, 2, 1) / (v_norm[:, None, :] * a_norm).clamp(min=eps)  # (N, M, R)  cos(v_i, a_i)
    return _aggregate(rel.contiguous(), None, agg=agg, lambda2=lambda2)


def matchmap(cells_one: Tensor, words_one: Tensor) -> Tensor:
    """DAVEnet matchmap of one pair: ``M[c, t] = <cell c, word t>``; cells (C, D), words (L, D) -> (C, L).

    Reshape C back to (H, W) to get a localisation heatmap per word."""
    if cells_one.ndim != 2 or words_one.ndim != 2 or cells_one.shape[1] != words_one.shape[1]:
        raise ValueError(
            f"Arguments `cells_one` and `words_one` must be (C, D) and (L, D) with the same D, but got "
            f"{tuple(cells_one.shape)} and {tuple(words_one.shape)}."
        )
    return stable_matmul(cells_one, words_one.t())


def matchmap_scores(cells: Tensor, words: Tensor, word_lengths: Tensor, mode: str = "misa") -> Tensor:
    """Matchmap similarity of all pairs: cells (N, C, D), words (M, L, D) padded, word_lengths (M,) -> (N, M).

    misa: mean over valid words of the max over cells; sisa: mean over cells and valid words;
    sima: mean over cells of the max over valid words (DAVEnet). Dot products, no normalisation (DAVEnet)."""
    check_choice("mode", mode, MATCHMAP_MODES)
    valid = _check_cross(cells, words, word_lengths, region_arg="cells")  # (M, L)
    inplace = _inplace_ok(cells, words)
    c = cells.shape[1]
    mm = _pair_dots(cells, words)  # (N, C, M, L)
    if mode == "misa":  # max is order-free; the mean runs over the last dim
        return _aggregate(mm.amax(dim=1), valid[None], agg="mean", lambda2=1.0)
    if mode == "sisa":
        mm = mm.masked_fill_(~valid[None, None], 0) if inplace else mm.masked_fill(~valid[None, None], 0)
        return _seq_sum(mm.sum(dim=3), 1) / (c * valid.sum(dim=1)).to(mm.dtype)[None]
    mm = mm.masked_fill_(~valid[None, None], -math.inf) if inplace else mm.masked_fill(~valid[None, None], -math.inf)
    return _seq_sum(mm.amax(dim=3), 1) / c  # (N, C, M) -> (N, M)


def bytes_factor(fn: Callable[..., Tensor]) -> float:
    """The measured peak-memory factor of a scorer (see the constants above); unwraps functools.partial."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return {scan_t2i: SCAN_T2I_BYTES_FACTOR, scan_i2t: SCAN_I2T_BYTES_FACTOR, matchmap_scores: MATCHMAP_BYTES_FACTOR,
            cosine_sim: 1.0}.get(fn, SCAN_BYTES_FACTOR)  # fmt: skip


def default_bytes_per_pair(img_feats: Tensor, txt_feats: Tensor, factor: float = SCAN_BYTES_FACTOR) -> int:
    """Peak bytes per (image, caption) pair for cross attention: ``factor * R * L * itemsize``."""
    r = img_feats.shape[1] if img_feats.ndim == 3 else 1
    l_max = txt_feats.shape[1] if txt_feats.ndim == 3 else 1
    return int(math.ceil(factor * r * l_max * img_feats.element_size()))


def chunk_sizes(n_img: int, n_txt: int, bytes_per_pair: int, memory_budget_mb: float, row_bytes: int = 0,
                caption_bytes: int = 0) -> tuple[int, int]:
    """(image rows, captions) per block so that ``rows * captions * bytes_per_pair + rows * row_bytes +
    captions * caption_bytes`` <= budget (at least 1 x 1).

    ``row_bytes`` / ``caption_bytes``: what a scorer allocates per image / caption of a block whatever the
    pairs (its normalised copies of the inputs). Prefers whole caption sets (long GEMMs) while their copies
    take at most half the budget; otherwise square-ish blocks."""
    budget = int(memory_budget_mb * 2**20)
    bpp = max(1, int(bytes_per_pair))
    fixed = n_txt * int(caption_bytes)
    if 2 * fixed <= budget:
        rows = (budget - fixed) // (n_txt * bpp + int(row_bytes))
        if rows >= 1:
            return min(n_img, rows), n_txt
    # square-ish: half the budget for pairs, the rest for the per-row / per-caption copies
    side = max(1, math.isqrt(max(1, budget // (2 * bpp))))
    img_chunk = min(n_img, side)
    per_cap = img_chunk * bpp + int(caption_bytes)
    txt_chunk = max(1, min(n_txt, (budget - img_chunk * int(row_bytes)) // max(1, per_cap)))
    return img_chunk, txt_chunk


def _scores_by_length(fn: Callable[..., Tensor], img_feats: Tensor, txt_feats: Tensor, txt_lengths: Tensor,
                      memory_budget_mb: float, bytes_per_pair: int | None) -> Tensor:
    """``chunked_scores`` per group of captions of one length, each cut to that length.

    Captions padded to the longest one in the set (31 words on the synthetic set, ~12 on average) would make
    the cross-attention work (linear in the padded length) ~2.5x what it needs; padded words never change a
    score. Grouping by length depends only on the lengths, so the result does not depend on caption order."""
    lengths = torch.as_tensor(txt_lengths, device=txt_feats.device).to(torch.long)
    out: Tensor | None = None
    l_max = txt_feats.shape[1]
    for length in torch.unique(lengths).tolist():
        cols = torch.nonzero(lengths == length).squeeze(1)
        bpp = None if bytes_per_pair is None else max(1, int(bytes_per_pair) * int(length) // max(1, l_max))
        block = chunked_scores(fn, img_feats, txt_feats[cols, :length], lengths[cols],
                               memory_budget_mb=memory_budget_mb, bytes_per_pair=bpp)
        if out is None:
            out = block.new_empty((img_feats.shape[0], txt_feats.shape[0]))
        out[:, cols] = block
    assert out is not None
    return out


def chunked_scores(
    fn: Callable[..., Tensor],
    img_feats: Tensor,
    txt_feats: Tensor,
    txt_lengths: Tensor | None = None,
    *,
    memory_budget_mb: float = 512,
    bytes_per_pair: int | None = None,
    img_chunk: int | None = None,
    txt_chunk: int | None = None,
    by_length: bool = False,
) -> Tensor:
    """Score all (image, caption) pairs with ``fn`` block by block so its intermediates fit ``memory_budget_mb``.

    Args:
        fn: ``fn(img_block, txt_block, len_block) -> (n, m)`` (or ``fn(img_block, txt_block)`` when
            ``txt_lengths`` is None), e.g. :func:`scan_t2i` or ``functools.partial(matchmap_scores, mode='sima')``.
        img_feats: (N, ...) image features; txt_feats: (M, ...) text features; txt_lengths: (M,) or None.
        memory_budget_mb: bound on the block's intermediates (inputs and the (N, M) output come on top).
        bytes_per_pair: peak bytes of ``fn`` per pair; default ``bytes_factor(fn) * R * L * itemsize``.
        img_chunk, txt_chunk: force block sizes (tests, tuning); otherwise derived from the budget.
        by_length: score each group of equal-length captions cut to its length (no work on padding); scores
            equal the padded ones up to float rounding (reductions over another length); used at evaluation.

    Every pair is computed by the same operations on the same data whatever the blocking, so the result equals
    ``fn(img_feats, txt_feats, txt_lengths)`` (bit-for-bit on CPU in our tests; GPU BLAS may pick shape-dependent
    kernels, so expect rounding-level differences there).
    """
    if memory_budget_mb <= 0:
        raise ValueError(f"Argument `memory_budget_mb` must be > 0, but got {memory_budget_mb!r}.")
    if by_length and txt_lengths is not None and txt_feats.ndim == 3 and len(txt_feats):
        return _scores_by_length(fn, img_feats, txt_feats, txt_lengths, memory_budget_mb, bytes_per_pair)
    n, m = img_feats.shape[0], txt_feats.shape[0]
    if txt_lengths is not None and len(txt_lengths) != m:
        raise ValueError(f"Argument `txt_lengths` must have one entry per caption ({m}), but got {len(txt_lengths)}.")
    if bytes_per_pair is None:
        bpp = default_bytes_per_pair(img_feats, txt_feats, bytes_factor(fn))
    else:
        bpp = int(bytes_per_pair)
    # normalised copies of a block's inputs that cross-attention scorers make (2 live at once: l2norm, mask)
    copies = bytes_factor(fn) != 1.0  # cosine scores in place of its inputs' copies; cross attention copies them
    row_b = 2 * img_feats[0].numel() * img_feats.element_size() if n and copies else 0
    cap_b = 2 * txt_feats[0].numel() * txt_feats.element_size() if m and copies else 0
    auto_i, auto_t = chunk_sizes(n, m, bpp, memory_budget_mb, row_bytes=row_b, caption_bytes=cap_b)
    for arg, val in (("img_chunk", img_chunk), ("txt_chunk", txt_chunk)):
        if val is not None and (not isinstance(val, int) or val < 1):
            raise ValueError(f"Argument `{arg}` must be a positive int or None, but got {val!r}.")
    ci = img_chunk or auto_i
    ct = txt_chunk or auto_t
    out: Tensor | None = None
    for i0 in range(0, n, ci):
        for t0 in range(0, m, ct):
            args = (img_feats[i0 : i0 + ci], txt_feats[t0 : t0 + ct])
            if txt_lengths is not None:
                args = args + (txt_lengths[t0 : t0 + ct],)
            block = fn(*args)  # (ci, ct)
            if out is None:
                out = block.new_empty((n, m))
            out[i0 : i0 + ci, t0 : t0 + ct] = block
    if out is None:  # no images or no captions
        return img_feats.new_empty((n, m))
    return out
