"""README "Extending rcit-bench": the three recipes (a corruption, a dataset, a method) and the spec that uses
them, taken from the README as written, run end to end. If a recipe rots, this fails."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcit_bench.bench import runner
from rcit_bench.data import datasets
from rcit_bench.data.corruptions import registry as corruption_registry
from rcit_bench.models import registry as method_registry

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- file: (?P<name>[\w.]+) -->\n```\w+\n(?P<body>.*?)```", re.S)


def readme_files() -> dict[str, str]:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Extending rcit-bench", 1)[1].split("\n## ", 1)[0]
    return {m["name"]: m["body"] for m in BLOCK.finditer(section)}


def test_the_readme_has_the_three_recipes_and_a_spec() -> None:
    assert set(readme_files()) == {"vignette.py", "csv_pairs.py", "vse_infonce.py", "vse_infonce.yaml", "my_spec.yaml"}


def _write_pairs(root: Path) -> None:
    """A csv_pairs dataset: 8 / 4 / 4 images of coloured halves, two captions each."""
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    root.mkdir(parents=True)
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "caption"])
            for i in range(n):
                top, bottom = rng.choice(list(colours), 2, replace=False)
                img = np.zeros((32, 32, 3), np.uint8)
                img[:16], img[16:] = colours[top], colours[bottom]
                name = f"{split}_{i}.png"
                Image.fromarray(img).save(root / name)
                w.writerow([name, f"{top} above {bottom}"])
                w.writerow([name, f"a {bottom} half under a {top} half"])


@pytest.fixture
def clean_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipes register names; they are gone after the test (other tests list the built-ins). The built-ins are
    loaded first: a registry filled lazily during the test would fill the copy and leave the original empty."""
    corruption_registry.list_corruptions()
    datasets.list_datasets()
    method_registry.list_methods()
    monkeypatch.setattr(corruption_registry, "_REGISTRY", dict(corruption_registry._REGISTRY))
    monkeypatch.setattr(datasets, "_DATASETS", dict(datasets._DATASETS))
    monkeypatch.setattr(method_registry, "_METHODS", dict(method_registry._METHODS))


def test_recipes_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registries: None,
                                one_thread: None) -> None:
    for name, body in readme_files().items():
        (tmp_path / name).write_text(body)
    _write_pairs(tmp_path / "data" / "my_pairs")
    monkeypatch.chdir(tmp_path)  # the spec's dataset root is relative to where the user runs it
    summary = runner.run_spec(tmp_path / "my_spec.yaml", results_dir=tmp_path / "runs", use_wandb=False,
                              leaderboard_dir=tmp_path / "board")
    assert summary.failed == 0 and summary.evaluated == 5 and summary.trained == ["infonce/seed0"]

    # the corruption: registered with its metadata, and its pixels as the formula says
    from rcit_bench.data.corruptions import corrupt, corruption_info, list_corruptions

    info = corruption_info("vignette")
    assert "vignette" in list_corruptions() and (info.family, info.mode, info.random) == ("digital", "severity", False)
    grey = torch.full((1, 3, 9, 9), 0.5)
    out = corrupt(grey, "vignette", severity=5, seed=0)
    assert float(out[0, 0, 4, 4]) == pytest.approx(0.5) and float(out[0, 0, 0, 0]) == pytest.approx(0.5 * 0.2)

    # the dataset and the method went through the whole pipeline: one result file per cell, all ok
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs" / "my-extension" / "infonce" / "seed0").glob("*.json") if p.name != "state.json"}
    assert set(cells) == {"clean", "ic-vignette-s1", "ic-vignette-s5", "ic-contrast-s1", "ic-contrast-s5"}
    assert all(r["status"] == "ok" and r["entry"]["method"] == "vse_infonce" for r in cells.values())
    assert cells["clean"]["config"]["data"]["dataset"] == "csv_pairs"
    assert cells["clean"]["config"]["model"]["temperature"] == 0.05
    moved = [cells[f"ic-vignette-s{s}"]["image_change"]["mean_abs_diff"] for s in (1, 5)]
    assert 0 < moved[0] < moved[1]  # severity 5 darkens more than severity 1
    board = (tmp_path / "board" / "README.md").read_text()
    assert "vignette" in board and "infonce" in board


def test_a_missing_import_is_named(tmp_path: Path) -> None:
    from rcit_bench.bench.spec import validate_spec

    spec = {"name": "x", "imports": ["nowhere.py"], "dataset": {"kind": "synthetic"},
            "entries": [{"id": "a", "method": "vsepp"}], "evaluation": {"clean": True}}
    with pytest.raises(ValueError, match=r"Spec key `imports\[0\]`: file 'nowhere.py' not found"):
        validate_spec(spec, tmp_path / "spec.yaml")
    spec["imports"] = ["no_such_module_here"]
    with pytest.raises(ValueError, match=r"module 'no_such_module_here' not found"):
        validate_spec(spec, tmp_path / "spec.yaml")
