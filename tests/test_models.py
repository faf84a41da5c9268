"""Every registered method (one test parametrised over the registry) + the shared module machinery."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from rcit_bench.evaluation import encode_texts, evaluate
from rcit_bench.models.base import RetrievalModule
from rcit_bench.models.registry import (
    TINY_CONFIGS,
    build_method,
    get_method_class,
    list_methods,
    load_method_config,
    tiny_config,
)

N = 16  # pairs in the overfit batch
VOCAB = 40
SEQ = 7


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_batch(n: int = N, size: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct random images and distinct token sequences; corrupted_images always present."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    corrupted = (images + 0.3 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    tokens = torch.randint(4, VOCAB, (n, SEQ), generator=g)
    tokens[:, 0] = 1  # <start>
    lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
    lengths[0] = SEQ
    for i, length in enumerate(lengths.tolist()):
        tokens[i, length - 1] = 2  # <end>
        tokens[i, length:] = 0  # <pad>
    assert len({tuple(t.tolist()) for t in tokens}) == n
    return {
        "images": images,
        "corrupted_images": corrupted,
        "tokens": tokens,
        "lengths": lengths,
        "image_index": torch.arange(n),
        "caption_index": torch.arange(n),
    }


def _optimizer(model: RetrievalModule) -> torch.optim.Optimizer:
    out = model.configure_optimizers()
    return out["optimizer"] if isinstance(out, dict) else out


def _step(model: RetrievalModule, opt: torch.optim.Optimizer, batch: dict) -> float:
    model.train()
    opt.zero_grad()
    loss, _ = model.compute_loss(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("name", [n for n in list_methods() if not get_method_class(n).zero_shot])
def test_registered_method_tiny(name: str) -> None:
    """Shapes, finite outputs, loss decreases, and the tiny model overfits 16 pairs to R@1 = 100."""
    torch.manual_seed(0)
    model = build_method(name, **tiny_config(name))
    assert isinstance(model, RetrievalModule)
    assert model.method_name == name
    batch = make_batch()

    model.eval()
    with torch.no_grad():
        img = model.encode_image(batch["images"][:5])
        txt = model.encode_text(batch["tokens"], batch["lengths"])
        sims = model.similarity(img, txt)
    assert all(v.shape[0] == 5 for v in img.values())
    assert all(v.shape[0] == N for v in txt.values())
    assert sims.shape == (5, N)
    assert torch.isfinite(sims).all()

    opt = _optimizer(model)
    losses = [_step(model, opt, batch) for _ in range(8)]
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) < losses[0]

    image_loader = [{"images": batch["images"][:8], "image_index": batch["image_index"][:8]},
                    {"images": batch["images"][8:], "image_index": batch["image_index"][8:]}]
    text_loader = [{"tokens": batch["tokens"], "lengths": batch["lengths"], "caption_index": batch["caption_index"]}]
    metrics = {}
    for it in range(40):
        for _ in range(10):
            _step(model, opt, batch)
        metrics = evaluate(model, image_loader, encode_texts(model, text_loader), torch.arange(N))
        if metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 100.0:
            break
    assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 100.0, metrics
    # independent check of the same fact: each image's best caption and each caption's best image is its pair
    model.eval()
    with torch.no_grad():
        s = model.similarity(model.encode_image(batch["images"]), model.encode_text(batch["tokens"], batch["lengths"]))
    assert torch.equal(s.argmax(1), torch.arange(N)) and torch.equal(s.argmax(0), torch.arange(N))


def test_tiny_configs_cover_registry() -> None:
    expected = {"vsepp", "rcit", "miie", "matchmap", "vsrpp"}  # written here, not read from the registry
    assert set(TINY_CONFIGS) == expected  # every trained method; the zero-shot one needs pretrained files
    assert set(list_methods()) == expected | {"hf_dual_encoder", "open_clip"}


def test_methods_declare_their_data_needs() -> None:
    """needs_paired_views / localizes are class attributes the spec and the runner read instead of names."""
    expected = {  # name: (needs_paired_views, localizes, zero_shot)
        "vsepp": (False, False, False), "rcit": (True, False, False), "miie": (False, False, False),
        "matchmap": (False, True, False), "vsrpp": (False, False, False), "hf_dual_encoder": (False, False, True),
        "open_clip": (False, False, True),
    }
    got = {name: (get_method_class(name).needs_paired_views, get_method_class(name).localizes,
                  get_method_class(name).zero_shot) for name in list_methods()}
    assert got == expected
    assert (RetrievalModule.needs_paired_views, RetrievalModule.localizes, RetrievalModule.zero_shot) == (
        False, False, False)  # the defaults
    for name, (_, localizes, _) in expected.items():  # a localizing method has the pointing game's entry point
        assert hasattr(get_method_class(name), "localize_batch") == localizes, name


def test_unknown_method_and_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"Unknown method 'vsep'.*'vsepp'.*Did you mean 'vsepp'\?"):
        build_method("vsep")
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['embed_dimm'\].*Did you mean 'embed_dim'\?"):
        build_method("vsepp", **tiny_config("vsepp"), embed_dimm=3)
    with pytest.raises(ValueError, match=r"Unknown image encoder 'smallcnn'.*Did you mean 'small_cnn'"):
        build_method("vsepp", **{**tiny_config("vsepp"), "image_encoder": "smallcnn"})


def test_rcit_requires_paired_batch() -> None:
    model = build_method("rcit", **tiny_config("rcit"))
    batch = make_batch(4)
    del batch["corrupted_images"]
    with pytest.raises(ValueError, match="train_corruption: paired"):
        model.compute_loss(batch)


def test_rcit_loss_is_sum_of_three_triplets() -> None:
    """L = L(CI,T) + L(I,T) + L(CI,I), each recomputed here from the encoders with an independent triplet."""
    torch.manual_seed(0)
    model = build_method("rcit", **tiny_config("rcit")).eval()
    batch = make_batch(6)

    def triplet(s: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
        d = s.diag()
        eye = torch.eye(len(s), dtype=torch.bool)
        cost_t = (margin + s - d[:, None]).clamp(min=0).masked_fill(eye, 0)
        cost_i = (margin + s - d[None, :]).clamp(min=0).masked_fill(eye, 0)
        return cost_t.max(1).values.sum() + cost_i.max(0).values.sum()

    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    with torch.no_grad():
        loss, logs = model.compute_loss(batch)
        i = model.image_encoder(batch["images"])["global"]
        ci = model.image_encoder(batch["corrupted_images"])["global"]
        t = model.text_encoder(batch["tokens"], batch["lengths"])["global"]
    expected = triplet(cos(ci, t)) + triplet(cos(i, t)) + triplet(cos(ci, i))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logs["loss_ci_i"], triplet(cos(ci, i)), rtol=1e-4, atol=1e-4)


def test_miie_stages_and_reversed_gradient() -> None:
    """Stage boundaries by epoch; in the adversarial stage the encoders get minus lambda times the
    classifier's gradient while the classifier itself gets the plain gradient."""
    from rcit_bench.models.losses import grl_lambda, modality_adversarial_loss

    cfg = {**tiny_config("miie"), "warmup_stage_epochs": 2, "adversarial_stage_epochs": 3}
    model = build_method("miie", **cfg)
    assert [model.stage(e) for e in range(7)] == ["warmup"] * 2 + ["adversarial"] * 3 + ["joint"] * 2

    torch.manual_seed(0)
    model = build_method("miie", **{**tiny_config("miie"), "adversarial_triplet_weight": 0.0, "adv_weight": 1.0}).eval()
    assert model.stage() == "adversarial"
    batch = make_batch(6)
    loss, logs = model.compute_loss(batch)
    assert 0.0 <= float(logs["modality_acc"]) <= 1.0
    loss.backward()
    enc_rev = model.text_encoder.rnn.weight_hh_l0.grad.clone()
    cls_rev = model.modality_classifier[0].weight.grad.clone()
    model.zero_grad()
    norm = torch.nn.functional.normalize
    fi = norm(model.encode_image(batch["images"])["global"], dim=-1)
    ft = norm(model.encode_text(batch["tokens"], batch["lengths"])["global"], dim=-1)
    adv, _ = modality_adversarial_loss(model.modality_classifier(fi).squeeze(-1),
                                       model.modality_classifier(ft).squeeze(-1))
    adv.backward()
    lam = grl_lambda(1.0)  # no trainer: full strength
    torch.testing.assert_close(enc_rev, -lam * model.text_encoder.rnn.weight_hh_l0.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cls_rev, model.modality_classifier[0].weight.grad, rtol=1e-4, atol=1e-6)


