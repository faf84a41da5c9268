"""MIIE's held-out modality classifier accuracy (val/modality_acc), through Lightning's validation loop."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from rcit_bench.models.registry import build_method, tiny_config

VOCAB = 40


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _val_loader(n_img: int = 6, caps: int = 2, batch: int = 5) -> DataLoader:
    """n_img images with `caps` captions each, captions in order, each with its image (the datamodule's format)."""
    g = torch.Generator().manual_seed(0)
    n = n_img * caps
    images = torch.rand(n_img, 3, 40, 40, generator=g)
    tokens = torch.randint(4, VOCAB, (n, 6), generator=g)
    tokens[:, 0] = 1
    tokens[:, -1] = 2
    lengths = torch.full((n,), 6)
    img_of_cap = torch.arange(n) // caps
    return DataLoader([
        {"images": images[img_of_cap[s:s + batch]], "tokens": tokens[s:s + batch], "lengths": lengths[s:s + batch],
         "image_index": img_of_cap[s:s + batch], "caption_index": torch.arange(s, min(s + batch, n))}
        for s in range(0, n, batch)
    ], batch_size=None)


def _validate(model, tmp_path) -> dict[str, float]:  # noqa: ANN001
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    (out,) = trainer.validate(model, _val_loader(), verbose=False)
    return {k: float(v) for k, v in out.items()}


def _model():
    torch.manual_seed(0)
    return build_method("miie", **tiny_config("miie"))


def test_val_modality_acc_logged_in_percent(tmp_path) -> None:  # noqa: ANN001
    logged = _validate(_model(), tmp_path)
    assert 0.0 <= logged["val/modality_acc"] <= 100.0
    assert "val/rsum" in logged  # the base class's retrieval metrics still come after it


def test_val_modality_acc_is_balanced_over_modalities(tmp_path) -> None:  # noqa: ANN001
    model = _model()
    last = model.modality_classifier[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1.0)  # logit 1 everywhere: "image" for every embedding
    # images all right, texts all wrong: 50 exactly, although there are twice as many captions as images
    assert _validate(model, tmp_path)["val/modality_acc"] == 50.0
    with torch.no_grad():
        last.bias.fill_(-1.0)  # "text" everywhere
    assert _validate(model, tmp_path)["val/modality_acc"] == 50.0


def test_modality_accuracy_hand_values() -> None:
    model = _model()
    first, last = model.modality_classifier[0], model.modality_classifier[-1]
    d = first.in_features
    with torch.no_grad():  # logit = relu(x_0) - relu(-x_0): the sign of the first coordinate
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, 0], first.weight[1, 0] = 1.0, -1.0
        last.weight.zero_()
        last.bias.zero_()
        last.weight[0, 0], last.weight[0, 1] = 1.0, -1.0
    img = torch.randn(4, d).abs()
    img[3, 0] = -1.0  # 3 of 4 images classified "image"
    txt = -torch.randn(5, d).abs()
    txt[:2, 0] = 1.0  # 3 of 5 texts classified "text"
    assert model.modality_accuracy(img, txt) == pytest.approx(50.0 * (3 / 4 + 3 / 5))
    with pytest.raises(ValueError, match="`image_global` and `text_global`"):
        model.modality_accuracy(img[:0], txt)
