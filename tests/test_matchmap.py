"""The `matchmap` method: similarity modes, DAVEnet sampled loss, chunking, localization heatmaps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rcit_bench.models.matchmap import MatchMap, sampled_margin_loss, word_heatmaps
from rcit_bench.models.registry import build_method, list_methods, tiny_config


def _model(**over) -> MatchMap:
    torch.manual_seed(0)
    cfg = tiny_config("matchmap")
    cfg.update(over)
    return build_method("matchmap", **cfg).eval()


def _batch(b: int = 5, length: int = 7, size: int = 32):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 40, (b, length), generator=g)
    tokens[:, 0] = 1
    lengths = torch.tensor([length, 3, 5, length, 4][:b])
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = 2
        tokens[i, n:] = 0
    return torch.rand(b, 3, size, size, generator=g), tokens, lengths


def test_registered_with_tiny_config() -> None:
    assert "matchmap" in list_methods()
    assert tiny_config("matchmap")["embed_dim"] == 32


@pytest.mark.parametrize("mode", ["misa", "sisa", "sima"])
def test_similarity_matches_reference(mode: str) -> None:
    model = _model(sim_mode=mode)
    images, tokens, lengths = _batch()
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens, lengths)
        sims = model.similarity(img, txt)
    cells, words = img["local"], txt["words"]  # (N, C, D), (M, L, D)
    assert torch.allclose(cells.norm(dim=-1), torch.ones(cells.shape[:2]), atol=1e-5)
    ref = torch.empty(len(cells), len(words))
    for i in range(len(cells)):
        for j in range(len(words)):
            mm = cells[i] @ words[j, : lengths[j]].T  # (C, L_j)
            ref[i, j] = {"misa": mm.max(0).values.mean(), "sisa": mm.mean(), "sima": mm.max(1).values.mean()}[mode]
    assert torch.allclose(sims, ref, atol=1e-5)


def test_chunked_equals_unchunked() -> None:
    model = _model()
    images, tokens, lengths = _batch()
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens, lengths)
        model.hparams.memory_budget_mb = 1e6
        full = model.similarity(img, txt)
        model.hparams.memory_budget_mb = 1e-4  # one pair per block
        tiny = model.similarity(img, txt)
    assert torch.equal(full, tiny)


def test_bad_options_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`sim_mode`.*Did you mean 'misa'"):
        _model(sim_mode="mysa")
    with pytest.raises(ValueError, match=r"`loss`.*'triplet', 'sampled', 'both'"):
        _model(loss="hinge")


def test_sampled_loss_values() -> None:
    b, margin = 6, 1.0
    easy = torch.eye(b) * 5.0  # positives beat every impostor by more than the margin
    assert sampled_margin_loss(easy, margin).item() == 0.0
    flat = torch.zeros(b, b)  # every impostor ties the positive: each direction costs the margin
    assert sampled_margin_loss(flat, margin).item() == pytest.approx(2 * margin)
    # pairs sharing an image are never impostors: make them very similar, the others 0
    image_index = torch.tensor([0, 0, 1, 1, 2, 2])
    same = image_index[:, None] == image_index[None, :]
    sims = same.float() * 10.0 - torch.eye(b) * 10.0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert sampled_margin_loss(sims, margin, same, generator=g).item() == pytest.approx(2 * margin)


@pytest.mark.parametrize("loss", ["triplet", "sampled", "both"])
def test_training_loss_logs_and_decreases(loss: str) -> None:
    model = _model(loss=loss).train()
    images, tokens, lengths = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = {"images": images, "tokens": tokens, "lengths": lengths, "image_index": torch.arange(5)}
    values = []
    for _ in range(5):
        value, logs = model.compute_loss(batch)
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(value.item())
    assert set(logs) == {"triplet", "sampled"} if loss == "both" else {loss}
    assert values[-1] < values[0]


def test_localize_shape_and_padding() -> None:
    model = _model()
    images, tokens, lengths = _batch(size=40)
    heat = model.localize(images[1], tokens[1])
    assert heat.shape == (tokens.shape[1], 40, 40)
    batch = model.localize_batch(images, tokens, lengths)
    assert batch.shape == (5, tokens.shape[1], 40, 40)
    assert torch.all(batch[1, lengths[1]:] == 0) and batch[1, : lengths[1]].abs().sum() > 0
    # localize of the unpadded caption equals its row of the batched call (padding does not leak in)
    assert torch.allclose(batch[1, : lengths[1]], model.localize(images[1], tokens[1, : lengths[1]]), atol=1e-5)


def test_planted_correlation_peaks_in_planted_cell(monkeypatch) -> None:
    model = _model()
    side, size, d = 4, 32, 16
    planted = [5, 0, 15, 10]  # word t correlates with cell planted[t]
    cells = torch.eye(side * side, d).unsqueeze(0) * 0.5 + 0.01  # (1, 16, D): cell c = basis vector c
    words = torch.stack([F.one_hot(torch.tensor(c), d).float() for c in planted]).unsqueeze(0)  # (1, 4, D)
    monkeypatch.setattr(model, "encode_image", lambda images: {"local": cells})
    monkeypatch.setattr(model, "encode_text", lambda tokens, lengths: {"words": words, "lengths": lengths})
    heat = model.localize(torch.rand(3, size, size), torch.zeros(len(planted), dtype=torch.long))
    assert heat.shape == (len(planted), size, size)
    cell_px = size // side
    for t, c in enumerate(planted):
        flat = int(heat[t].argmax())
        y, x = divmod(flat, size)
        assert (y // cell_px, x // cell_px) == divmod(c, side), (t, c, y, x)


def test_word_heatmaps_upsampling_keeps_grid_values() -> None:
    cells = torch.randn(2, 9, 4)
    words = torch.randn(2, 3, 4)
    heat = word_heatmaps(cells, words, (3, 3), (3, 3))  # no resize: exact matchmap values
    ref = torch.einsum("pcd,pld->plc", cells, words).reshape(2, 3, 3, 3)
    assert torch.allclose(heat, ref, atol=1e-6)


def test_localize_rejects_non_square_grid(monkeypatch) -> None:
    model = _model()
    monkeypatch.setattr(model, "encode_image", lambda images: {"local": torch.randn(1, 6, 32)})
    with pytest.raises(ValueError, match="square grid"):
        model.localize(torch.rand(3, 32, 32), torch.tensor([1, 5, 2]))
