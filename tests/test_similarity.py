"""Similarity heads vs per-pair python-loop references (SCAN reference code order of ops), padding invariance,
and chunked == unchunked bit for bit."""

from __future__ import annotations

import functools

import pytest
import torch

from rcit_bench.models.similarity import (
    chunk_sizes,
    chunked_scores,
    cosine_sim,
    matchmap,
    matchmap_scores,
    scan_i2t,
    scan_t2i,
)


def _norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-8)


def _agg(r: torch.Tensor, agg: str, lambda2: float) -> float:
    if agg == "lse":
        return float(torch.log(torch.exp(lambda2 * r).sum()) / lambda2)
    return float(r.mean())


def ref_scan_t2i(regions, words, lengths, lambda1, lambda2, agg):
    """Per pair, as SCAN's xattn_score_t2i/func_attention: query = the caption's valid words, context = regions."""
    out = torch.zeros(regions.shape[0], words.shape[0], dtype=torch.float64)
    for i in range(regions.shape[0]):
        for j in range(words.shape[0]):
            v = _norm(regions[i].double(), 1)  # (R, D)
            e = _norm(words[j, : lengths[j]].double(), 1)  # (n, D)
            attn = torch.nn.functional.leaky_relu(v @ e.T, 0.1)  # (R, n)
            attn = _norm(attn, 1)  # over words
            alpha = torch.softmax(lambda1 * attn, dim=0)  # over regions
            attended = alpha.T @ v  # (n, D)
            out[i, j] = _agg(_cos_rows(e, attended), agg, lambda2)
    return out


def ref_scan_i2t(regions, words, lengths, lambda1, lambda2, agg):
    """Per pair, as SCAN's xattn_score_i2t: query = regions, context = the caption's valid words."""
    out = torch.zeros(regions.shape[0], words.shape[0], dtype=torch.float64)
    for i in range(regions.shape[0]):
        for j in range(words.shape[0]):
            v = _norm(regions[i].double(), 1)  # (R, D)
            e = _norm(words[j, : lengths[j]].double(), 1)  # (n, D)
            attn = torch.nn.functional.leaky_relu(e @ v.T, 0.1)  # (n, R)
            attn = _norm(attn, 1)  # over regions
            alpha = torch.softmax(lambda1 * attn, dim=0)  # over words
            attended = alpha.T @ e  # (R, D)
            out[i, j] = _agg(_cos_rows(v, attended), agg, lambda2)
    return out


def ref_matchmap(cells, words, lengths, mode):
    out = torch.zeros(cells.shape[0], words.shape[0], dtype=torch.float64)
    for i in range(cells.shape[0]):
        for j in range(words.shape[0]):
            mm = [[float(cells[i, c].double() @ words[j, t].double()) for t in range(lengths[j])]
                  for c in range(cells.shape[1])]  # fmt: skip
            if mode == "misa":
                val = sum(max(mm[c][t] for c in range(len(mm))) for t in range(lengths[j])) / lengths[j]
            elif mode == "sisa":
                val = sum(sum(row) for row in mm) / (len(mm) * lengths[j])
            else:
                val = sum(max(row) for row in mm) / len(mm)
            out[i, j] = val
    return out


def _inputs(n=5, m=7, r=6, l_max=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n, r, d, generator=g)
    words = torch.randn(m, l_max, d, generator=g)
    lengths = torch.randint(1, l_max + 1, (m,), generator=g)
    lengths[0] = l_max
    lengths[1] = 1
    return regions, words, lengths


@pytest.mark.parametrize("agg", ["lse", "mean"])
def test_scan_t2i_matches_reference(agg):
    regions, words, lengths = _inputs(seed=1)
    got = scan_t2i(regions, words, lengths, lambda1=9.0, lambda2=6.0, agg=agg)
    ref = ref_scan_t2i(regions, words, lengths.tolist(), 9.0, 6.0, agg)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("agg", ["lse", "mean"])
def test_scan_i2t_matches_reference(agg):
    regions, words, lengths = _inputs(seed=2)
    got = scan_i2t(regions, words, lengths, lambda1=4.0, lambda2=5.0, agg=agg)
    ref = ref_scan_i2t(regions, words, lengths.tolist(), 4.0, 5.0, agg)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["misa", "sisa", "sima"])
