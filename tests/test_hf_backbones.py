"""Pretrained backbones for the trained methods: `image_encoder: {name: hf, pretrained: <dir>}` and `text_encoder:
{name: hf, pretrained: <dir>}` (here the two towers of a tiny random CLIP) under a method's own heads and loss; the
method declares the tokenizer, and fine-tuning lowers the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tiny_specs import tiny_dataset, write_tiny_clip

pytest.importorskip("transformers")

from rcit_bench.bench import runner  # noqa: E402
from rcit_bench.bench.spec import validate_spec  # noqa: E402
from rcit_bench.models.registry import build_method, get_method_class  # noqa: E402


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("hfb") / "tiny-clip")


@pytest.mark.parametrize("method", ["vsepp", "rcit"])
def test_fine_tuning_with_hf_backbones_lowers_the_loss(tmp_path: Path, clip_dir: Path, method: str,
                                                      one_thread: None) -> None:
    model_cfg = {"image_encoder": {"name": "hf", "pretrained": str(clip_dir)},
                 "text_encoder": {"name": "hf", "pretrained": str(clip_dir)}, "embed_dim": 16,
                 "max_violation": False, "lr": 1e-3, "backbone_lr_mult": 0.5}
    regime = "paired" if get_method_class(method).needs_paired_views else "clean"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"method": method, "model": model_cfg,
                                                     "optim": {"lr_decay_epochs": None}}))
    entry = {"id": "m", "method": method, "regime": regime, "config": "m.yaml"}
    if regime == "paired":
        entry["corruption_mix"] = [{"name": "speckle", "rate": 0.6}]
    spec = validate_spec({"name": "hfb", "dataset": tiny_dataset(tmp_path / "data"), "entries": [entry],
                          "evaluation": {"clean": True}}, tmp_path / "s.yaml")
    e = spec.entries[0]
    composed = runner.composed_config(spec, e, 0, runner.method_config(spec, e))
    # the data module takes the tokenizer the text backbone was saved with, from the method
    assert composed["data"]["text_encoder"] == {"path": str(clip_dir), "local_files_only": True}
    dm = runner.make_datamodule(composed["data"])
    assert type(dm.vocab).__name__ == "HFTokenizer" and dm.pad_id == dm.vocab.tokenizer.pad_token_id
    torch.manual_seed(0)
    model = runner.build_model(e, composed, dm)
    clip = __import__("transformers").CLIPModel.from_pretrained(str(clip_dir), local_files_only=True)
    # the towers hold the pretrained weights (the method's heads are new)
    assert torch.equal(model.image_encoder.backbone.embeddings.patch_embedding.weight,
                       clip.vision_model.embeddings.patch_embedding.weight)
    assert torch.equal(model.text_encoder.backbone.embeddings.token_embedding.weight,
                       clip.text_model.embeddings.token_embedding.weight)
    batch = next(iter(dm.train_dataloader()))
    opt_cfg = model.configure_optimizers()
    opt = opt_cfg["optimizer"] if isinstance(opt_cfg, dict) else opt_cfg
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    assert any(g["lr"] == pytest.approx(5e-4) and {id(p) for p in g["params"]} == backbone_ids
               for g in opt.param_groups)  # backbone_lr_mult scales the pretrained image tower
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, _ = model.compute_loss(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[-3:]) < 0.8 * losses[0], losses
    assert not torch.equal(model.image_encoder.backbone.embeddings.patch_embedding.weight,
                           clip.vision_model.embeddings.patch_embedding.weight)  # fine-tuned, not frozen


def test_backbone_lr_mult_zero_freezes_the_pretrained_image_tower(tmp_path: Path, clip_dir: Path,
                                                                   one_thread: None) -> None:
    """backbone_lr_mult 0: the pretrained vision tower is out of the optimizer and unchanged by training steps, while
    the method's own head still learns."""
    spec = validate_spec({"name": "hfb", "dataset": tiny_dataset(tmp_path / "data"), "evaluation": {"clean": True},
                          "entries": [{"id": "m", "method": "vsepp", "overrides": {"model": {
                              "image_encoder": {"name": "hf", "pretrained": str(clip_dir)},
                              "text_encoder": {"name": "hf", "pretrained": str(clip_dir)}, "embed_dim": 16,
                              "max_violation": False}, "optim": {"backbone_lr_mult": 0.0}}}]})
    e = spec.entries[0]
    composed = runner.composed_config(spec, e, 0, runner.method_config(spec, e))
    dm = runner.make_datamodule(composed["data"])
    torch.manual_seed(0)
    model = runner.build_model(e, composed, dm)
    opt_cfg = model.configure_optimizers()
    opt = opt_cfg["optimizer"] if isinstance(opt_cfg, dict) else opt_cfg
    backbone = model.backbone_parameters()
    assert backbone and all(not p.requires_grad for p in backbone)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in backbone}
    before = [p.detach().clone() for p in backbone]
    head = [p for n, p in model.image_encoder.named_parameters() if not n.startswith("backbone.")]
    head_before = [p.detach().clone() for p in head]
    batch = next(iter(dm.train_dataloader()))
    model.train()
    for _ in range(2):
        opt.zero_grad()
        loss, _ = model.compute_loss(batch)
        loss.backward()
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, backbone))
    assert head and any(not torch.equal(a, p) for a, p in zip(head_before, head))