class _NaNAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            batch["images"][0, 0, 0, 0] = float("nan")


def _trainer(tmp_path, **kw) -> L.Trainer:  # noqa: ANN001
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kw)


def test_nan_guard_names_step(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_method("vsepp", **tiny_config("vsepp"))
    loader = DataLoader([make_batch(8, seed=i) for i in range(6)], batch_size=None)
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=False, callbacks=[_NaNAtStep(3)])
    with pytest.raises(FloatingPointError, match=r"Loss became nan at global step 3 \(epoch 0\) in method 'vsepp'"):
        trainer.fit(model, loader)


def test_fit_validation_metrics_and_checkpoint_reload(tmp_path) -> None:  # noqa: ANN001
    """val/rsum from the Lightning loop equals evaluation.evaluate; the checkpoint reloads with weights_only."""
    torch.manual_seed(0)
    cfg = {**tiny_config("vsepp"), "data_config": {"corruption_mix": [{"name": "speckle", "rate": 0.6}]}}
    model = build_method("vsepp", **cfg)
    train = DataLoader([make_batch(8, seed=i) for i in range(4)], batch_size=None)
    # val: 6 images with 2 captions each, captions in order, images repeated per caption
    b = make_batch(12, seed=99)
    img_of_cap = torch.arange(12) // 2
    images = torch.rand(6, 3, 40, 40)
    val_batches = [
        {"images": images[img_of_cap[s:s + 5]], "tokens": b["tokens"][s:s + 5], "lengths": b["lengths"][s:s + 5],
         "image_index": img_of_cap[s:s + 5], "caption_index": torch.arange(s, min(s + 5, 12))}
        for s in range(0, 12, 5)
    ]
    val = DataLoader(val_batches, batch_size=None)
    trainer = _trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(model, train, val)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert "train/loss" in logged and "train/triplet" in logged

    text_loader = [{"tokens": b["tokens"], "lengths": b["lengths"], "caption_index": torch.arange(12)}]
    image_loader = [{"images": images, "image_index": torch.arange(6)}]
    ref = evaluate(model, image_loader, encode_texts(model, text_loader), img_of_cap)
    assert logged["val/rsum"] == pytest.approx(ref["rsum"], abs=1e-4)
    assert logged["val/i2t_r1"] == pytest.approx(ref["i2t_r1"], abs=1e-4)

    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    cls = get_method_class("vsepp")
    reloaded = cls.load_from_checkpoint(ckpt, weights_only=True)
    assert reloaded.hparams.data_config == cfg["data_config"]
    ref2 = evaluate(reloaded, image_loader, encode_texts(reloaded, text_loader), img_of_cap)
    assert ref2 == pytest.approx(ref)