def test_matchmap_scores_match_reference(mode):
    cells, words, lengths = _inputs(seed=3)
    got = matchmap_scores(cells, words, lengths, mode=mode)
    torch.testing.assert_close(got.double(), ref_matchmap(cells, words, lengths.tolist(), mode), atol=1e-5, rtol=1e-5)


def test_matchmap_one_pair_and_cosine():
    cells, words, _ = _inputs(seed=4)
    mm = matchmap(cells[0], words[0])
    assert mm.shape == (cells.shape[1], words.shape[1])
    assert float(mm[2, 3]) == pytest.approx(float(torch.dot(cells[0, 2], words[0, 3])), abs=1e-5)
    img, txt = cells[:, 0], words[:, 0]
    cs = cosine_sim(img, txt)
    ref = torch.nn.functional.cosine_similarity(img[:, None], txt[None], dim=2)
    torch.testing.assert_close(cs, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [scan_t2i, scan_i2t, *(functools.partial(matchmap_scores, mode=m) for m in ("misa", "sisa", "sima"))],
    ids=["scan_t2i", "scan_i2t", "misa", "sisa", "sima"],
)
def test_padding_does_not_change_scores(fn):
    regions, words, lengths = _inputs(seed=5)
    base = fn(regions, words, lengths)
    garbage = torch.randn(words.shape[0], 3, words.shape[2]) * 50  # padded positions hold anything
    padded = torch.cat([words, garbage], dim=1)
    for j, n in enumerate(lengths.tolist()):  # also overwrite existing padding inside the original length
        padded[j, n:] = torch.randn(padded.shape[1] - n, words.shape[2]) * 50
    torch.testing.assert_close(fn(regions, padded, lengths), base, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [scan_t2i, scan_i2t, *(functools.partial(matchmap_scores, mode=m) for m in ("misa", "sisa", "sima"))],
    ids=["scan_t2i", "scan_i2t", "misa", "sisa", "sima"],
)
@pytest.mark.parametrize(("ci", "ct"), [(1, 1), (3, 5), (4, 11), (100, 100)])
def test_chunked_equals_unchunked_exactly(fn, ci, ct):
    regions, words, lengths = _inputs(n=11, m=13, r=9, l_max=7, d=32, seed=6)
    full = fn(regions, words, lengths)
    got = chunked_scores(fn, regions, words, lengths, img_chunk=ci, txt_chunk=ct)
    assert torch.equal(got, full)


def test_chunked_auto_sizes_from_budget_and_cosine_without_lengths():
    regions, words, lengths = _inputs(n=17, m=23, r=9, l_max=7, d=32, seed=7)
    full = scan_t2i(regions, words, lengths)
    # a budget of a few pairs forces many odd blocks
    got = chunked_scores(scan_t2i, regions, words, lengths, memory_budget_mb=40 * 9 * 7 * 4 * 6 / 2**20)
    assert torch.equal(got, full)
    img, txt = regions[:, 0], words[:, 0]
    assert torch.equal(chunked_scores(cosine_sim, img, txt, None, img_chunk=5, txt_chunk=4), cosine_sim(img, txt))


def test_chunk_sizes_respect_budget():
    for n, m, bpp, mb in [(1000, 5000, 36 * 12 * 4 * 6, 512), (1000, 5000, 1000, 1), (10, 10, 10**9, 1)]:
        ci, ct = chunk_sizes(n, m, bpp, mb)
        assert 1 <= ci <= n and 1 <= ct <= m
        assert ci * ct * bpp <= max(mb * 2**20, bpp)
    assert chunk_sizes(100, 50, 1, 512) == (100, 50)  # everything fits in one block


