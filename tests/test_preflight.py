"""Checked before anything trains: every split of the data and every entry's composed config, all problems
reported at once, so a broken test split or a typo in entry 2 costs seconds, not a training run."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from rcit_bench.bench import runner
from rcit_bench.bench.spec import validate_spec
from rcit_bench.data.synthetic import JSON_NAME, ensure_synthetic
from tiny_specs import TINY_MODEL, tiny_trainer


@pytest.fixture(scope="module")
def karpathy_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic set, whose Karpathy JSON the tests copy and break."""
    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic(root, n_train=16, n_val=8, n_test=8, image_size=32, seed=0)
    return root


def _spec(root: Path, json_path: Path, second_overrides: dict[str, Any] | None = None) -> Any:
    data = {"name": "pre", "dataset": {"kind": "karpathy", "options": {
                "root": str(root / "images"), "json_path": str(json_path), "image_size": 32, "batch_size": 8,
                "eval_batch_size": 8, "num_workers": 0}},
            "trainer": tiny_trainer(1),
            "entries": [{"id": "first", "method": "vsepp", "overrides": TINY_MODEL},
                        {"id": "second", "method": "vsepp", "overrides": second_overrides or TINY_MODEL}],
            "evaluation": {"clean": True}}
    return validate_spec(data)


def _broken(root: Path, tmp: Path, edit: Any) -> Path:
    data = json.loads((root / JSON_NAME).read_text())
    edit(data, root, tmp)
    out = tmp / "broken.json"
    out.write_text(json.dumps(data))
    return out


def _no_raw(data: dict, root: Path, tmp: Path) -> None:
    test = next(e for e in data["images"] if e["split"] == "test")
    del test["sentences"][0]["raw"]


def _empty_image(data: dict, root: Path, tmp: Path) -> None:
    test = next(e for e in data["images"] if e["split"] == "test")
    images = tmp / "images"
    shutil.copytree(root / "images", images, dirs_exist_ok=True)
    (images / test["filename"]).write_bytes(b"")


def _no_test(data: dict, root: Path, tmp: Path) -> None:
    data["images"] = [e for e in data["images"] if e["split"] != "test"]


@pytest.mark.parametrize("edit, message", [
    (_no_raw, r"dataset 'karpathy' at .*: broken.json: sentence #0 of image entry #\d+ .* is missing the field 'raw'"),
    (_empty_image, r"dataset 'karpathy' at .*is empty \(0 bytes\)"),
    (_no_test, r"dataset 'karpathy' at .*has no images in split 'test'"),
])
def test_a_broken_test_split_fails_before_training(karpathy_copy: Path, tmp_path: Path, edit: Any, message: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[str] = []
    monkeypatch.setattr(runner, "train", lambda *a, **k: trained.append("x"))
    json_path = _broken(karpathy_copy, tmp_path, edit)
    root = tmp_path if (tmp_path / "images").is_dir() else karpathy_copy
    with pytest.raises(ValueError, match=r"spec 'pre' cannot run, nothing was trained:\n  - " + message):
        runner.run_spec(_spec(root, json_path), results_dir=tmp_path / "runs", use_wandb=False)
    assert trained == [] and not (tmp_path / "runs").exists()


def test_every_entry_is_checked_before_the_first_trains(karpathy_copy: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in the second entry's overrides is reported before the first entry trains."""
    trained: list[str] = []
    monkeypatch.setattr(runner, "train", lambda *a, **k: trained.append("x"))
    typo = copy.deepcopy(TINY_MODEL)
    typo["model"]["embed_dimm"] = 16
    typo["optim"] = {"learning_rate": 0.1}
    spec = _spec(karpathy_copy, karpathy_copy / JSON_NAME, second_overrides=typo)
    with pytest.raises(ValueError) as err:
        runner.run_spec(spec, results_dir=tmp_path / "runs", use_wandb=False)
    msg = str(err.value)
    assert "entry `second`: method 'vsepp' does not take ['embed_dimm', 'learning_rate']" in msg
    assert "Did you mean 'embed_dim'" in msg and "entry `first`" not in msg
    assert trained == [] and not (tmp_path / "runs").exists()


def test_the_run_logs_the_absolute_data_path(karpathy_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A relative root resolves against the current directory; the run says which folder that is."""
    import logging

    monkeypatch.chdir(karpathy_copy)
    spec = _spec(Path("."), karpathy_copy / JSON_NAME)
    assert spec.dataset_options["root"] == "images"  # relative, as a user writes it
    with caplog.at_level(logging.INFO, logger="rcit_bench.bench.runner"):
        runner.preflight(spec, spec.entries)
    assert f"data: karpathy {(karpathy_copy / 'images').resolve()} (train 16 images, val 8 images, test 8 images)" \
        in caplog.text
