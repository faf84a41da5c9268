"""Synthetic scenes: Karpathy layout, determinism, ground truth consistent with pixels and captions, caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rcit_bench.data import synthetic
from rcit_bench.data.karpathy import load_karpathy
from rcit_bench.data.synthetic import COLOURS, SHAPES, SIZES, ensure_synthetic, generate_synthetic

TINY = dict(n_train=12, n_val=4, n_test=4, image_size=32, seed=3)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synth"), **TINY)


def _json(root, name):
    return json.loads((root / name).read_text())


def test_layout_matches_karpathy_format(tiny_root):
    data = _json(tiny_root, "dataset_synthetic.json")
    images = data["images"]
    assert [e["split"] for e in images].count("train") == 12
    assert [e["split"] for e in images].count("val") == 4
    assert [e["split"] for e in images].count("test") == 4
    sentids = []
    for e in images:
        assert set(e) >= {"split", "filename", "imgid", "sentids", "sentences"}
        assert len(e["sentences"]) == 5
        assert e["sentids"] == [s["sentid"] for s in e["sentences"]]
        for s in e["sentences"]:
            assert s["imgid"] == e["imgid"] and s["raw"].endswith(".") and s["tokens"]
            # tokens are the lower-case words of raw without punctuation, as in the Karpathy files
            assert s["tokens"] == s["raw"].lower().replace(",", "").replace(".", "").split()
        sentids += e["sentids"]
        with Image.open(tiny_root / "images" / e["filename"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert len(set(sentids)) == len(sentids)
    assert len({e["imgid"] for e in images}) == len(images)
    stamp = _json(tiny_root, "synthetic_params.json")
    assert {k: stamp[k] for k in TINY} == TINY


def test_annotations_agree_with_captions_and_pixels(tiny_root):
    data = _json(tiny_root, "dataset_synthetic.json")
    ann = _json(tiny_root, "annotations_synthetic.json")
    assert [a["imgid"] for a in ann["images"]] == [e["imgid"] for e in data["images"]]
    for e, a in zip(data["images"], ann["images"]):
        objs = a["objects"]
        assert 1 <= len(objs) <= 3
        assert len({(o["shape"], o["colour"]) for o in objs}) == len(objs)  # unambiguous references
        pixels = np.asarray(Image.open(tiny_root / "images" / e["filename"]), dtype=np.float64)
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            centre = pixels[cy, cx]
            # the object's colour is drawn at its centre (colour must matter): nearest palette colour is its own
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - centre).sum())
            assert nearest == o["colour"], (e["filename"], o, centre)
        referenced = set()
        for s, c in zip(e["sentences"], a["captions"]):
            assert c["sentid"] == s["sentid"]
            for pos, k in c["word_objects"]:
                word, o = s["tokens"][pos], objs[k]
                allowed = set(SHAPES[o["shape"]]) | set(SIZES[o["size"]][1]) | {o["colour"], "violet", "turquoise"}
                assert word in allowed, (s["raw"], pos, o)
                referenced.add(k)
            nouns = [p for p, k in c["word_objects"] if s["tokens"][p] in {w for ws in SHAPES.values() for w in ws}]
            assert nouns, s["raw"]  # every caption names at least one object
        assert referenced == set(range(len(objs)))


def test_captions_vary_and_use_relations(tmp_path):
    root = generate_synthetic(tmp_path, n_train=40, n_val=1, n_test=1, image_size=16, seed=0)
    data = _json(root, "dataset_synthetic.json")
    raws = [s["raw"] for e in data["images"] for s in e["sentences"]]
    assert all(len(set(s["raw"] for s in e["sentences"])) >= 4 for e in data["images"])
    text = " ".join(raws)
    for phrase in ("to the left of", "above", "there is", "at the", "and"):
        assert phrase in text.lower()


def test_deterministic_and_independent_of_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "_POOL_MIN_IMAGES", 1)  # use the process pool even for a tiny set
    kw = dict(n_train=30, n_val=5, n_test=5, image_size=16, seed=7)
    a = generate_synthetic(tmp_path / "a", num_workers=1, **kw)
    b = generate_synthetic(tmp_path / "b", num_workers=2, **kw)
    c = generate_synthetic(tmp_path / "c", num_workers=1, **{**kw, "seed": 8})
    assert (a / "dataset_synthetic.json").read_text() == (b / "dataset_synthetic.json").read_text()
    assert (a / "annotations_synthetic.json").read_text() == (b / "annotations_synthetic.json").read_text()
    for name in ("000000.png", "000023.png", "000039.png"):
        assert np.array_equal(np.asarray(Image.open(a / "images" / name)), np.asarray(Image.open(b / "images" / name)))
    assert (a / "dataset_synthetic.json").read_text() != (c / "dataset_synthetic.json").read_text()


def test_ensure_caches_and_regenerates_on_param_change(tmp_path):
    root = ensure_synthetic(tmp_path, **TINY)
    json_path = root / "dataset_synthetic.json"
    before = json_path.stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, **TINY) == root
    assert json_path.stat().st_mtime_ns == before  # cached, not regenerated
    ensure_synthetic(tmp_path, **{**TINY, "n_train": 6})
    data = _json(root, "dataset_synthetic.json")
    assert len(data["images"]) == 14
    assert len(list((root / "images").glob("*.png"))) == 14  # old images replaced, not mixed in


def test_interrupted_generation_is_not_taken_as_done(tmp_path, monkeypatch):
    ensure_synthetic(tmp_path, **TINY)
    calls = {"n": 0}
    real = synthetic._make_one

    def flaky(job):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # simulated Ctrl-C in the middle of a generation
        return real(job)

    monkeypatch.setattr(synthetic, "_make_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path, **{**TINY, "seed": 99})
    assert not list(tmp_path.glob(".generating-*"))  # temporary directory cleaned up
    monkeypatch.setattr(synthetic, "_make_one", real)
    # the old complete dataset is still valid for its own params...
    assert json.loads((tmp_path / "synthetic_params.json").read_text())["seed"] == 3
    # ...and a missing stamp (a crash between moves) forces regeneration
    (tmp_path / "synthetic_params.json").unlink()
    before = (tmp_path / "dataset_synthetic.json").stat().st_mtime_ns
    ensure_synthetic(tmp_path, **TINY)
    assert (tmp_path / "dataset_synthetic.json").stat().st_mtime_ns != before
    assert (tmp_path / "synthetic_params.json").is_file()


def test_karpathy_loader_reads_synthetic_with_annotations(tiny_root):
    split = load_karpathy(tiny_root / "dataset_synthetic.json", tiny_root / "images", "test")
    assert len(split) == 4 and split.num_captions == 20
    assert split.caption_to_image.tolist() == [i for i in range(4) for _ in range(5)]
    assert split.annotations is not None and split.annotations[0]["imgid"] == split.image_ids[0]
    img = split.load_image(0)
    assert img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1


@pytest.mark.parametrize("arg,value", [("n_train", 0), ("image_size", 8), ("n_val", 2.5)])
def test_bad_params_are_rejected(tmp_path, arg, value):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        generate_synthetic(tmp_path, **{**TINY, arg: value})