def test_chunk_sizes_count_the_inputs_copies():
    """5K x 25K SCAN at 512 MB: 25,000 captions' normalised copies alone take 1.2 GB, so blocks must hold
    fewer captions, and pairs + copies stay within the budget."""
    bpp, row_b, cap_b = 36 * 12 * 4 * 6, 2 * 36 * 256 * 4, 2 * 12 * 256 * 4
    for n, m in [(5000, 25000), (1000, 5000), (7, 3)]:
        ci, ct = chunk_sizes(n, m, bpp, 512, row_bytes=row_b, caption_bytes=cap_b)
        assert 1 <= ci <= n and 1 <= ct <= m
        assert ci * ct * bpp + ci * row_b + ct * cap_b <= 512 * 2**20
    assert chunk_sizes(5000, 25000, bpp, 512, row_bytes=row_b, caption_bytes=cap_b)[1] < 25000


@pytest.mark.parametrize(
    "fn",
    [scan_t2i, scan_i2t, *(functools.partial(matchmap_scores, mode=m) for m in ("misa", "sisa", "sima"))],
    ids=["scan_t2i", "scan_i2t", "misa", "sisa", "sima"],
)
def test_autograd_path_equals_inplace_inference_path(fn):
    """With gradients the intermediates are not updated in place; values must not change by a bit."""
    regions, words, lengths = _inputs(n=4, m=6, seed=11)
    with torch.no_grad():
        fast = fn(regions, words, lengths)
    slow = fn(regions.clone().requires_grad_(True), words, lengths)
    assert slow.requires_grad and torch.equal(slow.detach(), fast)


@pytest.mark.parametrize("padding", ["zeros", "garbage"])
@pytest.mark.parametrize("agg", ["lse", "mean"])
@pytest.mark.parametrize("fn", [scan_i2t, scan_t2i], ids=["scan_i2t", "scan_t2i"])
def test_gradients_on_padded_block_are_finite_and_equal_per_caption_loop(fn, agg, padding):
    """Captions of different lengths in one block: padded words must not turn the gradients into NaN (the sqrt of
    a zero norm has an infinite derivative), and the gradients equal those of each caption scored alone, unpadded."""
    g = torch.Generator().manual_seed(12)
    n, r, m, l_max, d = 4, 6, 5, 7, 8
    regions = torch.randn(n, r, d, generator=g, dtype=torch.float64)
    words = torch.randn(m, l_max, d, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 2, 5, 1, 4])
    for j, length in enumerate(lengths.tolist()):
        words[j, length:] = 0.0 if padding == "zeros" else 30 * torch.randn(l_max - length, d, generator=g).double()
    weights = torch.randn(n, m, generator=g, dtype=torch.float64)  # a loss that weighs every score differently

    def grads(score_fn):
        reg, wrd = regions.clone().requires_grad_(True), words.clone().requires_grad_(True)
        (score_fn(reg, wrd) * weights).sum().backward()
        return reg.grad, wrd.grad

    block = grads(lambda reg, wrd: fn(reg, wrd, lengths, agg=agg))
    loop = grads(lambda reg, wrd: torch.cat(
        [fn(reg, wrd[j : j + 1, :length], lengths[j : j + 1], agg=agg) for j, length in enumerate(lengths.tolist())],
        dim=1))  # fmt: skip
    for got, want in zip(block, loop):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert bool((block[1][3, 1:] == 0).all())  # padded words get no gradient


@pytest.mark.parametrize("fn", [scan_i2t, scan_t2i], ids=["scan_i2t", "scan_t2i"])
def test_zero_features_give_finite_gradients(fn):
    """An all-zero image or caption makes the attended vectors' norms 0 (sqrt at 0 again); gradients stay finite."""
    regions, words, lengths = _inputs(n=3, m=4, seed=13)
    regions, words = regions.double(), words.double()
    regions[0] = 0.0
    words[2] = 0.0
    regions.requires_grad_(True)
    words.requires_grad_(True)
    fn(regions, words, lengths).sum().backward()
    assert bool(torch.isfinite(regions.grad).all()) and bool(torch.isfinite(words.grad).all())


def test_l2norm_of_zero_vector_has_finite_gradient():
    from rcit_bench.models.similarity import l2norm

    x = torch.zeros(3, 4, dtype=torch.float64)
    x[0] = torch.tensor([3.0, 0.0, 4.0, 0.0])
    x.requires_grad_(True)
    out = l2norm(x)
    out.sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    assert torch.equal(out.detach()[1:], torch.zeros(2, 4, dtype=torch.float64))  # zero vectors stay zero
    with torch.no_grad():
        assert torch.equal(l2norm(x.detach()), out.detach())  # in-place inference path: same values


