"""Losses vs independent loop references written here; gradient reversal; GRL schedule; caption NLL."""

from __future__ import annotations

import math

import pytest
import torch

from rcit_bench.models.losses import (
    GradientReversal,
    caption_nll_loss,
    grad_reverse,
    grl_lambda,
    modality_adversarial_loss,
    triplet_ranking_loss,
)


def ref_triplet(sims: torch.Tensor, margin: float, max_violation: bool) -> float:
    """VSE++ ContrastiveLoss written as loops: row anchors vs other columns, column anchors vs other rows."""
    s = sims.tolist()
    b = len(s)
    total = 0.0
    for i in range(b):  # anchor row i (e.g. image i), negatives = other columns j
        costs = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(b) if j != i]
        total += (max(costs) if max_violation else sum(costs)) if costs else 0.0
    for j in range(b):  # anchor column j (caption j), negatives = other rows i
        costs = [max(0.0, margin + s[i][j] - s[j][j]) for i in range(b) if i != j]
        total += (max(costs) if max_violation else sum(costs)) if costs else 0.0
    return total


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("margin", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_loop_reference(max_violation, margin, seed):
    g = torch.Generator().manual_seed(seed)
    sims = torch.rand(7, 7, generator=g) * 2 - 1
    got = triplet_ranking_loss(sims, margin=margin, max_violation=max_violation)
    assert float(got) == pytest.approx(ref_triplet(sims, margin, max_violation), abs=1e-5)


def test_triplet_edge_cases():
    # perfectly separated beyond the margin: zero loss
    sims = torch.full((4, 4), -1.0).fill_diagonal_(1.0)
    assert float(triplet_ranking_loss(sims, margin=0.2)) == 0.0
    # exactly at the margin: hinge is 0 (not counted)
    sims = torch.full((3, 3), 0.8).fill_diagonal_(1.0)
    assert float(triplet_ranking_loss(sims, margin=0.2, max_violation=False)) == pytest.approx(0.0, abs=1e-6)
    # all equal: every negative violates by exactly the margin; max: 2 * B * margin, sum: 2 * B * (B-1) * margin
    sims = torch.zeros(5, 5)
    assert float(triplet_ranking_loss(sims, margin=0.3)) == pytest.approx(2 * 5 * 0.3)
    assert float(triplet_ranking_loss(sims, margin=0.3, max_violation=False)) == pytest.approx(2 * 5 * 4 * 0.3)
    # batch of one has no negatives
    assert float(triplet_ranking_loss(torch.tensor([[0.3]]))) == 0.0


def test_triplet_on_non_symmetric_cross_matrix():
    """RCIT's L(CI, I) scores corrupted against clean images: S is not symmetric, each direction counts once."""
    # hand values, margin 0.2: row 0's hardest negative 0.9 costs 0.6, row 1's costs nothing; column 1's
    # anchor S[1, 1] = 0.5 against S[0, 1] = 0.9 costs 0.6, column 0's nothing
    sims = torch.tensor([[0.5, 0.9], [0.1, 0.5]])
    assert float(triplet_ranking_loss(sims, margin=0.2)) == pytest.approx(1.2)
    assert float(triplet_ranking_loss(sims, margin=0.2, max_violation=False)) == pytest.approx(1.2)
    g = torch.Generator().manual_seed(3)
    sims = torch.randn(6, 6, generator=g)
    assert not torch.allclose(sims, sims.T)
    for margin, hardest in ((0.2, True), (0.5, False)):
        got = float(triplet_ranking_loss(sims, margin=margin, max_violation=hardest))
        assert got == pytest.approx(ref_triplet(sims, margin, hardest), abs=1e-5)
        # swapping the two sides swaps the two directions: the same total
        assert float(triplet_ranking_loss(sims.T, margin=margin, max_violation=hardest)) == pytest.approx(got, abs=1e-5)


def test_triplet_gradient_hits_only_hardest_negatives():
    sims = torch.tensor([[0.5, 0.6, 0.1], [0.2, 0.5, 0.45], [0.55, 0.3, 0.5]], requires_grad=True)
    triplet_ranking_loss(sims).backward()
    # rows: hardest (0,1) cost .3, (1,2) .15, (2,0) .25; columns: hardest (2,0), (0,1), (1,2): each counted twice
    expected = torch.tensor([[-2.0, 2.0, 0.0], [0.0, -2.0, 2.0], [2.0, 0.0, -2.0]])
    assert torch.equal(sims.grad, expected)
    assert float(triplet_ranking_loss(sims.detach())) == pytest.approx(2 * (0.3 + 0.15 + 0.25))


def test_triplet_rejects_non_square():
    with pytest.raises(ValueError, match=r"`sims` must be a square \(B, B\) matrix.*\(3, 4\)"):
        triplet_ranking_loss(torch.zeros(3, 4))


@pytest.mark.parametrize("lambd", [0.0, 0.5, 2.0])
def test_gradient_reversal_flips_and_scales(lambd):
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    y = grad_reverse(x, lambd)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.allclose(x.grad, -lambd * upstream)
    x2 = torch.randn(2, requires_grad=True)
    GradientReversal.apply(x2, 3.0).sum().backward()
    assert torch.equal(x2.grad, torch.full((2,), -3.0))


def test_grl_lambda_schedule():
    assert grl_lambda(0.0) == 0.0
    assert grl_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_lambda(0.2) < grl_lambda(0.4) < grl_lambda(1.0) < 1.0
    with pytest.raises(ValueError, match=r"`progress` must be the training progress in \[0, 1\], but got 1.5"):
        grl_lambda(1.5)


def test_modality_adversarial_loss_and_accuracy():
    logits_img = torch.tensor([2.0, -1.0, 0.5])
    logits_txt = torch.tensor([[-3.0], [0.7]])
    loss, acc = modality_adversarial_loss(logits_img, logits_txt)

    def bce(z, y):
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    ref = (bce(2.0, 1) + bce(-1.0, 1) + bce(0.5, 1) + bce(-3.0, 0) + bce(0.7, 0)) / 5
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert acc.dtype == torch.float32 and float(acc) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match=r"`logits_txt` must have shape \(B,\) or \(B, 1\)"):
        modality_adversarial_loss(logits_img, torch.zeros(2, 2))


