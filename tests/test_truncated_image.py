"""A truncated image file (an interrupted download or copy) is an error naming the file, never an image
half filled with grey; with ``skip_unreadable`` it is skipped with a warning. (test_karpathy covers files
that are not images at all.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcit_bench.data.karpathy import load_karpathy


def _truncated(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)  # noise: little compression
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_truncated_image_named_or_skipped(tmp_path: Path, name: str) -> None:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(root / "ok.png")
    _truncated(root / name)
    entries = [{"split": "test", "filename": f, "imgid": k, "sentences": [{"raw": f"caption {k}"}]}
               for k, f in enumerate([name, "ok.png"])]
    js = tmp_path / "dataset_flickr30k.json"
    js.write_text(json.dumps({"images": entries}))

    split = load_karpathy(js, root, "test")
    with pytest.raises(ValueError, match=rf"Could not decode image .*{name}.*truncated"):
        split.load_image(0)
    with pytest.warns(UserWarning, match=r"Skipped 1 missing or unreadable"):
        split = load_karpathy(js, root, "test", skip_unreadable=True)
    assert split.image_ids == [1] and split.load_image(0).shape == (3, 8, 8)