def test_chunked_scores_keeps_gradients():
    regions, words, lengths = _inputs(n=4, m=5, seed=8)
    regions.requires_grad_(True)
    chunked_scores(scan_t2i, regions, words, lengths, img_chunk=3, txt_chunk=2).sum().backward()
    g_chunked = regions.grad.clone()
    regions.grad = None
    scan_t2i(regions, words, lengths).sum().backward()
    torch.testing.assert_close(g_chunked, regions.grad)


def test_errors():
    regions, words, lengths = _inputs()
    with pytest.raises(ValueError, match=r"Argument `agg` must be one of 'lse', 'mean', but got 'lsee'.*'lse'"):
        scan_t2i(regions, words, lengths, agg="lsee")
    with pytest.raises(ValueError, match=r"Argument `mode` must be one of 'misa', 'sisa', 'sima'.*'mis'.*'misa'"):
        matchmap_scores(regions, words, lengths, mode="mis")
    with pytest.raises(ValueError, match=r"`word_lengths` must be in \[1, L=5\].*\[0, 5\]"):
        scan_i2t(regions, words, torch.tensor([0, 5, 1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"`word_lengths` must be \(M,\) = \(7,\)"):
        scan_t2i(regions, words, lengths[:3])
    with pytest.raises(ValueError, match=r"same D.*\(5, 6, 8\).*\(7, 5, 4\)"):
        scan_t2i(regions, words[..., :4], lengths)
    with pytest.raises(ValueError, match=r"`memory_budget_mb` must be > 0"):
        chunked_scores(scan_t2i, regions, words, lengths, memory_budget_mb=0)
    with pytest.raises(ValueError, match=r"`txt_chunk` must be a positive int"):
        chunked_scores(scan_t2i, regions, words, lengths, txt_chunk=0)


@pytest.mark.parametrize("fn", [scan_t2i, scan_i2t], ids=["scan_t2i", "scan_i2t"])
def test_chunked_exact_at_realistic_feature_sizes(fn):
    """36 regions, 12 words, dim 256 (the benchmark's shapes) with tiny and odd blocks."""
    regions, words, lengths = _inputs(n=6, m=9, r=36, l_max=12, d=256, seed=9)
    full = fn(regions, words, lengths)
    for ci, ct in [(1, 1), (5, 4)]:
        assert torch.equal(chunked_scores(fn, regions, words, lengths, img_chunk=ci, txt_chunk=ct), full)


def test_stable_matmul_entries_independent_of_block_shape():
    from rcit_bench.models.similarity import stable_matmul

    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(300, 256, generator=g), torch.randn(256, 400, generator=g)
    full = stable_matmul(a, b)
    torch.testing.assert_close(full, a @ b)
    for p, q in [(1, 1), (1, 400), (300, 1), (3, 5), (17, 33)]:
        assert torch.equal(stable_matmul(a[-p:], b[:, -q:]), full[-p:, -q:])


@pytest.mark.parametrize("fn", [scan_t2i, functools.partial(matchmap_scores, mode="misa")], ids=["scan_t2i", "misa"])
def test_by_length_scores_match_padded_and_ignore_caption_order(fn):
    """Grouping captions by length (evaluation) gives the padded scores up to rounding, whatever the order."""
    g = torch.Generator().manual_seed(3)
    regions, words = torch.randn(7, 5, 8, generator=g), torch.randn(11, 9, 8, generator=g)
    lengths = torch.tensor([9, 2, 5, 5, 1, 9, 3, 2, 7, 5, 4])
    padded = chunked_scores(fn, regions, words, lengths, memory_budget_mb=1)
    grouped = chunked_scores(fn, regions, words, lengths, memory_budget_mb=1, by_length=True)
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-5)
    perm = torch.randperm(11, generator=g)
    shuffled = chunked_scores(fn, regions, words[perm], lengths[perm], memory_budget_mb=1, by_length=True)
    assert torch.equal(shuffled, grouped[:, perm])