def test_warmup_uses_sum_then_max_violation() -> None:
    model = build_method("vsepp", **{**tiny_config("vsepp"), "warmup_epochs": 1})
    assert model.use_max_violation() is False  # epoch 0 < warmup_epochs
    model2 = build_method("vsepp", **tiny_config("vsepp"))
    assert model2.use_max_violation() is True


def test_backbone_lr_mult_groups() -> None:
    model = build_method("vsepp", **{**tiny_config("vsepp"), "backbone_lr_mult": 0.1, "lr_decay_epochs": 2})
    out = model.configure_optimizers()
    lrs = sorted(g["lr"] for g in out["optimizer"].param_groups)
    assert lrs == pytest.approx([0.1 * 3e-3, 3e-3])
    assert isinstance(out["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


@pytest.mark.parametrize("name", ["vsepp", "rcit", "miie", "paper/vsepp_flickr30k", "paper/rcit_coco", "paper/miie_coco"])
def test_method_configs_load(name: str) -> None:
    cfg = load_method_config(name)
    assert cfg["method"] in list_methods()
    assert {"model", "optim", "trainer", "data"} <= set(cfg)


def test_default_configs_build() -> None:
    for name in ("vsepp", "rcit", "miie"):
        cfg = load_method_config(name)
        model = build_method(cfg["method"], **cfg, vocab_size=50)
        assert model.hparams.embed_dim == cfg["model"]["embed_dim"]


def test_unknown_config_name() -> None:
    with pytest.raises(ValueError, match=r"Unknown method config 'vsep'.*Did you mean 'vsepp'"):
        load_method_config("vsep")


@pytest.mark.parametrize("name", ["matchmap", "vsrpp"])
def test_cross_attention_similarity_chunked_equals_unchunked(name: str) -> None:
    """The memory budget only splits the work: one pair per block scores exactly as one block does."""
    from conftest import caption_batch, tiny_model

    model = tiny_model(name)
    images, tokens, lengths = caption_batch()
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens, lengths)
        model.hparams.memory_budget_mb = 1e6
        full = model.similarity(img, txt)
        model.hparams.memory_budget_mb = 1e-4  # one pair per block
        tiny = model.similarity(img, txt)
    assert torch.equal(full, tiny)
