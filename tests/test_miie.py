"""MIIE's held-out modality classifier accuracy (val/modality_acc), through Lightning's validation loop; its
gradient-reversal schedule follows the training progress in optimizer steps."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import tiny_model

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


def _model(**over):
    return tiny_model("miie", **over)


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


# ---- training progress (the base hook) and MIIE's adversarial progress, through Lightning's fit loop ----


def _train_loader(n_batches: int, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, VOCAB, (n_batches * batch, 6), generator=g)
    tokens[:, 0] = 1
    tokens[:, -1] = 2
    images = torch.rand(n_batches * batch, 3, 32, 32, generator=g)
    return DataLoader([
        {"images": images[s:s + batch], "tokens": tokens[s:s + batch], "lengths": torch.full((batch,), 6),
         "image_index": torch.arange(s, s + batch)}
        for s in range(0, n_batches * batch, batch)
    ], batch_size=None)


class _Record(L.Callback):
    """(global step, training_progress(), adversarial_progress()) as the model sees them in each training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen.append((trainer.global_step, pl_module.training_progress(), pl_module.adversarial_progress()))


def _fit(model, tmp_path, n_batches: int, **trainer_kw) -> list[tuple[int, float, float]]:  # noqa: ANN001
    record = _Record()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[record], **trainer_kw)
    trainer.fit(model.train(), _train_loader(n_batches))
    return record.seen


def test_progress_counts_optimizer_steps_with_gradient_accumulation(tmp_path) -> None:  # noqa: ANN001
    # 6 batches per epoch, 2 per optimizer step: 3 steps per epoch, 6 in all; the adversarial part (after the
    # warm-up epoch) is steps 3..6. Counting batches instead would give 12 and an adversarial start at 6.
    seen = _fit(_model(warmup_stage_epochs=1), tmp_path, 6, max_epochs=2, accumulate_grad_batches=2)
    assert [g for g, _, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [p for _, p, _ in seen] == pytest.approx([g / 6 for g, _, _ in seen])
    assert [a for _, _, a in seen] == pytest.approx([0.0] * 6 + [0.0, 0.0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_progress_with_max_steps(tmp_path) -> None:  # noqa: ANN001
    # max_steps ends training after 4 steps, in the second epoch of 3 batches: progress is steps / 4
    seen = _fit(_model(warmup_stage_epochs=0), tmp_path, 3, max_steps=4)
    assert [g for g, _, _ in seen] == [0, 1, 2, 3]
    assert [p for _, p, _ in seen] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert [a for _, _, a in seen] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    # max_steps below what max_epochs allows (5 epochs x 3 steps): the smaller one ends training
    seen = _fit(_model(warmup_stage_epochs=0), tmp_path, 3, max_epochs=5, max_steps=4)
    assert [p for _, p, _ in seen] == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_progress_without_trainer() -> None:
    model = _model()
    assert model.training_progress() == 0.0  # the base hook: nothing done
    assert model.adversarial_progress() == 1.0  # MIIE outside a fit (e.g. a unit test): full strength
