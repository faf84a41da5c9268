"""The single evaluation path: encode, concatenate, order by index, similarity, metrics."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from rcit_bench.evaluation import cat_reps, encode_images, encode_texts, evaluate


class ToyModel(nn.Module):
    """Image rep = mean pixel colour; text rep = one-hot of the first token (ids 0..2) padded to words."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen_training: list[bool] = []

    def encode_image(self, images: Tensor) -> dict[str, Tensor]:
        self.seen_training.append(self.training)
        return {"global": images.mean(dim=(2, 3)) * self.scale}  # (B, 3)

    def encode_text(self, tokens: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        onehot = torch.nn.functional.one_hot(tokens[:, 0], 3).float()  # (B, 3)
        words = torch.nn.functional.one_hot(tokens, 3).float()  # (B, L, 3)
        return {"global": onehot, "words": words, "lengths": lengths}

    def similarity(self, image_reps: dict[str, Tensor], text_reps: dict[str, Tensor]) -> Tensor:
        assert set(image_reps) == {"global"}  # index entries are stripped before similarity
        return image_reps["global"] @ text_reps["global"].T


def _colour_images(order: list[int]) -> Tensor:
    """Image k is a flat image of colour channel k (3 images, 4x4)."""
    images = torch.zeros(len(order), 3, 4, 4)
    for row, k in enumerate(order):
        images[row, k] = 1.0
    return images


def test_cat_reps_pads_word_dim_and_keeps_lengths() -> None:
    a = {"words": torch.ones(2, 3, 4), "lengths": torch.tensor([3, 2]), "global": torch.ones(2, 4)}
    b = {"words": torch.full((1, 5, 4), 2.0), "lengths": torch.tensor([5]), "global": torch.zeros(1, 4)}
    out = cat_reps([a, b])
    assert out["words"].shape == (3, 5, 4)
    assert torch.all(out["words"][:2, 3:] == 0) and torch.all(out["words"][:2, :3] == 1)
    assert torch.all(out["words"][2] == 2)
    assert out["lengths"].tolist() == [3, 2, 5]
    assert out["global"].shape == (3, 4)
    with pytest.raises(ValueError, match="`reps` is empty"):
        cat_reps([])


def test_evaluate_orders_by_index_and_maps_captions() -> None:
    model = ToyModel().train()
    # images arrive out of order across batches: indices 2, 0 | 1
    image_loader = [
        {"images": _colour_images([2, 0]), "image_index": torch.tensor([2, 0])},
        {"images": _colour_images([1]), "image_index": torch.tensor([1])},
    ]
    # 6 captions, caption c describes image caption_to_image[c]; first token = its colour; shuffled batches
    caption_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    tokens = torch.stack([torch.tensor([int(k), 0, 0]) for k in caption_to_image])
    perm = torch.tensor([5, 1, 3, 0, 4, 2])
    text_loader = [
        {"tokens": tokens[perm[:4]], "lengths": torch.full((4,), 3), "caption_index": perm[:4]},
        {"tokens": tokens[perm[4:], :2], "lengths": torch.full((2,), 2), "caption_index": perm[4:]},
    ]
    text_reps = encode_texts(model, text_loader)
    assert text_reps["caption_index"].tolist() == list(range(6))
    assert text_reps["words"].shape == (6, 3, 3)  # padded to the longest batch
    image_reps = encode_images(model, image_loader)
    assert image_reps["image_index"].tolist() == [0, 1, 2]
    torch.testing.assert_close(image_reps["global"], torch.eye(3))
    assert model.seen_training and not any(model.seen_training)  # eval mode inside

    metrics = evaluate(model, image_loader, text_reps, caption_to_image)
    assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 100.0 and metrics["rsum"] == 600.0
    # wrong ground truth: rotate the images each caption belongs to -> nothing correct at rank 1
    wrong = (caption_to_image + 1) % 3
    bad = evaluate(model, image_reps, text_reps, wrong)
    assert bad["t2i_r1"] == 0.0 and bad["i2t_r1"] == 0.0


def test_evaluate_subset_of_images_errors() -> None:
    model = ToyModel()
    image_loader = [{"images": _colour_images([0, 1]), "image_index": torch.tensor([0, 1])}]
    text_loader = [{"tokens": torch.tensor([[0], [2]]), "lengths": torch.tensor([1, 1]), "caption_index": torch.tensor([0, 1])}]
    with pytest.raises(ValueError, match="refers to images the image loader did not yield, e.g. \\[2\\]"):
        evaluate(model, image_loader, encode_texts(model, text_loader), torch.tensor([0, 2]))


def test_duplicate_index_rejected() -> None:
    model = ToyModel()
    loader = [{"images": _colour_images([0, 1]), "image_index": torch.tensor([0, 0])}]
    with pytest.raises(ValueError, match="duplicate `image_index`"):
        encode_images(model, loader)


def test_evaluate_with_registered_tiny_model_matches_direct_computation() -> None:
    """For a real method, evaluate() equals metrics of the directly computed similarity matrix."""
    from rcit_bench.metrics import retrieval_metrics
    from rcit_bench.models.registry import build_method, tiny_config

    torch.manual_seed(0)
    model = build_method("vsepp", **tiny_config("vsepp"))
    images = torch.rand(5, 3, 32, 32)
    tokens = torch.randint(4, 40, (10, 6))
    lengths = torch.full((10,), 6)
    c2i = torch.arange(10) % 5
    image_loader = [{"images": images[:3], "image_index": torch.arange(3)},
                    {"images": images[3:], "image_index": torch.arange(3, 5)}]
    text_loader = [{"tokens": tokens, "lengths": lengths, "caption_index": torch.arange(10)}]
    got = evaluate(model, image_loader, encode_texts(model, text_loader), c2i)
    model.eval()
    with torch.no_grad():
        sims = model.similarity(model.encode_image(images), model.encode_text(tokens, lengths))
    want = retrieval_metrics(sims, c2i)
    assert got == pytest.approx({k: float(v) for k, v in want.items()}, abs=1e-6)
