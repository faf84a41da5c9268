"""VSRN layers (reasoning block, caption decoder) and the `vsrpp` method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rcit_bench.models.layers import AttentionCaptionDecoder, ReasoningBlock, RegionReasoning
from conftest import caption_batch, tiny_model


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Independent reference of the heads' l2 normalisation (no zero vectors in these inputs)."""
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- layers
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reasoning_block_is_identity_at_init(mode: str) -> None:
    torch.manual_seed(0)
    block = ReasoningBlock(16)
    getattr(block, mode)()
    v = torch.randn(3, 7, 16)
    out = block(v)
    assert out.shape == v.shape
    assert torch.equal(out, v)


def test_reasoning_block_matches_hand_formula_once_trained() -> None:
    torch.manual_seed(0)
    block = ReasoningBlock(8).eval()
    with torch.no_grad():  # make W_r non-trivial so the graph term matters
        block.w_r[1].weight.fill_(1.0)
        block.w_r[1].bias.fill_(0.5)
    v = torch.randn(2, 5, 8)
    out = block(v)
    # independent reference: R = theta(V)^T phi(V) / N ; V* = W_r(R g(V)) + V with Linear-equivalent 1x1 convs
    lin = lambda conv, x: x @ conv.weight.squeeze(-1).T + conv.bias  # noqa: E731
    theta, phi, g = lin(block.theta, v), lin(block.phi, v), lin(block.g, v)  # (B, N, D)
    r = theta @ phi.transpose(1, 2) / v.shape[1]  # (B, N, N)
    y = r @ g  # (B, N, D)
    bn = block.w_r[1]
    w = lin(block.w_r[0], y)
    w = (w - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(out, w + v, atol=1e-5)
    assert not torch.allclose(out, v)


def test_region_reasoning_shapes_and_normalisation() -> None:
    torch.manual_seed(0)
    head = RegionReasoning(12, n_blocks=4)
    assert len(head.blocks) == 4
    regions, vec = head(torch.randn(4, 9, 12))
    assert regions.shape == (4, 9, 12) and vec.shape == (4, 12)
    assert torch.allclose(regions.norm(dim=-1), torch.ones(4, 9), atol=1e-5)
    with pytest.raises(ValueError, match="n_blocks"):
        RegionReasoning(12, n_blocks=-1)


def test_region_reasoning_global_vector_is_last_gru_state() -> None:
    torch.manual_seed(0)
    head = RegionReasoning(6, n_blocks=2).eval()
    x = torch.randn(2, 4, 6)
    regions, vec = head(x)
    assert torch.allclose(regions, _unit(x), atol=1e-6)  # blocks are identity at init
    out, _ = head.rnn(regions)
    assert torch.allclose(vec, out[:, -1], atol=1e-6)


def test_caption_decoder_shapes_and_learns() -> None:
    torch.manual_seed(0)
    vocab, b, n, t = 11, 4, 6, 7
    dec = AttentionCaptionDecoder(vocab, region_dim=8, word_dim=8, hidden_dim=16, dropout=0.0)
    regions = torch.randn(b, n, 8)
    tokens = torch.randint(4, vocab, (b, t))
    logits = dec(regions, tokens[:, :-1])
    assert logits.shape == (b, t - 1, vocab)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(dec(regions, tokens[:, :-1]).reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- vsrpp method
from rcit_bench.models.registry import build_method, list_methods, tiny_config  # noqa: E402
from rcit_bench.models.similarity import scan_i2t, scan_t2i  # noqa: E402


def test_vsrpp_registered_and_rep_shapes() -> None:
    assert "vsrpp" in list_methods()
    model = tiny_model("vsrpp")
    images, tokens, lengths = caption_batch()
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens, lengths)
    assert img["global"].shape == (5, 32) and img["regions"].shape == (5, 64, 32)  # 32 px / stride 4 -> 8x8
    assert txt["words"].shape == (5, 7, 32) and torch.equal(txt["lengths"], lengths)
    assert torch.allclose(img["global"].norm(dim=-1), torch.ones(5), atol=1e-5)


@pytest.mark.parametrize("mu, branch", [(2.0, "t2i"), (0.5, "i2t")])
def test_fused_score_is_global_plus_mu_local(mu: float, branch: str) -> None:
    model = tiny_model("vsrpp", mu=mu, local_branch=branch)
    images, tokens, lengths = caption_batch()
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens, lengths)
        fused = model.similarity(img, txt)
        # independent pieces: cosine of the global vectors, SCAN with the paper's lambdas for the branch
        s_g = F.normalize(img["global"], dim=-1) @ F.normalize(txt["global"], dim=-1).T
        if branch == "t2i":
            s_l = scan_t2i(img["regions"], txt["words"], lengths, lambda1=9.0, lambda2=6.0)
        else:
            s_l = scan_i2t(img["regions"], txt["words"], lengths, lambda1=4.0, lambda2=5.0)
    assert fused.shape == (5, 5)
    assert torch.allclose(fused, s_g + mu * s_l, atol=1e-5)
    assert not torch.allclose(fused, s_g, atol=1e-3)


