"""The `matchmap` method: similarity modes, DAVEnet sampled loss, chunking, localization heatmaps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rcit_bench.models.matchmap import MatchMap, sampled_margin_loss, word_heatmaps
from rcit_bench.models.registry import get_method_class
from conftest import WordVocab, caption_batch, tiny_model


def test_registered_tiny_model_shapes() -> None:
    assert get_method_class("matchmap") is MatchMap
    model = tiny_model("matchmap")
    images, tokens, lengths = caption_batch()
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens, lengths)
    assert set(img) == {"local"} and set(txt) == {"words", "lengths"}
    # tiny config: 32 px, channels [8, 16, 32], stem stride 1 -> two stride-2 convs -> an 8 x 8 grid; embed_dim 32
    assert img["local"].shape == (5, 64, 32)
    assert txt["words"].shape == (5, 7, 32) and torch.equal(txt["lengths"], lengths)
    # normalize=True: unit cells, unit valid words, zero padded words
    assert torch.allclose(img["local"].norm(dim=-1), torch.ones(5, 64), atol=1e-5)
    assert torch.allclose(txt["words"][1, :3].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.all(txt["words"][1, 3:] == 0)


@pytest.mark.parametrize("mode", ["misa", "sisa", "sima"])
def test_similarity_matches_reference(mode: str) -> None:
    model = tiny_model("matchmap", sim_mode=mode)
    images, tokens, lengths = caption_batch()
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


def test_bad_options_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`sim_mode`.*Did you mean 'misa'"):
        tiny_model("matchmap", sim_mode="mysa")
    with pytest.raises(ValueError, match=r"`loss`.*'triplet', 'sampled', 'both'"):
        tiny_model("matchmap", loss="hinge")


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
    model = tiny_model("matchmap", loss=loss).train()
    images, tokens, lengths = caption_batch()
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
    model = tiny_model("matchmap")
    images, tokens, lengths = caption_batch(size=40)
    heat = model.localize(images[1], tokens[1])
    assert heat.shape == (tokens.shape[1], 40, 40)
    batch = model.localize_batch(images, tokens, lengths)
    assert batch.shape == (5, tokens.shape[1], 40, 40)
    assert torch.all(batch[1, lengths[1]:] == 0) and batch[1, : lengths[1]].abs().sum() > 0
    # localize of the unpadded caption equals its row of the batched call (padding does not leak in)
    assert torch.allclose(batch[1, : lengths[1]], model.localize(images[1], tokens[1, : lengths[1]]), atol=1e-5)


def test_planted_correlation_peaks_in_planted_cell(monkeypatch) -> None:
    model = tiny_model("matchmap")
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
    model = tiny_model("matchmap")
    monkeypatch.setattr(model, "encode_image", lambda images: {"local": torch.randn(1, 6, 32)})
    with pytest.raises(ValueError, match="square grid"):
        model.localize(torch.rand(3, 32, 32), torch.tensor([1, 5, 2]))


# ---- pointing game chance baselines ----


def test_pointing_chance_hand_values_and_consistency_with_hits() -> None:
    from rcit_bench.localization import pointing_chance, pointing_hits

    h, w = 5, 7  # not square: the centre pixel is (y=2, x=3), its centre (x, y) = (3.5, 2.5)
    boxes = torch.tensor([
        [3.0, 2.0, 4.0, 3.0],  # exactly the centre pixel: 1 x 1 pixels
        [0.0, 0.0, 3.5, 2.5],  # x1 = 3.5 excludes the centre (open edge); x in {0,1,2}, y in {0,1}: 6 px
        [0.6, 0.0, 7.0, 5.0],  # x0 = .6 drops column 0: 6 x 5 px
        [-2.0, -2.0, 0.5, 0.5],  # no pixel centre inside
        [2.0, 3.0, 5.0, 4.0],  # x in {2,3,4}, y = 3: misses the centre (would hit with H and W swapped)
        [-1.0, -1.0, 10.0, 10.0],  # the whole grid
    ])
    centre, rand = pointing_chance(boxes, (h, w))
    assert centre.tolist() == [True, False, True, False, False, True]
    assert rand.tolist() == pytest.approx([1 / 35, 6 / 35, 30 / 35, 0.0, 3 / 35, 1.0], abs=1e-12)
    # the same rule as the model's hits: a heatmap peaking at the centre pixel, or at each pixel in turn
    k = len(boxes)
    peak = torch.zeros(1, 1, h, w)
    peak[0, 0, h // 2, w // 2] = 1.0
    zeros = torch.zeros(k, dtype=torch.long)
    assert torch.equal(pointing_hits(peak, zeros, zeros, boxes), centre)
    every = torch.eye(h * w).view(h * w, 1, h, w)  # pair p peaks at pixel p
    count = sum(pointing_hits(every, torch.full((k,), p), zeros, boxes).double() for p in range(h * w))
    assert torch.equal(count / (h * w), rand)


def test_pointing_game_returns_chance_baselines_on_tiny_matchmap() -> None:
    from rcit_bench.data.captions import CaptionSplit
    from rcit_bench.localization import pointing_game

    size = 32
    tokens = [["red", "blue"], ["a", "big", "blue"], ["green"]]
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(2, 3, size, size, generator=g) * 255).to(torch.uint8)
    anns = [
        {"objects": [{"box": [0, 0, 16, 16]}, {"box": [8, 8, 24, 20]}],
         "captions": [{"word_objects": [[0, 0], [1, 1]]}, {"word_objects": [[2, 1]]}]},
        {"objects": [{"box": [17, 0, 32, 32]}], "captions": [{"word_objects": [[0, 0]]}]},
    ]
    split = CaptionSplit(image_ids=[10, 11], captions=[" ".join(t) for t in tokens], tokens=tokens,
                         caption_to_image=[0, 0, 1], source=lambda i, size=None: pixels[i], annotations=anns,
                         name="tiny/test")
    vocab = WordVocab(["red", "blue", "a", "big", "green"])  # inside the tiny model's 40 ids
    out = pointing_game(tiny_model("matchmap"), split, vocab=vocab, batch_size=2)
    assert set(out) == {"accuracy", "centre_accuracy", "random_accuracy", "n"}
    assert out["n"] == 4 and 0.0 <= out["accuracy"] <= 100.0
    # centre pixel (16, 16), centre (16.5, 16.5): outside [0, 16)^2, inside [8, 24) x [8, 20) twice, outside
    # x in [17, 32): 2 of 4. Pixels inside: 256, 192 (twice), 15 * 32 = 480 of 1024 each
    assert out["centre_accuracy"] == pytest.approx(50.0)
    assert out["random_accuracy"] == pytest.approx(100.0 * (256 + 192 + 192 + 480) / 1024 / 4)
