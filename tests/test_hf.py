"""Hugging Face formats: imagefolder + metadata.jsonl, Parquet as `datasets` writes it, and load_dataset."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from rcit_bench.data.hf import load_hf_hub, load_hf_imagefolder, load_hf_parquet

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
SPLITS = ["train", "train", "validation", "test", "test"]


def _rows():
    return [
        {"file_name": f"img{i}.png", "captions": [f"caption {i} {k}" for k in range(5 + (i == 4))], "split": s}
        for i, s in enumerate(SPLITS)
    ]


@pytest.fixture
def imagefolder(tmp_path):
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (8, 6), c).save(tmp_path / f"img{i}.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    return tmp_path


def test_imagefolder_metadata_with_split_column(imagefolder):
    test = load_hf_imagefolder(imagefolder, "test")
    assert len(test) == 2 and test.num_captions == 11
    assert test.caption_to_image.tolist() == [0] * 5 + [1] * 6
    assert test.captions[0] == "caption 3 0" and test.tokens[0] == ["caption", "3", "0"]
    assert test.image_ids == [3, 4]  # row positions: stable for the given metadata
    assert torch.allclose(test.load_image(1)[:, 0, 0], torch.tensor([0.0, 1.0, 1.0]))
    assert load_hf_imagefolder(imagefolder, "val").image_ids == [2]  # 'validation' answers 'val'


def test_imagefolder_is_the_real_format(imagefolder):
    """The same folder loads with datasets' own imagefolder builder (so ours reads the real format)."""
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(imagefolder), split="train")
    assert len(ds) == 5 and ds[3]["captions"] == _rows()[3]["captions"] and ds[3]["split"] == "test"


def test_imagefolder_split_directories(tmp_path):
    for split, n in (("train", 2), ("test", 1)):
        (tmp_path / split).mkdir()
        rows = []
        for i in range(n):
            Image.new("L", (5, 5), 40 * (i + 1)).save(tmp_path / split / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "sentences": [{"raw": f"{split} image {i}"}], "image_id": 100 + i})
        (tmp_path / split / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train = load_hf_imagefolder(tmp_path, "train")
    assert train.image_ids == [100, 101] and train.captions == ["train image 0", "train image 1"]
    assert torch.allclose(train.load_image(1), torch.full((3, 5, 5), 80 / 255))  # grayscale -> RGB


def test_imagefolder_errors(tmp_path, imagefolder):
    with pytest.raises(FileNotFoundError, match="No metadata.jsonl found"):
        load_hf_imagefolder(_empty(tmp_path), "train")
    (imagefolder / "img3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img3\.png"):
        load_hf_imagefolder(imagefolder, "test")
    rows = _rows()
    rows[0]["captions"] = []
    (imagefolder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"metadata\.jsonl row 0: the image has no captions"):
        load_hf_imagefolder(imagefolder, "train")
    rows[0] = {"file_name": "../img0.png", "captions": ["x"], "split": "train"}
    (imagefolder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"must stay inside"):
        load_hf_imagefolder(imagefolder, "train")
    rows[0] = {"file_name": "img0.png", "text_in_other_column": ["x"], "split": "train"}
    (imagefolder / "metadata.jsonl").write_text(json.dumps(rows[0]))
    with pytest.raises(ValueError, match=r"no caption column found. Expected one of captions, caption"):
        load_hf_imagefolder(imagefolder, "train")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def _hf_dataset(rows_idx, with_split=True):
    import datasets

    data = {
        "image": [Image.new("RGB", (8, 6), COLOURS[i]) for i in rows_idx],
        "captions": [_rows()[i]["captions"] for i in rows_idx],
    }
    if with_split:
        data["split"] = [SPLITS[i] for i in rows_idx]
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string")),
                                  **({"split": datasets.Value("string")} if with_split else {})})
    return datasets.Dataset.from_dict(data, features=features)


def test_parquet_with_split_column(tmp_path):
    _hf_dataset(range(5)).to_parquet(str(tmp_path / "all.parquet"))
    import pyarrow.parquet as pq

    schema = pq.read_schema(tmp_path / "all.parquet")
    assert schema.field("image").type.names == ["bytes", "path"]  # the struct as HF writes it
    test = load_hf_parquet(tmp_path / "all.parquet", "test")
    assert test.image_ids == [3, 4] and test.num_captions == 11
    assert torch.allclose(test.load_image(0)[:, 2, 3], torch.tensor([1.0, 1.0, 0.0]))
    assert load_hf_parquet(str(tmp_path / "*.parquet"), "train").num_captions == 10  # glob


def test_parquet_split_from_file_names(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _hf_dataset([0, 1], with_split=False).to_parquet(str(d / "train-00000-of-00001.parquet"))
    _hf_dataset([2], with_split=False).to_parquet(str(d / "validation-00000-of-00001.parquet"))
    _hf_dataset([3, 4], with_split=False).to_parquet(str(d / "test-00000-of-00001.parquet"))
    val = load_hf_parquet(d, "val")
    assert len(val) == 1 and val.captions[0] == "caption 2 0"
    assert torch.allclose(val.load_image(0)[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert len(load_hf_parquet(d, "test")) == 2
    (d / "validation-00000-of-00001.parquet").unlink()
    with pytest.raises(ValueError, match=r"no Parquet file named for split 'val'"):
        load_hf_parquet(d, "val")
    with pytest.raises(FileNotFoundError, match=r"No Parquet files found at .*nothing"):
        load_hf_parquet(tmp_path / "nothing", "val")


def test_hub_loader_on_a_local_dataset_directory(tmp_path):
    d = tmp_path / "local_ds" / "data"
    d.mkdir(parents=True)
    _hf_dataset([0, 1], with_split=False).to_parquet(str(d / "train-00000-of-00001.parquet"))
    _hf_dataset([3, 4], with_split=False).to_parquet(str(d / "test-00000-of-00001.parquet"))
    test = load_hf_hub(str(tmp_path / "local_ds"), "test")
    assert test.num_captions == 11 and test.caption_to_image.tolist() == [0] * 5 + [1] * 6
    assert torch.allclose(test.load_image(1)[:, 0, 0], torch.tensor([0.0, 1.0, 1.0]))


def test_hub_offline_error_is_clear(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(RuntimeError, match=r"Could not load the Hugging Face dataset 'nobody/no-such-dataset-rcit'.*hf_parquet"):
        load_hf_hub("nobody/no-such-dataset-rcit", "test")