def test_local_regions_raw_vs_reasoned() -> None:
    images, _, _ = caption_batch()
    raw = tiny_model("vsrpp", local_regions="raw")
    with torch.no_grad():
        reps = raw.encode_image(images)
        ref = _unit(raw.image_encoder(images)["local"])
        full = raw._encode_image_full(images)
    assert torch.allclose(reps["regions"], ref, atol=1e-6)
    assert torch.allclose(full["reasoned"], ref, atol=1e-6)  # reasoning blocks start as identity
    with pytest.raises(ValueError, match=r"`local_regions`.*'reasoned', 'raw'"):
        tiny_model("vsrpp", local_regions="raws")
    with pytest.raises(ValueError, match=r"`local_branch`"):
        tiny_model("vsrpp", local_branch="t2t")


def test_caption_decoder_needs_vocab_size() -> None:
    cfg = tiny_config("vsrpp")
    cfg.update(vocab_size=None, text_encoder={"name": "bigru", "word_dim": 16})
    with pytest.raises(ValueError, match="vocab_size"):
        build_method("vsrpp", **cfg)


def test_vsrpp_losses_finite_and_decreasing() -> None:
    model = tiny_model("vsrpp").train()
    images, tokens, lengths = caption_batch()
    batch = {"images": images, "tokens": tokens, "lengths": lengths, "image_index": torch.arange(5)}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    caps, totals = [], []
    for _ in range(6):
        loss, logs = model.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        caps.append(float(logs["caption_nll"]))
        totals.append(loss.item())
    assert set(logs) == {"triplet", "caption_nll"}
    assert all(torch.isfinite(torch.tensor(totals)))
    assert caps[-1] < caps[0] and totals[-1] < totals[0]
    # the total is the triplet plus caption_weight (1.0 in the tiny config) times the caption NLL
    assert totals[-1] == pytest.approx(float(logs["triplet"]) + 1.0 * caps[-1], rel=1e-6)


def test_caption_loss_ignores_padding() -> None:
    model = tiny_model("vsrpp")
    images, tokens, lengths = caption_batch()
    with torch.no_grad():
        reasoned = model._encode_image_full(images)["reasoned"]
        a = model.caption_loss(reasoned, tokens, lengths)
        junk = tokens.clone()
        for i, n in enumerate(lengths.tolist()):
            junk[i, n:] = 7  # change only padding
        b = model.caption_loss(reasoned, junk, lengths)
    assert torch.isfinite(a) and torch.allclose(a, b)


def test_gru_last_state_matches_nn_gru_values_and_grads() -> None:
    from rcit_bench.models.layers import gru_last_state

    torch.manual_seed(0)
    rnn = torch.nn.GRU(6, 5, batch_first=True)
    x = torch.randn(3, 9, 6, requires_grad=True)
    ours = gru_last_state(rnn, x)
    ref = rnn(x)[1][-1]
    assert torch.allclose(ours, ref, atol=1e-6)
    g_ours = torch.autograd.grad(ours.sum(), [x, rnn.weight_hh_l0])
    g_ref = torch.autograd.grad(ref.sum(), [x, rnn.weight_hh_l0])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ours, g_ref))
    with pytest.raises(ValueError, match="unidirectional"):
        gru_last_state(torch.nn.GRU(6, 5, batch_first=True, bidirectional=True), x)