def test_caption_nll_matches_manual_and_ignores_padding():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 11, generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    lengths = torch.tensor([5, 2, 3])
    targets[1, 2:] = -100  # padding may hold any id
    total, count = 0.0, 0
    for b in range(3):
        for t in range(int(lengths[b])):
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[targets[b, t]])
            count += 1
    got = caption_nll_loss(logits, targets, lengths)
    assert float(got) == pytest.approx(total / count, rel=1e-5)
    logits2 = logits.clone()
    logits2[1, 3] += 100.0  # changing a padded position's logits changes nothing
    assert float(caption_nll_loss(logits2, targets, lengths)) == pytest.approx(float(got), rel=1e-6)
    with pytest.raises(ValueError, match=r"`lengths` must be in \[1, T=5\].*\[0, 5\]"):
        caption_nll_loss(logits, targets, torch.tensor([5, 0, 3]))
    with pytest.raises(ValueError, match=r"`targets` must be \(B, T\)"):
        caption_nll_loss(logits, targets[:, :4], lengths)


def test_caption_nll_reductions_sum_and_per_token():
    """'sum' and 'none' against per-token loops; the global mean under DDP is sum of sums over the token count, and
    the default 'mean' is the very same number as before (``nll[valid].mean()``)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, 9, generator=g)
    targets = torch.randint(0, 9, (4, 6), generator=g)
    lengths = torch.tensor([6, 1, 4, 2])
    per_token = torch.zeros(4, 6, dtype=torch.float64)
    for b in range(4):
        for t in range(int(lengths[b])):
            row = logits[b, t].double()
            per_token[b, t] = torch.logsumexp(row, 0) - row[targets[b, t]]
    none = caption_nll_loss(logits, targets, lengths, reduction="none")
    assert none.shape == (4, 6) and torch.equal(none[1, 1:], torch.zeros(5))  # padding contributes 0
    torch.testing.assert_close(none.double(), per_token, rtol=1e-5, atol=1e-6)
    total = caption_nll_loss(logits, targets, lengths, reduction="sum")
    assert float(total) == pytest.approx(float(per_token.sum()), rel=1e-5)
    mean = caption_nll_loss(logits, targets, lengths)
    assert torch.equal(mean, caption_nll_loss(logits, targets, lengths, reduction="mean"))
    valid = torch.arange(6)[None, :] < lengths[:, None]
    logp = torch.log_softmax(logits, dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)
    assert torch.equal(mean, (-logp)[valid].mean())  # the expression used before `reduction` existed
    # two "ranks" of 2 captions: sum of per-caption sums over the token count = the mean over all 4 captions
    halves = [caption_nll_loss(logits[s], targets[s], lengths[s], reduction="none").sum(1) for s in (slice(0, 2),
                                                                                                     slice(2, 4))]
    assert float(torch.cat(halves).sum() / lengths.sum()) == pytest.approx(float(mean), rel=1e-6)
    with pytest.raises(ValueError, match=r"`reduction` must be one of 'mean', 'sum', 'none', but got 'avg'"):
        caption_nll_loss(logits, targets, lengths, reduction="avg")
