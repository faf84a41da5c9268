"""Everything a user can get wrong is checked before the first minute of training, and reported in one line
(`rcit-bench <cmd>: error: ...`, exit 2, no traceback) that names the key or argument, the bad value and the
fix: spec files that are not YAML or not a mapping, encoder arguments, trainer values, an accelerator the
machine lacks, and `rcit-bench corrupt` sizes."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from rcit_bench import cli
from rcit_bench.bench.spec import load_spec, validate_spec
from rcit_bench.errors import UserError
from tiny_specs import TINY_MODEL, tiny_dataset, tiny_trainer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int, command: str) -> str:
    """The message of a one-line user error of `command` (exit 2, no traceback)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"rcit-bench {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0][len(f"rcit-bench {command}: error: "):]


def _bench(tmp_path: Path, spec: Path | str) -> int:
    return cli.main(["bench", str(spec), "--results-dir", str(tmp_path / "runs"), "--no-wandb"])


def _smoke() -> dict[str, Any]:
    return yaml.safe_load(SMOKE.read_text())


def _write(tmp_path: Path, data: Any, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- 1, 2: the file


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "name: broken\ndataset:\n  kind: synthetic\n  options: {root: x\nentries: []\n")
    msg = _one_line_error(capsys, _bench(tmp_path, path), "bench")
    assert msg.startswith(f"Spec file '{path}' is not valid YAML at line 5, column 8: ")
    assert "fix the YAML syntax there" in msg
    assert not (tmp_path / "runs").exists()


def test_yaml_error_line_and_column_are_one_based(tmp_path: Path) -> None:
    path = _write(tmp_path, "a: 1\n b: 2\n")  # the bad ':' is on the second line, third column
    with pytest.raises(UserError, match=r"is not valid YAML at line 2, column 3: mapping values are not allowed"):
        load_spec(path)


@pytest.mark.parametrize("text,says", [
    ("", "is empty; a spec is a YAML mapping with the keys name, dataset, entries and evaluation"),
    ("# only a comment\n", "is empty; a spec is a YAML mapping"),
    ("- name: smoke\n- entries: []\n", "holds a list, not a mapping; a spec is a YAML mapping"),
    ("smoke\n", "holds a single str value ('smoke'), not a mapping"),
    ("42\n", "holds a single int value (42), not a mapping"),
])
def test_empty_list_or_scalar_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                        says: str) -> None:
    path = _write(tmp_path, text)
    msg = _one_line_error(capsys, _bench(tmp_path, path), "bench")
    assert msg.startswith(f"Spec file '{path}' {says}")
    assert "Spec key ``" not in msg


def test_spec_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 9\); save it as UTF-8"):
        load_spec(path)


# ---------------------------------------------------------------------------------------------- 3: encoders


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def _tiny_spec(root: Path, model: dict[str, Any]) -> dict[str, Any]:
    overrides = copy.deepcopy(TINY_MODEL)
    overrides["model"].update(model)
    return {"name": "enc", "dataset": tiny_dataset(root), "trainer": tiny_trainer(1),
            "entries": [{"id": "e", "method": "vsepp", "overrides": overrides}], "evaluation": {"clean": True}}


@pytest.mark.parametrize("model,says", [
    ({"image_encoder": {"nme": "small_cnn"}},  # merged into the config's {name: small_cnn, ...}
     "Argument `image_encoder`: encoder 'small_cnn' does not take 'nme'; it takes `name` and 'input_size', "
     "'channels', 'stem_stride', 'global_pool'. Did you mean 'name'?"),
    ({"image_encoder": {"name": "small_cnn", "channls": [8]}},
     "Argument `image_encoder`: encoder 'small_cnn' does not take 'channls'; it takes `name` and 'input_size', "
     "'channels', 'stem_stride', 'global_pool'. Did you mean 'channels'?"),
    ({"text_encoder": {"name": "gru", "wrd_dim": 8}},
     "Argument `text_encoder`: encoder 'gru' does not take 'wrd_dim'; it takes `name` and 'word_dim', 'num_layers', "
     "'pad_id'. Did you mean 'word_dim'?"),
    ({"image_encoder": {"name": "small_cnn", "embed_dim": 8}},
     "Argument `image_encoder`: 'embed_dim' is set by the method (its own `embed_dim` argument)"),
    ({"image_encoder": "small_cn"},
     "Unknown image encoder 'small_cn' for argument `image_encoder`; registered: 'hf', 'small_cnn', 'timm'. Did you mean "
     "'small_cnn'?"),
])
def test_encoder_argument_mistakes_are_one_line(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str],
                                                model: dict[str, Any], says: str) -> None:
    path = _write(tmp_path, _tiny_spec(data_root, model))
    rc = _bench(tmp_path, path)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "rcit-bench bench: error: " in err, err
    assert says in err, err  # on its own line (a check before training may list it with the entry's id)


