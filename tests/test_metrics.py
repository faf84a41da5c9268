"""Retrieval metrics vs brute-force references written here, torchmetrics' RetrievalHitRate, the bootstrap vs an
explicit resampling reference, and error messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rcit_bench.metrics as metrics_module
from rcit_bench.metrics import (
    BOOTSTRAP_KEYS,
    METRIC_INFO,
    METRIC_KEYS,
    bootstrap_from_ranks,
    bootstrap_intervals,
    coco_1k_metrics,
    compute_ranks,
    mce,
    metrics_from_ranks,
    mmi,
    paired_bootstrap,
    relative_robustness,
    retrieval_metrics,
)
from rcit_bench.models.similarity import cosine_sim


def brute_force_ranks(sims: torch.Tensor, c2i: list[int]) -> tuple[list[int], list[int], list[bool], list[bool]]:
    """Reference, python loops over the definition: ties count against the model.

    i2t: 1 + #captions of OTHER images scoring >= the image's best own caption; tie = one of them scores == it.
    t2i: 1 + #OTHER images scoring >= the own image; tie = one of them scores == it.
    """
    s = sims.tolist()
    n_img, n_cap = len(s), len(s[0])
    i2t, tie_i2t = [], []
    for i in range(n_img):
        best = max(s[i][c] for c in range(n_cap) if c2i[c] == i)
        others = [s[i][c] for c in range(n_cap) if c2i[c] != i]
        i2t.append(1 + sum(1 for x in others if x >= best))
        tie_i2t.append(any(x == best for x in others))
    t2i, tie_t2i = [], []
    for c in range(n_cap):
        own = s[c2i[c]][c]
        others = [s[i][c] for i in range(n_img) if i != c2i[c]]
        t2i.append(1 + sum(1 for x in others if x >= own))
        tie_t2i.append(any(x == own for x in others))
    return i2t, t2i, tie_i2t, tie_t2i


def metrics_of(i2t: list[int], t2i: list[int]) -> dict[str, float]:
    """Reference metrics from rank lists: hit rates, numpy floor(median), numpy (unrounded) mean."""
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)))
        out[f"{name}_meanr"] = float(np.mean(ranks))
    return out


def brute_force_metrics(sims: torch.Tensor, c2i: list[int]) -> dict[str, float]:
    i2t, t2i, _, _ = brute_force_ranks(sims, c2i)
    return metrics_of(i2t, t2i)


def argsort_metrics(sims: torch.Tensor, c2i: list[int]) -> dict[str, float]:
    """Second reference for tie-free inputs: full argsort, VSE++-style position lookup."""
    order_i2t = torch.argsort(sims, dim=1, descending=True)  # (N_img, N_cap)
    i2t = []
    for i in range(sims.shape[0]):
        positions = [p for p, c in enumerate(order_i2t[i].tolist()) if c2i[c] == i]
        i2t.append(min(positions) + 1)
    order_t2i = torch.argsort(sims.T, dim=1, descending=True)  # (N_cap, N_img)
    t2i = [order_t2i[c].tolist().index(c2i[c]) + 1 for c in range(sims.shape[1])]
    return metrics_of(i2t, t2i)


def _assert_close(got: dict, ref: dict) -> None:
    assert list(got) == list(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k


def _random_case(n_img: int, caps_per_img: list[int] | int, seed: int, shuffle: bool = True, ints: int = 0):
    """Correlated scores (recalls neither 0 nor 100); ``ints > 0``: integer scores in [0, ints) plus a boost of
    the positives, so that many items tie, at the positive too."""
    g = torch.Generator().manual_seed(seed)
    counts = [caps_per_img] * n_img if isinstance(caps_per_img, int) else caps_per_img
    c2i = [i for i, n in enumerate(counts) for _ in range(n)]
    if shuffle:
        perm = torch.randperm(len(c2i), generator=g).tolist()
        c2i = [c2i[p] for p in perm]
    onehot = torch.nn.functional.one_hot(torch.tensor(c2i), n_img).T.float()
    if ints:
        sims = torch.randint(0, ints, (n_img, len(c2i)), generator=g).float() + onehot
    else:
        sims = torch.randn(n_img, len(c2i), generator=g) + 1.5 * onehot
    return sims, c2i


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_shuffled_captions(chunk_size, seed):
    sims, c2i = _random_case(23, 5, seed)
    got = retrieval_metrics(sims, torch.tensor(c2i), chunk_size=chunk_size)
    _assert_close(got, brute_force_metrics(sims, c2i))
    _assert_close(got, argsort_metrics(sims, c2i))
    assert 0 < got["rsum"] < 600


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("levels", [2, 4])
def test_integer_scores_with_many_ties_match_brute_force(chunk_size, seed, levels):
    """Ranks, tie flags and every metric key, on scores with ties everywhere (and 5-7 captions per image)."""
    counts = [5, 6, 7, 5, 6, 7, 7, 6, 5, 6, 6, 5, 7]
    sims, c2i = _random_case(len(counts), counts, seed, ints=levels)
    r_i2t, r_t2i, tie_i2t, tie_t2i = compute_ranks(sims, c2i, chunk_size=chunk_size, return_ties=True)
    ref_i2t, ref_t2i, ref_tie_i2t, ref_tie_t2i = brute_force_ranks(sims, c2i)
    assert r_i2t.tolist() == ref_i2t and r_t2i.tolist() == ref_t2i
    assert tie_i2t.dtype == torch.bool and tie_t2i.dtype == torch.bool
    assert tie_i2t.tolist() == ref_tie_i2t and tie_t2i.tolist() == ref_tie_t2i
    assert 0 < sum(ref_tie_t2i) < len(c2i)  # the case exercises both kinds of queries
    plain = compute_ranks(sims, c2i, chunk_size=chunk_size)
    assert len(plain) == 2 and torch.equal(plain[0], r_i2t) and torch.equal(plain[1], r_t2i)
    _assert_close(retrieval_metrics(sims, c2i, chunk_size=chunk_size), brute_force_metrics(sims, c2i))


def test_own_captions_tied_with_the_best_never_count():
    # image 0 has captions c0, c1 (both 0.5); image 1 has c2. Image 0: nothing of image 1 >= 0.5 -> rank 1, no tie.
    # image 1: its c2 scores 0.2, image 1's row has 0.2 at c0 (a tie) and 0.7 at c1 -> rank 3, tie.
    sims = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.7, 0.2]])
    r_i2t, r_t2i, tie_i2t, tie_t2i = compute_ranks(sims, [0, 0, 1], return_ties=True)
    assert r_i2t.tolist() == [1, 3] and tie_i2t.tolist() == [False, True]
    # t2i: c0 own 0.5 vs 0.2 -> 1; c1 own 0.5 vs 0.7 -> 2; c2 own 0.2 vs 0.1 -> 1; no ties
    assert r_t2i.tolist() == [1, 2, 1] and tie_t2i.tolist() == [False, False, False]
    sims[0, 2] = 0.2  # now image 0 ties caption 2 with its own image
    _, r_t2i, _, tie_t2i = compute_ranks(sims, [0, 0, 1], return_ties=True)
    assert r_t2i.tolist() == [1, 2, 2] and tie_t2i.tolist() == [False, False, True]


@pytest.mark.parametrize("value", [0.0, 0.3, -math.inf])
def test_constant_scores_rank_every_query_last(value):
    """A scorer that cannot tell items apart gets nothing (under the optimistic rule it had RSUM 600)."""
    sims = torch.full((100, 500), value)
    c2i = torch.arange(500) // 5
    r_i2t, r_t2i, tie_i2t, tie_t2i = compute_ranks(sims, c2i, return_ties=True)
    assert torch.equal(r_i2t, torch.full((100,), 500 - 5 + 1)) and torch.equal(r_t2i, torch.full((500,), 100))
    assert bool(tie_i2t.all()) and bool(tie_t2i.all())
    want = {k: 0.0 for k in BOOTSTRAP_KEYS} | {"i2t_medr": 496.0, "t2i_medr": 100.0, "i2t_meanr": 496.0,
                                               "t2i_meanr": 100.0}  # fmt: skip
    assert retrieval_metrics(sims, c2i) == want


def test_constant_scores_tiny_split_variable_counts():
    # 3 images with 1, 2, 3 captions (6 in all): i2t ranks 6 - n + 1 = 6, 5, 4; t2i ranks N_img = 3 for all
    sims = torch.full((3, 6), 0.3)
    c2i = torch.tensor([2, 1, 2, 0, 1, 2])
    r_i2t, r_t2i = compute_ranks(sims, c2i)
    assert r_i2t.tolist() == [6, 5, 4] and r_t2i.tolist() == [3] * 6
    m = retrieval_metrics(sims, c2i)
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]) == (0.0, pytest.approx(200 / 3), 100.0)
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]) == (0.0, 100.0, 100.0)
    assert m["i2t_medr"] == 5.0 and m["i2t_meanr"] == 5.0 and m["t2i_medr"] == 3.0 and m["t2i_meanr"] == 3.0


def test_all_zero_image_embeddings_are_not_a_perfect_score():
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(20, 16)  # e.g. a collapsed image encoder
    txt = torch.randn(100, 16, generator=g)
    sims = cosine_sim(img, txt)  # all zeros: l2norm keeps zero vectors zero
    m = retrieval_metrics(sims, torch.arange(100) % 20)
    assert m["rsum"] == 0.0
    assert m["i2t_medr"] == 96.0 and m["t2i_medr"] == 20.0


@pytest.mark.parametrize("ints", [0, 3])
def test_shuffled_caption_order_gives_identical_metrics(ints):
    counts = [5, 6, 7, 6, 5, 7, 6, 6, 7, 5]
    sims, c2i = _random_case(len(counts), counts, seed=4, ints=ints)
    c2i_t = torch.tensor(c2i)
    g = torch.Generator().manual_seed(6)
    perm = torch.randperm(len(c2i), generator=g)
    assert retrieval_metrics(sims[:, perm], c2i_t[perm]) == retrieval_metrics(sims, c2i_t)
    base = compute_ranks(sims, c2i_t, return_ties=True)
    shuffled = compute_ranks(sims[:, perm], c2i_t[perm], return_ties=True)
    assert torch.equal(shuffled[0], base[0]) and torch.equal(shuffled[2], base[2])  # per image: unchanged
    assert torch.equal(shuffled[1], base[1][perm]) and torch.equal(shuffled[3], base[3][perm])  # per caption: moved


def test_variable_caption_counts_six_and_seven():
    counts = [6, 7, 7, 6, 6, 7, 6, 7, 7, 6, 6, 7]
    sims, c2i = _random_case(len(counts), counts, seed=3)
    got = retrieval_metrics(sims, c2i, chunk_size=4)  # list input accepted too
    _assert_close(got, brute_force_metrics(sims, c2i))
    _assert_close(got, argsort_metrics(sims, c2i))


def test_variable_caption_counts_including_one_and_two():
    counts = [5, 6, 7, 1, 6, 5, 2, 6, 5, 5, 6]
    sims, c2i = _random_case(len(counts), counts, seed=3, ints=3)
    _assert_close(retrieval_metrics(sims, c2i, chunk_size=4), brute_force_metrics(sims, c2i))


def test_mean_rank_is_unrounded():
    sims, c2i = _random_case(17, [5, 6, 7] * 5 + [6, 6], seed=8, ints=4)
    i2t, t2i, _, _ = brute_force_ranks(sims, c2i)
    m = retrieval_metrics(sims, c2i)
    assert m["i2t_meanr"] == pytest.approx(sum(i2t) / len(i2t), abs=1e-12)
    assert m["t2i_meanr"] == pytest.approx(sum(t2i) / len(t2i), abs=1e-12)
    assert m["t2i_meanr"] != math.floor(m["t2i_meanr"])  # a floored mean would fail here


def test_hand_computed_tiny_example():
    # images 0,1,2; captions: c0->0, c1->0, c2->1, c3->2 (no ties)
    sims = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.2],  # img0: best own caption c1 (0.9) is rank 1
            [0.8, 0.7, 0.3, 0.1],  # img1: own c2 (0.3); above: 0.8, 0.7 -> rank 3
            [0.6, 0.5, 0.4, 0.0],  # img2: own c3 (0.0); all 3 above -> rank 4
        ]
    )
    c2i = torch.tensor([0, 0, 1, 2])
    # t2i: c0 own img0 0.1, above 0.8,0.6 -> 3; c1 own 0.9 -> 1; c2 own img1 0.3, above 0.5,0.4 -> 3;
    # c3 own img2 0.0, above 0.2,0.1 -> 3
    m = retrieval_metrics(sims, c2i)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == pytest.approx(100.0)
    assert m["t2i_r1"] == pytest.approx(25.0)
    assert m["t2i_r5"] == pytest.approx(100.0)
    assert m["rsum"] == pytest.approx(100 / 3 + 100 + 100 + 25 + 100 + 100)
    assert m["i2t_medr"] == 3.0  # median of [1, 3, 4]
    assert m["i2t_meanr"] == pytest.approx(8 / 3)
    assert m["t2i_medr"] == 3.0  # median of [3, 1, 3, 3]
    assert m["t2i_meanr"] == 2.5  # 10 / 4
    # a tie at a positive: c2's own image 1 scores 0.3; image 0 now scores 0.3 too and counts against it
    sims[0, 2] = 0.3  # c2: image 0 ties (0.3), image 2 above (0.4) -> rank 3, tie
    r_i2t, r_t2i, tie_i2t, tie_t2i = compute_ranks(sims, c2i, return_ties=True)
    assert r_t2i.tolist() == [3, 1, 3, 3] and tie_t2i.tolist() == [False, False, True, False]
    sims[2, 2] = 0.3  # c2: images 0 and 2 both tie image 1 -> rank 3 still, tie
    assert compute_ranks(sims, c2i)[1].tolist() == [3, 1, 3, 3]


def test_median_of_even_count_is_floored_mean_of_middle_pair():
    # t2i ranks [1, 1, 4, 4] -> median 2.5 -> 2 (a lower-median implementation would give 1)
    sims = torch.zeros(4, 4)
    c2i = torch.tensor([0, 1, 2, 3])
    sims[0, 0] = sims[1, 1] = 1.0  # captions 0, 1 rank 1
    sims[:, 2] = torch.tensor([1.0, 2.0, 0.0, 3.0])  # caption 2 -> image 2 at rank 4
    sims[:, 3] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # caption 3 -> image 3 at rank 4
    m = retrieval_metrics(sims, c2i)
    assert m["t2i_medr"] == 2.0
    assert m["t2i_meanr"] == 2.5  # 10 / 4, not floored


def test_metrics_from_ranks_equals_retrieval_metrics_and_checks_ranks():
    sims, c2i = _random_case(15, [5, 6, 7] * 5, seed=12, ints=5)
    ranks = compute_ranks(sims, c2i)
    assert metrics_from_ranks(*ranks) == retrieval_metrics(sims, c2i)
    assert metrics_from_ranks(ranks[0].tolist(), ranks[1].tolist()) == retrieval_metrics(sims, c2i)
    with pytest.raises(ValueError, match=r"`r_t2i` must hold 1-based ranks \(>= 1\), but its smallest value is 0"):
        metrics_from_ranks(ranks[0], ranks[1] - 1)
    with pytest.raises(ValueError, match=r"`r_i2t` must hold integer 1-based ranks.*float32"):
        metrics_from_ranks(ranks[0].float(), ranks[1])
    with pytest.raises(ValueError, match=r"`r_i2t` must be a non-empty 1-D tensor of ranks.*\(0,\)"):
        metrics_from_ranks(torch.zeros(0, dtype=torch.long), ranks[1])


def test_against_torchmetrics_hit_rate():
    from torchmetrics.retrieval import RetrievalHitRate

    g = torch.Generator().manual_seed(11)
    n_img, per = 12, 5
    c2i = torch.randperm(n_img * per, generator=g) % n_img
    # positive, tie-free scores (some torchmetrics versions drop non-positive predictions)
    sims = torch.rand(n_img, n_img * per, generator=g) + 0.1 + 0.3 * torch.nn.functional.one_hot(c2i, n_img).T
    ours = retrieval_metrics(sims, c2i)
    target = c2i[None, :] == torch.arange(n_img)[:, None]  # (N_img, N_cap)
    for k in (1, 5, 10):
        i2t = RetrievalHitRate(top_k=k)(
            sims.flatten(), target.flatten(), indexes=torch.arange(n_img)[:, None].expand_as(sims).flatten()
        )
        t2i = RetrievalHitRate(top_k=k)(
            sims.T.flatten(), target.T.flatten(), indexes=torch.arange(n_img * per)[:, None].expand(-1, n_img).flatten()
        )
        assert ours[f"i2t_r{k}"] == pytest.approx(100 * float(i2t), abs=1e-4)
        assert ours[f"t2i_r{k}"] == pytest.approx(100 * float(t2i), abs=1e-4)


def test_coco_1k_equals_manual_fold_mean():
    folds, fold_size = 5, 8
    counts = ([5, 6, 5, 7] * 10)[: folds * fold_size]
    sims, c2i = _random_case(folds * fold_size, counts, seed=7, ints=4)
    c2i_t = torch.tensor(c2i)
    got = coco_1k_metrics(sims, c2i_t, folds=folds, fold_size=fold_size)
    manual = {k: 0.0 for k in METRIC_KEYS}
    for f in range(folds):
        imgs = list(range(f * fold_size, (f + 1) * fold_size))
        caps = [c for c in range(len(c2i)) if c2i[c] in imgs]
        ref = brute_force_metrics(sims[imgs][:, caps], [c2i[c] - f * fold_size for c in caps])
        for k in METRIC_KEYS:
            manual[k] += ref[k] / folds
    _assert_close(got, manual)
    with pytest.raises(ValueError, match=r"N_img == folds \* fold_size = 5 \* 1000 = 5000.*40 rows"):
        coco_1k_metrics(sims, c2i_t)


@pytest.mark.parametrize(
    ("sims", "c2i", "match"),
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.long), r"`sims` must be 2-D \(N_img, N_cap\).*\(3,\)"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1, 1]), r"`sims` must be a floating point.*int64"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), r"`caption_to_image` must be 1-D.*N_cap=3.*columns.*\(2,\)"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0, 1.0]), r"integer image indices.*float32"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 2]), r"indices in \[0, 2\).*values in \[0, 2\]"),
        (torch.zeros(2, 3), torch.tensor([-1, 1, 1]), r"indices in \[0, 2\).*values in \[-1, 1\]"),
        (torch.zeros(3, 3), torch.tensor([0, 2, 2]), r"1 image\(s\) have none.*first: \[1\].*rows from `sims`"),
        (torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), torch.tensor([0, 1]), r"contains NaN"),
    ],
)
def test_input_errors(sims, c2i, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sims, c2i)


def test_chunk_size_and_return_ties_errors():
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive int.*0"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 1]), chunk_size=0)
    with pytest.raises(ValueError, match=r"`return_ties` must be a bool, but got 1"):
        compute_ranks(torch.zeros(2, 2), torch.tensor([0, 1]), return_ties=1)


# ---------------------------------------------------------------- bootstrap


def _replayed_draws(n_img: int, n_resamples: int, seed: int) -> list[list[int]]:
    """The images each resample draws, as the module draws them (its private generator hook)."""
    return torch.cat(list(metrics_module._draw_blocks(n_img, n_resamples, seed))).tolist()


def slow_resampled_metrics(ranks, c2i: list[int], draws: list[list[int]]) -> list[dict[str, float]]:
    """Reference cluster bootstrap: build each resample's query lists explicitly (a drawn image brings its i2t
    query and all its captions as t2i queries, once per draw) and score them with ``metrics_of``."""
    r_i2t, r_t2i = ranks[0].tolist(), ranks[1].tolist()
    caps_of = {i: [c for c in range(len(c2i)) if c2i[c] == i] for i in range(len(r_i2t))}
    out = []
    for drawn in draws:
        i2t = [r_i2t[i] for i in drawn]
        t2i = [r_t2i[c] for i in drawn for c in caps_of[i]]
        out.append(metrics_of(i2t, t2i))
    return out


def _interval(values: list[float], confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    return float(np.percentile(values, 100 * alpha)), float(np.percentile(values, 100 * (1 - alpha)))


@pytest.mark.parametrize("block_elements", [None, 20])  # 20: many blocks of draws (2 resamples of 9 images each)
def test_bootstrap_matches_explicit_resampling_reference(block_elements, monkeypatch):
    if block_elements is not None:
        monkeypatch.setattr(metrics_module, "_DEFAULT_CHUNK_ELEMENTS", block_elements)
    counts = [5, 6, 7, 1, 6, 5, 7, 6, 2]
    sims, c2i = _random_case(len(counts), counts, seed=21, ints=3)
    ranks = compute_ranks(sims, c2i)
    draws = _replayed_draws(len(counts), 41, seed=5)
    assert len(draws) == 41 and all(len(d) == 9 and 0 <= min(d) and max(d) < 9 for d in draws)
    assert len({tuple(d) for d in draws}) == 41  # resamples differ
    ref = slow_resampled_metrics(ranks, c2i, draws)
    got = bootstrap_from_ranks(*ranks, c2i, n_resamples=41, confidence=0.9, seed=5)
    assert list(got) == list(BOOTSTRAP_KEYS)
    for k in BOOTSTRAP_KEYS:
        assert got[k] == pytest.approx(_interval([m[k] for m in ref], 0.9), abs=1e-9), k
    assert bootstrap_intervals(sims, c2i, n_resamples=41, confidence=0.9, seed=5) == got


def test_bootstrap_deterministic_by_seed_and_contains_point_estimate():
    sims, c2i = _random_case(200, [5, 6, 7] * 66 + [5, 5], seed=13)
    point = retrieval_metrics(sims, c2i)
    a = bootstrap_intervals(sims, c2i, n_resamples=300, seed=1)
    assert bootstrap_intervals(sims, c2i, n_resamples=300, seed=1) == a
    assert bootstrap_intervals(sims, c2i, n_resamples=300, seed=2) != a
    for k in BOOTSTRAP_KEYS:
        lo, hi = a[k]
        assert lo <= point[k] <= hi and lo < hi, k
    narrow = bootstrap_intervals(sims, c2i, n_resamples=300, seed=1, confidence=0.5)
    assert all(a[k][0] <= narrow[k][0] <= narrow[k][1] <= a[k][1] for k in BOOTSTRAP_KEYS)


def test_bootstrap_width_shrinks_with_more_images():
    widths = []
    for n_img in (50, 800):
        sims, c2i = _random_case(n_img, 5, seed=14)
        lo, hi = bootstrap_intervals(sims, c2i, n_resamples=400, seed=0)["rsum"]
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]  # ~1/sqrt(16) = 0.25 expected


def test_paired_bootstrap_self_is_zero_and_better_model_is_significant():
    counts = [5, 6, 7] * 40
    good, c2i = _random_case(len(counts), counts, seed=15)
    g = torch.Generator().manual_seed(16)
    worse = good + 1.5 * torch.randn(good.shape, generator=g)  # the same cell, a noisier scorer
    ranks_good, ranks_worse = compute_ranks(good, c2i), compute_ranks(worse, c2i)
    for key in BOOTSTRAP_KEYS:
        same = paired_bootstrap(ranks_good, ranks_good, c2i, key=key, n_resamples=200)
        assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "significant": False}
    better = paired_bootstrap(ranks_good, ranks_worse, c2i, n_resamples=500)
    want = retrieval_metrics(good, c2i)["rsum"] - retrieval_metrics(worse, c2i)["rsum"]
    assert better["diff"] == pytest.approx(want) and better["diff"] > 0
    assert better["significant"] is True and 0 < better["lo"] <= better["diff"] <= better["hi"]
    reverse = paired_bootstrap(ranks_worse, ranks_good, c2i, n_resamples=500)
    assert reverse["significant"] is True and reverse["hi"] < 0
    assert reverse["lo"] == pytest.approx(-better["hi"]) and reverse["hi"] == pytest.approx(-better["lo"])


def test_paired_bootstrap_matches_reference_and_rsum_diff_is_sum_of_recall_diffs():
    counts = [5, 6, 7, 6, 5, 7, 6, 5, 6, 7, 5, 6, 7, 6]  # 14 images: R@10 is not always 100
    sims_a, c2i = _random_case(len(counts), counts, seed=17, ints=4)
    sims_b, _ = _random_case(len(counts), counts, seed=18, ints=3)
    ranks_a, ranks_b = compute_ranks(sims_a, c2i), compute_ranks(sims_b, c2i)
    draws = _replayed_draws(len(counts), 60, seed=3)
    ref_a = slow_resampled_metrics(ranks_a, c2i, draws)
    ref_b = slow_resampled_metrics(ranks_b, c2i, draws)
    recalls = [k for k in BOOTSTRAP_KEYS if k != "rsum"]
    assert all(any(ma[k] != mb[k] for ma, mb in zip(ref_a, ref_b)) for k in recalls)  # every key is exercised
    for ma, mb in zip(ref_a, ref_b):  # per resample: the rsum difference is the sum of the recall differences
        assert ma["rsum"] - mb["rsum"] == pytest.approx(sum(ma[k] - mb[k] for k in recalls), abs=1e-9)
    for k in BOOTSTRAP_KEYS:
        got = paired_bootstrap(ranks_a, ranks_b, c2i, key=k, n_resamples=60, confidence=0.8, seed=3)
        lo, hi = _interval([ma[k] - mb[k] for ma, mb in zip(ref_a, ref_b)], 0.8)
        assert (got["lo"], got["hi"]) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9)), k
        assert got["diff"] == pytest.approx(metrics_of(*brute_force_ranks(sims_a, c2i)[:2])[k]
                                            - metrics_of(*brute_force_ranks(sims_b, c2i)[:2])[k], abs=1e-9)
    # the module's own per-resample values: rsum column = sum of the six recall columns, for the differences too
    hits = [metrics_module._per_image_hits(*r, torch.tensor(c2i)) for r in (ranks_a, ranks_b)]
    va, vb = metrics_module._bootstrap_values(hits, 60, 3)
    d = va - vb
    torch.testing.assert_close(d[:, 6], d[:, :6].sum(1), rtol=0, atol=1e-9)
    ref_d = torch.tensor([[ma[k] - mb[k] for k in BOOTSTRAP_KEYS] for ma, mb in zip(ref_a, ref_b)], dtype=d.dtype)
    torch.testing.assert_close(d, ref_d, rtol=0, atol=1e-9)


def test_bootstrap_argument_errors():
    sims, c2i = _random_case(6, 5, seed=19)
    ranks = compute_ranks(sims, c2i)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match=rf"`n_resamples` must be a positive int, but got {bad!r}"):
            bootstrap_from_ranks(*ranks, c2i, n_resamples=bad)
    for bad in (0, 1, 1.2, -0.5, "0.9", None):
        with pytest.raises(ValueError, match=r"`confidence` must be a number in \(0, 1\), e\.g\. 0\.95"):
            bootstrap_intervals(sims, c2i, confidence=bad)
    with pytest.raises(ValueError, match=r"`seed` must be an int, but got 0\.5"):
        paired_bootstrap(ranks, ranks, c2i, seed=0.5)
    with pytest.raises(ValueError, match=r"`caption_to_image` must be 1-D.*N_cap=30, the length of `r_t2i`.*\(29,\)"):
        bootstrap_from_ranks(*ranks, c2i[:29])
    with pytest.raises(ValueError, match=r"indices in \[0, 5\) \(N_img = the length of `r_i2t`\)"):
        bootstrap_from_ranks(ranks[0][:5], ranks[1], c2i)
    with pytest.raises(ValueError, match=r"`r_t2i` must hold 1-based ranks"):
        bootstrap_from_ranks(ranks[0], ranks[1] * 0, c2i)
    with pytest.raises(ValueError, match=r"`key` must be one of i2t_r1, .*rsum, but got 'i2t_medr'"):
        paired_bootstrap(ranks, ranks, c2i, key="i2t_medr")
    with pytest.raises(ValueError, match=r"`ranks_b` must be a pair \(r_i2t, r_t2i\)"):
        paired_bootstrap(ranks, ranks[0], c2i)
    with pytest.raises(ValueError, match=r"`ranks_b\[1\]` must hold integer 1-based ranks.*float32"):
        paired_bootstrap(ranks, (ranks[0], ranks[1].float()), c2i)
    other = compute_ranks(sims[:, :25], c2i[:25])
    with pytest.raises(ValueError, match=r"`caption_to_image` must be 1-D.*N_cap=25, the length of `ranks_b\[1\]`"):
        paired_bootstrap(ranks, other, c2i)


def test_robustness_summaries():
    assert relative_robustness(400.0, [300.0, 200.0]) == pytest.approx(250 / 400)
    assert relative_robustness(400.0, 250.0) == pytest.approx(250 / 400)
    assert mmi(400.0, [300.0, 200.0]) == pytest.approx(1 - 250 / 400)
    model = {"gaussian_noise": [500.0, 400.0], "jpeg_compression": [550.0, 500.0]}
    base = {"gaussian_noise": [400.0, 300.0], "jpeg_compression": [500.0, 400.0], "fog": [1.0, 2.0]}
    expected = 100 * ((100 + 200) / (200 + 300) + (50 + 100) / (100 + 200)) / 2
    assert mce(model, base) == pytest.approx(expected)
    assert mce(base, base) == pytest.approx(100.0)
    with pytest.raises(ValueError, match=r"`baseline_rsums` lacks corruption\(s\) \['snow'\]"):
        mce({"snow": [1.0]}, base)
    with pytest.raises(ValueError, match=r"has 1 severities but `baseline_rsums` has 2"):
        mce({"fog": [1.0]}, base)
    with pytest.raises(ValueError, match=r"`clean_rsum` must be in \(0, 600\], but got 0"):
        mmi(0.0, [1.0])
    with pytest.raises(ValueError, match=r"`corrupted_rsums` must hold rsums in \[0, 600\], but got 700"):
        relative_robustness(500.0, [700.0])
    with pytest.raises(ValueError, match=r"baseline's error is 0"):
        mce({"fog": [600.0]}, {"fog": [600.0]})


def test_metric_info_covers_all_keys_with_sort_order():
    for k in METRIC_KEYS:
        assert METRIC_INFO[k]["higher_is_better"] is (not k.endswith(("medr", "meanr")))
    assert set(BOOTSTRAP_KEYS) <= set(METRIC_KEYS)
    assert METRIC_INFO["mce"]["higher_is_better"] is False
    assert METRIC_INFO["mmi"]["higher_is_better"] is False
    assert METRIC_INFO["relative_robustness"]["higher_is_better"] is True


def test_docstring_examples():
    import doctest

    result = doctest.testmod(metrics_module)
    assert result.attempted > 0 and result.failed == 0


def test_float_dtypes_agree():
    sims, c2i = _random_case(10, 3, seed=9)
    ref = retrieval_metrics(sims.double(), c2i)
    _assert_close(retrieval_metrics(sims, c2i), ref)
    assert all(math.isfinite(v) for v in ref.values())
