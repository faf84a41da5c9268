"""Karpathy JSON loader: Flickr30k and COCO variants, validation errors, unreadable images."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from rcit_bench.data.karpathy import load_karpathy


def _img(path, value=(10, 200, 30), mode="RGB", size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.new("L", size, value).save(path)
    else:
        Image.new("RGB", size, value).save(path)


def _sent(raw, tokens=True):
    s = {"raw": raw}
    if tokens:
        s["tokens"] = raw.lower().rstrip(".").split()
    return s


def _flickr(tmp_path, images=None):
    """dataset_flickr30k.json + images/ with 2 train, 1 val, 2 test images (one grayscale)."""
    if images is None:
        images = [
            {"split": "train", "filename": "a.jpg", "imgid": 0, "sentences": [_sent(f"a dog {k}") for k in range(5)]},
            {"split": "train", "filename": "b.png", "imgid": 1, "sentences": [_sent(f"a cat {k}") for k in range(5)]},
            {"split": "val", "filename": "c.png", "imgid": 2, "sentences": [_sent(f"a cow {k}") for k in range(5)]},
            {"split": "test", "filename": "d.png", "imgid": 3, "sentences": [_sent(f"red car {k}") for k in range(5)]},
            {"split": "test", "filename": "e.png", "imgid": 4, "sentences": [_sent(f"gray sky {k}") for k in range(6)]},
        ]
    for e in images:
        name = e.get("filename")
        if isinstance(name, str) and ".." not in name and not os.path.isabs(name):
            _img(tmp_path / "images" / name, value=128 if name == "e.png" else (10, 200, 30),
                 mode="L" if name == "e.png" else "RGB")
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    return path, tmp_path / "images"


def test_flickr_split_contents(tmp_path):
    js, root = _flickr(tmp_path)
    test = load_karpathy(js, root, "test")
    assert len(test) == 2 and test.num_captions == 11  # 5 + 6 captions: all kept, none assumed
    assert test.image_ids == [3, 4]
    assert test.caption_to_image.tolist() == [0] * 5 + [1] * 6
    assert test.caption_to_image.dtype == torch.long
    assert test.captions[5] == "gray sky 0" and test.tokens[5] == ["gray", "sky", "0"]
    gray = test.load_image(1)  # grayscale file comes back as 3 equal channels
    assert gray.shape == (3, 4, 6) and gray.dtype == torch.float32
    assert torch.allclose(gray, torch.full_like(gray, 128 / 255))
    rgb = test.load_image(0)
    assert torch.allclose(rgb[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0)
    assert len(load_karpathy(js, root, "train")) == 2 and len(load_karpathy(js, root, "val")) == 1


def test_coco_filepath_cocoid_restval_and_7_captions(tmp_path):
    images = [
        {"split": "train", "filepath": "train2014", "filename": "t1.jpg", "imgid": 0, "cocoid": 101,
         "sentences": [_sent(f"a man {k}") for k in range(5)]},
        {"split": "restval", "filepath": "val2014", "filename": "r1.jpg", "imgid": 1, "cocoid": 202,
         "sentences": [_sent(f"a boat {k}") for k in range(7)]},
        {"split": "test", "filepath": "val2014", "filename": "v1.jpg", "imgid": 2, "cocoid": 303,
         "sentences": [_sent(f"a kite {k}") for k in range(5)]},
    ]
    for e in images:
        _img(tmp_path / "images" / e["filepath"] / e["filename"])
    js = tmp_path / "dataset_coco.json"
    js.write_text(json.dumps({"images": images}))
    train = load_karpathy(js, tmp_path / "images", "train")
    assert train.image_ids == [101, 202]  # restval joins train; ids are cocoids
    assert train.num_captions == 12 and train.caption_to_image.tolist() == [0] * 5 + [1] * 7
    assert train.load_image(1).shape == (3, 4, 6)
    assert load_karpathy(js, tmp_path / "images", "test").image_ids == [303]


def test_tokens_derived_when_absent(tmp_path):
    js, root = _flickr(tmp_path, [{"split": "test", "filename": "a.png", "imgid": 0,
                                   "sentences": [_sent("A Dog, running.", tokens=False)]}])
    assert load_karpathy(js, root, "test").tokens == [["a", "dog", "running"]]


def test_missing_json_and_root_name_the_path_and_layout(tmp_path):
    js, root = _flickr(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*dataset_flickr30k\.json.*images"):
        load_karpathy(tmp_path / "nope.json", root, "test")
    with pytest.raises(FileNotFoundError, match=r"Image root directory not found: .*missing_dir"):
        load_karpathy(js, tmp_path / "missing_dir", "test")


def test_missing_image_file_named(tmp_path):
    js, root = _flickr(tmp_path)
    os.remove(root / "d.png")
    with pytest.raises(FileNotFoundError, match=r"d\.png.*image entry #3"):
        load_karpathy(js, root, "test")
    load_karpathy(js, root, "train")  # other splits are unaffected
    with pytest.warns(UserWarning, match=r"Skipped 1 missing or unreadable"):
        split = load_karpathy(js, root, "test", skip_unreadable=True)
    assert split.image_ids == [4] and split.caption_to_image.tolist() == [0] * 6


def test_unreadable_image_error_or_skip(tmp_path):
    js, root = _flickr(tmp_path)
    (root / "d.png").write_bytes(b"this is not a png")
    split = load_karpathy(js, root, "test")
    with pytest.raises(ValueError, match=r"Could not decode image .*d\.png"):
        split.load_image(0)
    with pytest.warns(UserWarning) as record:
        split = load_karpathy(js, root, "test", skip_unreadable=True)
    assert len(record) == 1 and "Skipped 1" in str(record[0].message)
    assert split.image_ids == [4]


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda e: e.pop("sentences"), r"image entry #0 \('a\.png'\) is missing the field 'sentences'"),
        (lambda e: e.pop("filename"), r"image entry #0 is missing the field 'filename'"),
        (lambda e: e.pop("split"), r"image entry #0 \('a\.png'\) is missing the field 'split'"),
        (lambda e: e.pop("imgid"), r"missing the field 'imgid'"),
        (lambda e: e.update(imgid="zero"), r"field 'imgid' of image entry #0 .* must be of type int, but got str"),
        (lambda e: e.update(sentences=[]), r"image entry #0 \('a\.png'\) has no captions"),
        (lambda e: e.update(sentences=[{"raw": "   "}]), r"sentence #0 of image entry #0 .*empty caption"),
        (lambda e: e.update(sentences=[{"tokens": ["a"]}]), r"sentence #0 .* missing the field 'raw'"),
        (lambda e: e.update(sentences=[{"raw": "x", "tokens": "x"}]), r"'tokens' .* must be a list of strings"),
        (lambda e: e.update(split="training"), r"'split' of image entry #0 .* but got 'training'"),
        (lambda e: e.update(filename="../secret.png"), r"must stay inside the image root.*\.\./secret\.png"),
        (lambda e: e.update(filename="/etc/passwd"), r"absolute path '/etc/passwd'"),
        (lambda e: e.update(filepath="../x"), r"'filepath' of image entry #0 .* contains '\.\.'"),
    ],
)
def test_bad_json_fields(tmp_path, mutate, pattern):
    entry = {"split": "test", "filename": "a.png", "imgid": 0, "sentences": [_sent("a dog")]}
    _img(tmp_path / "images" / "a.png")
    mutate(entry)
    js = tmp_path / "dataset_flickr30k.json"
    js.write_text(json.dumps({"images": [entry]}))
    with pytest.raises(ValueError, match=pattern):
        load_karpathy(js, tmp_path / "images", "test")


def test_bad_split_argument_and_json(tmp_path):
    js, root = _flickr(tmp_path)
    with pytest.raises(ValueError, match=re.escape("Argument `split` must be one of 'train', 'val', 'test', but got 'tset'. Did you mean 'test'?")):
        load_karpathy(js, root, "tset")
    js.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_karpathy(js, root, "test")
    js.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="'images' list"):
        load_karpathy(js, root, "test")


def test_head_limits_images_and_captions(tmp_path):
    js, root = _flickr(tmp_path)
    test = load_karpathy(js, root, "test").head(1)
    assert len(test) == 1 and test.num_captions == 5 and test.image_ids == [3]
    assert np.allclose(test.load_image(0).numpy(), load_karpathy(js, root, "test").load_image(0).numpy())
    assert test.image_captions(0) == [0, 1, 2, 3, 4]