def test_encoder_check_reads_the_builder_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is made on the registered builder's signature before calling it: a TypeError raised inside a
    builder (a bug) stays a TypeError; a builder taking **kwargs accepts anything."""
    from rcit_bench.models import registry

    registry.list_image_encoders()  # the built-ins are registered

    def buggy(spec: str | None, embed_dim: int, depth: int = 2) -> Any:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    def open_ended(spec: str | None, embed_dim: int, **kwargs: Any) -> Any:
        return kwargs

    monkeypatch.setitem(registry._IMAGE_ENCODERS, "buggy", buggy)
    monkeypatch.setitem(registry._IMAGE_ENCODERS, "open_ended", open_ended)
    with pytest.raises(TypeError, match="unsupported operand") as info:
        registry.build_image_encoder("buggy", embed_dim=4, depth=3)
    assert not isinstance(info.value, UserError)
    with pytest.raises(UserError, match=r"encoder 'buggy' does not take 'dept'; it takes `name` and 'depth'\. "
                                        r"Did you mean 'depth'\?"):
        registry.build_image_encoder("buggy", embed_dim=4, dept=3)
    assert registry.build_image_encoder("open_ended", embed_dim=4, anything=1) == {"anything": 1}
    registry.check_encoder("image_encoder", {"name": "small_cnn", "channels": [8]})  # valid: no error
    with pytest.raises(UserError, match=r"^Argument `image_encoder` must be a name or a mapping with a `name` key "
                                        r"\(the encoder\), but got a mapping with 'nme'\. Did you mean 'name' instead "
                                        r"of 'nme'\?$"):
        registry.check_encoder("image_encoder", {"nme": "small_cnn"})
    with pytest.raises(UserError, match=r"encoder 'gru' does not take 'wrd_dim'"):
        registry.check_encoder("text_encoder", {"name": "gru", "wrd_dim": 3})


# ---------------------------------------------------------------------------------------------- 4, 5: trainer


@pytest.mark.parametrize("key,value,says", [
    ("max_epochs", "one", "`trainer.max_epochs` must be an integer >= 0, or -1 for no epoch limit"),
    ("max_epochs", 1.5, "`trainer.max_epochs` must be an integer >= 0"),
    ("max_steps", -2, "`trainer.max_steps` must be an integer >= 0, or -1 for no step limit"),
    ("limit_train_batches", -1, "`trainer.limit_train_batches` must be an integer >= 0 (a number of batches) or a "
                                "fraction in [0.0, 1.0]"),
    ("limit_val_batches", 1.5, "`trainer.limit_val_batches` must be an integer >= 0"),
    ("devices", "x", "`trainer.devices` must be a number of devices >= 1, -1 (all), 'auto', or a list"),
    ("devices", 0, "`trainer.devices` must be a number of devices >= 1"),
    ("precision", 17, "`trainer.precision` must be one of '16-mixed', 'bf16-mixed', '32-true'"),
    ("precision", "16-mix", "`trainer.precision` must be one of '16-mixed', 'bf16-mixed', '32-true', '64-true', "
                            "'16-true', 'bf16-true', 'transformer-engine', 'transformer-engine-float16', '16', '32', "
                            "'64', 'bf16', 16, 32, 64, but got '16-mix'. Did you mean '16-mixed'?"),
    ("accelerator", "cpux", "`trainer.accelerator` must be one of 'auto', 'cpu', 'gpu', 'cuda', 'mps', 'tpu', but "
                            "got 'cpux'. Did you mean 'cpu'?"),
    ("gradient_clip_val", -1, "`trainer.gradient_clip_val` must be a number >= 0"),
    ("accumulate_grad_batches", 0, "`trainer.accumulate_grad_batches` must be an integer >= 1, but got 0"),
    ("check_val_every_n_epoch", "2", "`trainer.check_val_every_n_epoch` must be an integer >= 1, but got '2'"),
    ("log_every_n_steps", 0, "`trainer.log_every_n_steps` must be an integer >= 1"),
    ("deterministic", "yes", "`trainer.deterministic` must be true, false or 'warn', but got 'yes'"),
    ("enable_progress_bar", "no", "`trainer.enable_progress_bar` must be true or false, but got 'no'"),
    ("num_sanity_val_steps", -3, "`trainer.num_sanity_val_steps` must be an integer >= 0, or -1"),
])
def test_trainer_values_are_checked(key: str, value: Any, says: str) -> None:
    data = _smoke()
    data["trainer"][key] = value
    with pytest.raises(UserError, match="^Spec key " + re.escape(says)):
        validate_spec(data, SMOKE)


@pytest.mark.parametrize("key,value", [
    ("max_epochs", -1), ("max_epochs", None), ("max_steps", 100), ("limit_train_batches", 0.25),
    ("limit_train_batches", 0), ("devices", "auto"), ("devices", 2), ("devices", -1), ("devices", [0, 1]),
    ("devices", "0,1"), ("precision", "bf16-mixed"), ("precision", 32), ("precision", "64"),
    ("gradient_clip_val", 0.5), ("deterministic", "warn"), ("accelerator", "auto"),
])
def test_valid_trainer_values_pass_unchanged(key: str, value: Any) -> None:
    data = _smoke()
    data["trainer"][key] = value
    spec = validate_spec(data, SMOKE)
    assert spec.trainer[key] == value and spec.raw["trainer"] == data["trainer"]


def test_entry_trainer_overrides_are_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _smoke()
    data["entries"][1]["overrides"] = {**data["entries"][1]["overrides"], "trainer": {"max_epochs": "one"}}
    msg = _one_line_error(capsys, _bench(tmp_path, _write(tmp_path, data)), "bench")
    assert msg == ("Spec key `entries[1].overrides.trainer.max_epochs` must be an integer >= 0, or -1 for no epoch "
                   "limit (then `max_steps` bounds training), but got 'one'.")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_gpu_accelerator_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch, accelerator: str) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = _smoke()
    data["trainer"]["accelerator"] = accelerator
    msg = _one_line_error(capsys, _bench(tmp_path, _write(tmp_path, data)), "bench")
    assert msg == (f"Spec key `trainer.accelerator` is '{accelerator}', but this machine has no CUDA GPU "
                   f"(torch.cuda.is_available() is False); use 'cpu', or 'auto' to take a GPU where there is one.")
    assert not (tmp_path / "runs").exists()
    # where the spec is only read (a leaderboard, a submission from a login node), the device is not checked
    assert validate_spec(data, SMOKE, check_devices=False).trainer["accelerator"] == accelerator


def test_gpu_accelerator_of_an_entry_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    data = _smoke()
    data["entries"][0]["overrides"] = {**data["entries"][0]["overrides"], "trainer": {"accelerator": "gpu"}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^Spec key `entries\[0\]\.overrides\.trainer\.accelerator` is 'gpu'"):
        validate_spec(data, SMOKE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert validate_spec(data, SMOKE).entries[0].overrides["trainer"] == {"accelerator": "gpu"}


# ---------------------------------------------------------------------------------------------- 6: corrupt


def _image(tmp_path: Path, width: int, height: int, name: str = "img.png") -> Path:
    path = tmp_path / name
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _corrupt(tmp_path: Path, image: Path | str, *args: str) -> int:
    return cli.main(["corrupt", str(image), "--out", str(tmp_path / "grid.png"), *args])


@pytest.mark.parametrize("args,says", [
    (["--size", "-5"], "--size must be 0 (keep the image's size) or the short side in px, from 8 to 4096, but got -5."),
    (["--size", "100000"], "--size must be 0 (keep the image's size) or the short side in px, from 8 to 4096, but "
                           "got 100000."),
    (["--size", "4"], "--size must be 0 (keep the image's size) or the short side in px, from 8 to 4096, but got 4."),
    (["--seed", "-1"], "--seed must be an integer >= 0, but got -1."),
])
def test_corrupt_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str) -> None:
    assert _one_line_error(capsys, _corrupt(tmp_path, _image(tmp_path, 20, 20), *args), "corrupt") == says
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("width,height,args,grid", [
    (2000, 4, [], "112000x224"),  # the default --size 224 would make it 112000 x 224 px first
    (2000, 10, ["--size", "0"], "44800x224"),  # kept at 2000 x 10: its layers would still be 44800 x 224
    (10, 2000, ["--size", "0"], "224x44800"),
])
def test_corrupt_refuses_elongated_images_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch, width: int, height: int,
                                                          args: list[str], grid: str) -> None:
    import rcit_bench.data.corruptions as C
    from rcit_bench.data.corruptions import preview

    def must_not_run(*a: Any, **k: Any) -> None:
        raise AssertionError("corruption_grid ran")

    monkeypatch.setattr(C, "corruption_grid", must_not_run)
    monkeypatch.setattr(preview, "corruption_grid", must_not_run)  # what the preview calls
    image = _image(tmp_path, width, height)
    msg = _one_line_error(capsys, _corrupt(tmp_path, image, *args), "corrupt")
    assert msg == (f"image '{image}' ({width}x{height} px, width x height) is too elongated: snow, frost, fog, spatter "
                   f"and elastic_transform would build their random layers on a {grid} px grid (224 px short side), "
                   f"over the budget of 2048 px on its long side, i.e. an aspect ratio of at most 9.1:1; crop the "
                   f"image (--size keeps the aspect ratio, so it cannot help).")


def test_corrupt_refuses_a_too_large_result_naming_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = _image(tmp_path, 3000, 2000)
    msg = _one_line_error(capsys, _corrupt(tmp_path, image, "--size", "0"), "corrupt")
    assert msg == (f"image '{image}' (3000x2000 px, width x height) is too large for the preview: with --size 0 it "
                   f"stays 3000x2000 px, over its budget of at most 4096 px on the long side and 4,194,304 px in all "
                   f"(the grid holds a copy per corruption and severity); pass a smaller --size, at most 1672.")
    msg = _one_line_error(capsys, _corrupt(tmp_path, image, "--size", "2048"), "corrupt")
    assert "--size 2048 makes it 3072x2048 px, over its budget" in msg and msg.endswith("at most 1672.")


def test_corrupt_refuses_a_too_small_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = _image(tmp_path, 6, 5)
    msg = _one_line_error(capsys, _corrupt(tmp_path, image, "--size", "0"), "corrupt")
    assert msg == (f"image '{image}' (6x5 px, width x height) is too small: with --size 0 it stays 6x5 px, and the "
                   f"corruptions need at least 8 px on the short side; pass --size 224.")


def test_corrupt_size_sets_the_short_side_and_keeps_the_aspect_ratio(tmp_path: Path) -> None:
    from rcit_bench.data.corruptions.preview import plan_preview, preview_size

    assert _corrupt(tmp_path, _image(tmp_path, 40, 20), "--size", "60") == 0
    with Image.open(tmp_path / "grid.png") as grid:  # tiles of 120 x 60 px (6 columns, 19 rows) and the labels
        assert grid.size == preview_size(plan_preview(), 60, 120) != preview_size(plan_preview(), 120, 60)


def test_corruption_grid_refuses_over_budget_images() -> None:
    import torch

    from rcit_bench.data.corruptions import corruption_grid

    with pytest.raises(UserError, match=r"Argument `image` of 2000x4 px \(width x height\) is too elongated for the "
                                        r"corruption grid: .* on a 112000x224 px grid"):
        corruption_grid(torch.zeros(3, 4, 2000))
    with pytest.raises(UserError, match=r"Argument `image` of 2100x2100 px .* is too large for the corruption grid"):
        corruption_grid(torch.zeros(3, 2100, 2100))


def test_corrupt_help_states_the_bounds() -> None:
    from rcit_bench.data.corruptions import GRID_MAX_PIXELS, GRID_MAX_SIDE, MAX_REFERENCE_SIDE, REFERENCE_SIZE

    text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["corrupt"].format_help().split())
    assert "the SHORT side is SIZE px, keeping the aspect ratio" in text
    assert f"over {GRID_MAX_SIDE} px on the long side or 4 Mpx ({GRID_MAX_PIXELS:,} px)" in text
    assert f"more elongated than {MAX_REFERENCE_SIDE / REFERENCE_SIZE:.1f}:1" in text


# ---------------------------------------------------------------------------------------------- 7: bench --help


def test_bench_help_says_relative_roots_resolve_against_the_current_directory(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("A relative `dataset.options.root` (or `json_path`) in it resolves against the current directory, not "
            "the spec's folder") in text
