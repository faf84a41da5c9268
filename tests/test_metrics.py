"""Retrieval metrics vs brute-force references written here, torchmetrics' RetrievalHitRate, and error messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rcit_bench.metrics import (
    METRIC_INFO,
    METRIC_KEYS,
    coco_1k_metrics,
    mce,
    mmi,
    relative_robustness,
    retrieval_metrics,
)


def brute_force_metrics(sims: torch.Tensor, c2i: list[int]) -> dict[str, float]:
    """Reference: python loops, rank = 1 + #strictly greater, i2t best over captions, numpy median/mean."""
    s = sims.tolist()
    n_img, n_cap = len(s), len(s[0])
    i2t = []
    for i in range(n_img):
        best = None
        for c in range(n_cap):
            if c2i[c] != i:
                continue
            r = 1 + sum(1 for c2 in range(n_cap) if s[i][c2] > s[i][c])
            best = r if best is None else min(best, r)
        i2t.append(best)
    t2i = []
    for c in range(n_cap):
        own = s[c2i[c]][c]
        t2i.append(1 + sum(1 for i in range(n_img) if s[i][c] > own))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)))
        out[f"{name}_meanr"] = float(np.floor(np.mean(ranks)))
    return out


def argsort_metrics(sims: torch.Tensor, c2i: list[int]) -> dict[str, float]:
    """Second reference for tie-free inputs: full argsort, VSE++-style position lookup."""
    order_i2t = torch.argsort(sims, dim=1, descending=True)  # (N_img, N_cap)
    i2t = []
    for i in range(sims.shape[0]):
        positions = [p for p, c in enumerate(order_i2t[i].tolist()) if c2i[c] == i]
        i2t.append(min(positions) + 1)
    order_t2i = torch.argsort(sims.T, dim=1, descending=True)  # (N_cap, N_img)
    t2i = [order_t2i[c].tolist().index(c2i[c]) + 1 for c in range(sims.shape[1])]
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)))
        out[f"{name}_meanr"] = float(np.floor(np.mean(ranks)))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def _assert_close(got: dict, ref: dict) -> None:
    assert list(got) == list(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k


def _random_case(n_img: int, caps_per_img: list[int] | int, seed: int, shuffle: bool = True):
    g = torch.Generator().manual_seed(seed)
    counts = [caps_per_img] * n_img if isinstance(caps_per_img, int) else caps_per_img
    c2i = [i for i, n in enumerate(counts) for _ in range(n)]
    if shuffle:
        perm = torch.randperm(len(c2i), generator=g).tolist()
        c2i = [c2i[p] for p in perm]
    c2i_t = torch.tensor(c2i)
    # correlated scores so recalls are neither 0 nor 100
    sims = torch.randn(n_img, len(c2i), generator=g) + 1.5 * torch.nn.functional.one_hot(c2i_t, n_img).T
    return sims, c2i


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_shuffled_captions(chunk_size, seed):
    sims, c2i = _random_case(23, 5, seed)
    got = retrieval_metrics(sims, torch.tensor(c2i), chunk_size=chunk_size)
    _assert_close(got, brute_force_metrics(sims, c2i))
    _assert_close(got, argsort_metrics(sims, c2i))
    assert 0 < got["rsum"] < 600


def test_variable_caption_counts_including_six():
    counts = [5, 6, 7, 1, 6, 5, 2, 6, 5, 5, 6]
    sims, c2i = _random_case(len(counts), counts, seed=3)
    got = retrieval_metrics(sims, c2i, chunk_size=4)  # list input accepted too
    _assert_close(got, brute_force_metrics(sims, c2i))


def test_ties_are_counted_optimistically_and_order_independent():
    g = torch.Generator().manual_seed(5)
    sims = torch.randint(0, 3, (9, 27), generator=g).float()  # many ties
    c2i = [c % 9 for c in range(27)]
    got = retrieval_metrics(sims, torch.tensor(c2i), chunk_size=2)
    _assert_close(got, brute_force_metrics(sims, c2i))
    # permuting the captions (columns together with their index) changes nothing
    perm = torch.randperm(27, generator=g)
    got_perm = retrieval_metrics(sims[:, perm], torch.tensor(c2i)[perm])
    _assert_close(got_perm, got)
    # all-equal scores: every query ranks first under the strictly-greater policy
    flat = retrieval_metrics(torch.zeros(4, 8), torch.arange(8) % 4)
    assert flat["rsum"] == 600.0 and flat["i2t_medr"] == 1.0 and flat["t2i_meanr"] == 1.0


def test_hand_computed_tiny_example():
    # images 0,1,2; captions: c0->0, c1->0, c2->1, c3->2
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
    assert m["i2t_meanr"] == 2.0  # floor(8 / 3)
    assert m["t2i_medr"] == 3.0  # median of [3, 1, 3, 3]
    assert m["t2i_meanr"] == 2.0  # floor(10 / 4)


def test_median_of_even_count_is_floored_mean_of_middle_pair():
    # t2i ranks [1, 1, 4, 4] -> median 2.5 -> 2 (a lower-median implementation would give 1)
    sims = torch.zeros(4, 4)
    c2i = torch.tensor([0, 1, 2, 3])
    sims[0, 0] = sims[1, 1] = 1.0  # captions 0, 1 rank 1
    sims[:, 2] = torch.tensor([1.0, 2.0, 0.0, 3.0])  # caption 2 -> image 2 at rank 4
    sims[:, 3] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # caption 3 -> image 3 at rank 4
    m = retrieval_metrics(sims, c2i)
    assert m["t2i_medr"] == 2.0
    assert m["t2i_meanr"] == 2.0  # floor(10 / 4)


def test_against_torchmetrics_hit_rate():
    from torchmetrics.retrieval import RetrievalHitRate

    g = torch.Generator().manual_seed(11)
    n_img, per = 12, 5
    c2i = torch.randperm(n_img * per, generator=g) % n_img
    # strictly positive, tie-free scores (some torchmetrics versions drop non-positive predictions)
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
    sims, c2i = _random_case(folds * fold_size, counts, seed=7)
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
        (torch.zeros(2, 3), torch.tensor([0, 1]), r"`caption_to_image` must be 1-D.*N_cap=3.*\(2,\)"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0, 1.0]), r"integer image indices.*float32"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 2]), r"indices in \[0, 2\).*values in \[0, 2\]"),
        (torch.zeros(2, 3), torch.tensor([-1, 1, 1]), r"indices in \[0, 2\).*values in \[-1, 1\]"),
        (torch.zeros(3, 3), torch.tensor([0, 2, 2]), r"1 image\(s\) have none.*first: \[1\]"),
        (torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), torch.tensor([0, 1]), r"contains NaN"),
    ],
)
def test_input_errors(sims, c2i, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sims, c2i)


def test_chunk_size_error():
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive int.*0"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 1]), chunk_size=0)


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
    assert METRIC_INFO["mce"]["higher_is_better"] is False
    assert METRIC_INFO["mmi"]["higher_is_better"] is False
    assert METRIC_INFO["relative_robustness"]["higher_is_better"] is True


def test_docstring_examples():
    import doctest

    import rcit_bench.metrics as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_float_dtypes_and_math_floor_consistency():
    sims, c2i = _random_case(10, 3, seed=9)
    ref = retrieval_metrics(sims.double(), c2i)
    _assert_close(retrieval_metrics(sims, c2i), ref)
    assert all(math.isfinite(v) for v in ref.values())
