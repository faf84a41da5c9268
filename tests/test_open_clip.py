"""Method `open_clip` (optional extra rcit-bench[open_clip]): a tiny OpenCLIP model config with random weights saved
to a local checkpoint runs zero-shot through the pipeline, and its clean metrics equal open_clip's own
preprocessing, tokenizer and encoders applied here directly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tiny_specs import tiny_dataset, tiny_trainer

from rcit_bench.errors import UserError

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def test_a_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from rcit_bench.models.open_clip_model import import_open_clip

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as when the package is not installed: import fails
    with pytest.raises(UserError, match=r"pip install 'rcit-bench\[open_clip\]'"):
        import_open_clip()


def test_open_clip_entry_matches_open_clip(tmp_path: Path, one_thread: None) -> None:
    open_clip = pytest.importorskip("open_clip", reason="the optional extra rcit-bench[open_clip] is not installed")
    from rcit_bench.bench import runner
    from rcit_bench.data.datamodule import RetrievalDataModule
    from rcit_bench.metrics import retrieval_metrics

    cfg_file = tmp_path / "rcit-tiny-clip.json"
    cfg_file.write_text(json.dumps(TINY))
    open_clip.add_model_config(str(cfg_file))
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("rcit-tiny-clip")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "oc.yaml").write_text(yaml.safe_dump({"method": "open_clip", "model": {
        "arch": "rcit-tiny-clip", "pretrained": str(tmp_path / "weights.pt"), "model_config": str(cfg_file)}}))
    spec = {"name": "oc", "dataset": tiny_dataset(tmp_path / "data"), "seeds": [0], "trainer": tiny_trainer(1),
            "entries": [{"id": "oc", "method": "open_clip", "config": "oc.yaml", "regime": "pretrained"}],
            "evaluation": {"clean": True, "rcit_protocol": {"corruptions": ["salt_pepper"], "pixel_noise_rates": [0.6]}}}
    (tmp_path / "oc-spec.yaml").write_text(yaml.safe_dump(spec))
    summary = runner.run_spec(tmp_path / "oc-spec.yaml", results_dir=tmp_path / "runs", use_wandb=False,
                              build_board=False, live=False)
    assert summary.failed == 0 and summary.evaluated == 2 and summary.trained == []
    folder = tmp_path / "runs" / "oc" / "oc" / "seed0"
    clean = json.loads((folder / "clean.json").read_text())["metrics"]
    noisy = json.loads((folder / "rcit-salt_pepper-r0.6.json").read_text())["metrics"]

    # the reference: open_clip's own transforms on PIL images, its tokenizer, its encoders (the saved weights)
    ref_model, _, preprocess = open_clip.create_model_and_transforms("rcit-tiny-clip",
                                                                     pretrained=str(tmp_path / "weights.pt"))
    split = RetrievalDataModule(dataset="synthetic", **tiny_dataset(tmp_path / "data")["options"]).split("test")
    pils = [Image.fromarray(split.load_image_uint8(i, 32).permute(1, 2, 0).numpy()) for i in range(len(split))]
    tok = open_clip.get_tokenizer("rcit-tiny-clip")
    with torch.no_grad():
        img = ref_model.encode_image(torch.stack([preprocess(p) for p in pils]), normalize=True)
        txt = ref_model.encode_text(tok(list(split.captions)), normalize=True)
    ref = retrieval_metrics(img @ txt.t(), split.caption_to_image)
    assert clean == pytest.approx(ref, abs=1e-6)
    assert noisy != pytest.approx(clean, abs=1e-6)
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
