"""Zero-shot entries (regime 'pretrained') and the `hf_dual_encoder` method, offline on CPU: a tiny random CLIP
written with `save_pretrained` runs through the whole pipeline, and its clean-cell metrics equal those computed
here with `transformers` directly (CLIPModel + its own image processor and tokenizer), an independent path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tiny_specs import tiny_dataset, tiny_trainer, write_tiny_clip

transformers = pytest.importorskip("transformers")

from rcit_bench.bench import costs, runner  # noqa: E402
from rcit_bench.bench.spec import validate_spec  # noqa: E402
from rcit_bench.errors import UserError  # noqa: E402
from rcit_bench.metrics import retrieval_metrics  # noqa: E402
from rcit_bench.models.hf_dual import ProcessorOps, load_pretrained  # noqa: E402

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


# ------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("kwargs", [
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 28, "width": 28}},  # CLIP: bicubic, short side, crop
    {"size": {"shortest_edge": 24}, "crop_size": {"height": 20, "width": 22}, "resample": 2},  # bilinear
    {"size": {"height": 26, "width": 30}, "do_center_crop": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    {"size": {"shortest_edge": 40}, "crop_size": {"height": 40, "width": 40}},  # upsampling
])
def test_tensor_preprocessing_matches_the_image_processor(kwargs: dict) -> None:
    """ProcessorOps on the float batch against the real processor on the same 8-bit images.

    Tolerance, in 8-bit grey levels before normalisation (x std x 255 after it): the processor resizes 8-bit images
    and returns whole grey levels (its output is integer to 1e-5), which we do not round: up to 0.5 level, 0.25 on
    average; its fixed-point 8-bit resize also lands one level off the float result on about a fifth of the pixels
    (measured: our result rounded differs from it by at most 1 level, 0.16-0.22 on average). So: max 1.5 levels,
    mean 0.4 level; a wrong kernel, size, crop offset or normalisation is off by many levels."""
    proc = transformers.CLIPImageProcessor(**kwargs)
    rng = np.random.default_rng(0)
    # smooth images plus noise (a pure-noise image is the worst case for the cubic kernel's overshoot)
    yy, xx = np.mgrid[0:36, 0:44]
    imgs = []
    for k in range(4):
        base = 127 + 100 * np.sin(xx / (3 + k))[..., None] * np.cos(yy / (4 + k))[..., None] * np.array([1, -0.5, 0.7])
        imgs.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    ref = proc(images=imgs, return_tensors="pt")["pixel_values"].float()
    batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    ours = ProcessorOps(proc)(batch)
    assert ours.shape == ref.shape
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    diff = ((ours - ref) * std * 255).abs()  # in 8-bit grey levels
    assert float(diff.max()) <= 1.5, float(diff.max())
    assert float(diff.mean()) <= 0.4, float(diff.mean())


# ------------------------------------------------------------------------------------------ loading, offline


def test_a_hub_id_offline_says_how_to_point_at_a_local_directory(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))  # nothing cached: the lookup must fail
    with pytest.raises(UserError) as err:
        load_pretrained("openai/clip-vit-base-patch32")
    msg = str(err.value)
    assert "model.pretrained" in msg and "save_pretrained" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "local_files_only: false" in msg


def test_a_local_directory_loads(tiny_clip: Path) -> None:
    model, processor = load_pretrained(str(tiny_clip))
    assert type(model).__name__ == "CLIPModel" and processor.crop_size["height"] == 32


# ------------------------------------------------------------------------------------------ spec validation


def _spec(root: Path, entry: dict, config: Path | None = None) -> dict:
    return {"name": "zs", "dataset": tiny_dataset(root), "entries": [entry], "seeds": [0],
            "trainer": tiny_trainer(1), "evaluation": {"clean": True}}


def test_zero_shot_methods_need_regime_pretrained(tmp_path: Path, tiny_clip: Path) -> None:
    cfg = tmp_path / "clip.yaml"
    cfg.write_text(yaml.safe_dump({"method": "hf_dual_encoder", "model": {"pretrained": str(tiny_clip)}}))
    with pytest.raises(UserError, match=r"entries\[0\]\.regime.*zero-shot.*regime: pretrained"):
        validate_spec(_spec(tmp_path, {"id": "clip", "method": "hf_dual_encoder", "config": str(cfg)}),
                      tmp_path / "s.yaml")
    with pytest.raises(UserError, match=r"entries\[0\]\.regime.*'pretrained'.*'vsepp' needs training"):
        validate_spec(_spec(tmp_path, {"id": "v", "method": "vsepp", "regime": "pretrained"}), tmp_path / "s.yaml")
    with pytest.raises(UserError, match=r"entries\[0\]\.mismatch_rate.*training option"):
        validate_spec(_spec(tmp_path, {"id": "clip", "method": "hf_dual_encoder", "config": str(cfg),
                                       "regime": "pretrained", "mismatch_rate": 0.2}), tmp_path / "s.yaml")


# ------------------------------------------------------------------------------------------ the whole pipeline


def _reference_metrics(tiny_clip: Path, root: Path) -> dict[str, float]:
    """Clean test metrics computed with transformers only: the processor on the 8-bit test images, the tokenizer
    on the raw captions, CLIPModel's own normalised embeddings."""
    from rcit_bench.data.datamodule import RetrievalDataModule

    opts = tiny_dataset(root)["options"]
    split = RetrievalDataModule(dataset="synthetic", **opts).split("test")
    images = [split.load_image_uint8(i, 32).permute(1, 2, 0).numpy() for i in range(len(split))]
    model = transformers.CLIPModel.from_pretrained(str(tiny_clip), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_clip), local_files_only=True)
    proc = transformers.CLIPImageProcessor.from_pretrained(str(tiny_clip), local_files_only=True)
    text = tok(list(split.captions), padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                    pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    sims = out.image_embeds @ out.text_embeds.t()
    return retrieval_metrics(sims.float(), split.caption_to_image)


def test_pretrained_entry_runs_the_grid_untrained(tmp_path: Path, tiny_clip: Path, one_thread: None,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "clip.yaml"
    cfg.write_text(yaml.safe_dump({"method": "hf_dual_encoder", "model": {"pretrained": str(tiny_clip)}}))
    spec = {"name": "zs", "dataset": tiny_dataset(tmp_path / "data"), "seeds": [0], "trainer": tiny_trainer(1),
            "entries": [{"id": "clip", "method": "hf_dual_encoder", "config": "clip.yaml", "regime": "pretrained"}],
            "evaluation": {"clean": True, "rcit_protocol": {"corruptions": ["speckle"], "pixel_noise_rates": [0.6]},
                           "text": {"perturbations": ["char_swap"], "levels": [5]}}}
    (tmp_path / "zs.yaml").write_text(yaml.safe_dump(spec))
    runs, board = tmp_path / "runs", tmp_path / "board"
    summary = runner.run_spec(tmp_path / "zs.yaml", results_dir=runs, use_wandb=False, leaderboard_dir=board,
                              estimate=True, live=False)
    assert summary.failed == 0 and summary.evaluated == 3 and summary.trained == []

    folder = runs / "zs" / "clip" / "seed0"
    records = {c: json.loads((folder / f"{c}.json").read_text()) for c in ("clean", "rcit-speckle-r0.6",
                                                                         "text-char_swap-l5")}
    clean = records["clean"]["metrics"]
    ref = _reference_metrics(tiny_clip, tmp_path / "data")
    assert clean == pytest.approx(ref, abs=1e-6)
    for cell in ("rcit-speckle-r0.6", "text-char_swap-l5"):  # the grid changed what the model saw
        assert records[cell]["metrics"] != pytest.approx(clean, abs=1e-6), cell
    training = records["clean"]["training"]
    assert training["trained"] is False and training["pretrained"] == str(tiny_clip)
    assert not list(runs.rglob("*.ckpt")), "a pretrained entry writes no checkpoint"

    # the plan: zero training steps, marked as such (read from the unit-cost cache the run wrote)
    from rcit_bench.bench.spec import load_spec

    loaded = load_spec(tmp_path / "zs.yaml")
    cached = costs.load_unit_costs(runs, loaded, loaded.entries)
    assert cached is not None and cached.entries["clip"].step_s == 0.0
    plan = costs.plan_sweep(loaded, loaded.entries, cached)
    assert plan.entries[0].steps == 0 and plan.entries[0].val_s == 0.0
    assert "pretrained (not trained)" in costs.format_plan(loaded, plan)

    md = (board / "README.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| clip"))
    assert f"`{tiny_clip}`" in row and "pretrained (zero-shot)" in row
    assert "Pretrained (not trained)" in md and "| seed |" not in md.split("## Training budget", 1)[1].split("##")[0]
    assert "CLIP ViT-B/32 (OpenAI weights), zero-shot | 78.9 / 94.9 / 98.2 | 58.8 / 83.6 / 90.0 | 504.4" in md

    # `rcit-bench status` says what a never-trained entry is: evaluated, not "not started"
    from rcit_bench.bench.status import sweep_status

    assert [(s.state, s.done, s.pending) for s in sweep_status(loaded, runs)] == [("evaluated", 3, 0)]
    for p in folder.glob("*.json"):
        if p.name != "state.json":
            p.unlink()
    assert [s.state for s in sweep_status(loaded, runs)] == ["pretrained"]


def test_the_datamodule_takes_the_tokenizer_from_the_method(tmp_path: Path, tiny_clip: Path) -> None:
    spec = validate_spec({**_spec(tmp_path, {"id": "clip", "method": "hf_dual_encoder", "regime": "pretrained",
                                             "overrides": {"model": {"pretrained": str(tiny_clip)}}})},
                         tmp_path / "s.yaml")
    entry = spec.entries[0]
    cfg = runner.method_config(spec, entry)
    kw = runner.datamodule_kwargs(spec, entry, 0, cfg)
    assert kw["text_encoder"] == {"path": str(tiny_clip), "local_files_only": True}
    cfg["data"] = {"text_encoder": "some/other-tokenizer"}
    with pytest.raises(UserError, match="disagrees with the tokenizer"):
        runner.datamodule_kwargs(spec, entry, 0, cfg)
