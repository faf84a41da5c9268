"""The dataset registry: the built-in kinds and what they declare, a user's dataset registered from its own
module, and the errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcit_bench.bench import spec as S
from rcit_bench.data import datasets as D
from rcit_bench.data.captions import CaptionSplit
from rcit_bench.data.datamodule import RetrievalDataModule

BUILTIN = {"synthetic", "flickr30k", "coco", "karpathy", "hf_imagefolder", "hf_parquet", "hf_hub"}


def test_builtin_kinds_and_what_they_declare() -> None:
    assert set(D.list_datasets()) >= BUILTIN
    assert D.dataset_info("coco").protocols == {"coco_1k"}
    assert D.dataset_info("synthetic").protocols == {"pointing_game"}
    assert {k for k in BUILTIN if D.dataset_info(k).protocols} == {"coco", "synthetic"}
    assert D.dataset_info("flickr30k").default_root == "data/flickr30k"
    assert D.dataset_info("hf_hub").root_is_path is False and D.dataset_info("karpathy").needs_json
    assert D.dataset_info("synthetic").cache_images and not D.dataset_info("coco").cache_images
    assert all(D.dataset_info(k).description for k in BUILTIN)


def test_unknown_kind_and_bad_registrations() -> None:
    with pytest.raises(ValueError, match=r"Argument `dataset` must be one of .*but got 'flikr30k'.*Did you mean 'flickr30k'"):
        D.dataset_info("flikr30k")
    with pytest.raises(ValueError, match=r"unknown protocols \['coco_5k'\]"):
        D.register_dataset("x_bad", protocols=("coco_5k",))
    with pytest.raises(ValueError, match="already registered"):
        D.register_dataset("coco")(lambda source, split: None)


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    dm = RetrievalDataModule("coco", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"dataset='coco' not found: .*nowhere\. Get the COCO 2014 .*"
                                                r"dataset_coco\.json.*dataset='synthetic'"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"dataset='hf_parquet' needs `root`"):
        RetrievalDataModule("hf_parquet")


@pytest.fixture
def user_dataset(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """A dataset registered as a user's module would: 4 grey images per split, 2 captions each."""
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(D, "_DATASETS", dict(D._DATASETS))  # the registration ends with the test

    def grey(i: int, size: int | None = None) -> torch.Tensor:
        return torch.full((3, size or 8, size or 8), 40 * i, dtype=torch.uint8)

    @D.register_dataset("tiny_grey", default_root="data/tiny_grey", protocols=("pointing_game",))
    def load(source: D.DataSource, split: str) -> CaptionSplit:
        """Grey squares."""
        calls.append((str(source.root), split))
        caps = [f"a grey square number {i} {j}" for i in range(4) for j in range(2)]
        return CaptionSplit(list(range(4)), caps, [c.split() for c in caps], [i for i in range(4) for _ in range(2)],
                            grey, name=f"tiny_grey/{split}")

    return calls


def test_a_user_dataset_loads_through_the_datamodule_and_the_spec(user_dataset: list) -> None:
    dm = RetrievalDataModule("tiny_grey", image_size=8, batch_size=4, eval_batch_size=4)
    dm.setup("fit")
    assert user_dataset == [("data/tiny_grey", "train"), ("data/tiny_grey", "val")]
    batch = next(iter(dm.image_loader("val")))
    assert batch["images"].shape == (4, 3, 8, 8) and float(batch["images"][1].mean()) == pytest.approx(40 / 255)
    spec = {"name": "u", "dataset": {"kind": "tiny_grey"}, "entries": [{"id": "m", "method": "matchmap"}],
            "evaluation": {"clean": True, "pointing_game": True}}
    assert S.validate_spec(spec).dataset_kind == "tiny_grey"  # it declares object boxes: the pointing game is allowed
    spec["dataset"]["kind"] = "flickr30k"
    with pytest.raises(ValueError, match=r"needs object boxes, which only dataset\(s\) 'synthetic', 'tiny_grey' have"):
        S.validate_spec(spec)
