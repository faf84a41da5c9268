"""Spec loading and validation: errors name the key path, the bad value, the choices and a did-you-mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rcit_bench.bench import spec as S

IC = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow",
      "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
      "speckle_noise", "gaussian_blur", "spatter", "saturate"]
RATE = ["speckle", "salt_pepper"]
PERT = ["char_typo", "char_insert", "char_delete", "char_swap", "word_drop", "word_swap", "word_duplicate"]
METHODS = ["matchmap", "miie", "rcit", "vsepp", "vsrpp"]


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed name lists so these unit tests do not depend on the other modules' registries."""
    monkeypatch.setattr(S, "known_methods", lambda: list(METHODS))
    monkeypatch.setattr(S, "known_corruptions", lambda: (IC + RATE, list(IC), list(RATE)))
    monkeypatch.setattr(S, "known_perturbations", lambda: list(PERT))
    monkeypatch.setattr(S, "_resolve_config", lambda where, value, method, spec_dir: value)
    monkeypatch.setattr(S, "_datamodule_params", lambda: None)


def base_spec() -> dict:
    return {
        "name": "t",
        "dataset": {"kind": "synthetic", "options": {"image_size": 32}},
        "seeds": [0, 1],
        "baseline": "vsepp_clean",
        "trainer": {"max_epochs": 1},
        "entries": [
            {"id": "vsepp_clean", "method": "vsepp", "regime": "clean"},
            {"id": "vsepp_aug", "method": "vsepp", "regime": "augment",
             "corruption_mix": [{"name": "speckle", "rate": 0.6}, {"name": "salt_pepper", "rate": 0.6}]},
            {"id": "rcit", "method": "rcit", "regime": "paired", "corruption_mix": [{"name": "speckle", "rate": 0.6}]},
            {"id": "mm", "method": "matchmap"},
        ],
        "evaluation": {
            "clean": True,
            "imagenet_c": {"corruptions": ["gaussian_noise", "fog"], "severities": [5, 1, 3]},
            "rcit_protocol": {"corruptions": ["speckle", "salt_pepper"], "rates": [0.6, 0.2]},
            "text": {"perturbations": ["char_typo"], "levels": [1, 3]},
            "pointing_game": True,
        },
    }


def test_valid_spec_expands_grid(names: None) -> None:
    sp = S.validate_spec(base_spec())
    assert [e.id for e in sp.entries] == ["vsepp_clean", "vsepp_aug", "rcit", "mm"]
    assert sp.entries[3].regime == "clean" and sp.entries[3].config == "matchmap"
    ids = [c.id for c in sp.cells("vsepp_clean")]
    expected = (["clean"] + [f"ic-{n}-s{s}" for n in ("gaussian_noise", "fog") for s in (1, 3, 5)]
                + [f"rcit-{n}-r{r}" for n in RATE for r in ("0.2", "0.6")] + ["text-char_typo-l1", "text-char_typo-l3"])
    assert ids == expected
    mm = [c.id for c in sp.cells("mm")]
    assert mm[-3:] == ["pg-clean", "pg-speckle-r0.6", "pg-salt_pepper-r0.6"]  # main rate defaults to first given
    assert sp.evaluation["rcit_protocol"]["main_pixel_noise_rate"] == 0.6
    cell = next(c for c in sp.cells("mm") if c.id == "rcit-speckle-r0.2")
    assert (cell.kind, cell.corruption, cell.rate, cell.severity) == ("rcit", "speckle", 0.2, None)


def test_hash_is_stable_and_sensitive(names: None) -> None:
    a = S.validate_spec(base_spec()).hash
    reordered = base_spec()
    reordered["evaluation"]["imagenet_c"]["severities"] = [1, 3, 5]  # normalised: same spec
    assert S.validate_spec(reordered).hash == a
    changed = base_spec()
    changed["trainer"]["max_epochs"] = 2
    sp2 = S.validate_spec(changed)
    assert sp2.hash != a and len(a) == 64
    # entry hash: changes with the trainer, not with the evaluation grid
    sp1 = S.validate_spec(base_spec())
    grid = base_spec()
    grid["evaluation"]["text"]["levels"] = [1]
    assert S.validate_spec(grid).entry_hash("rcit") == sp1.entry_hash("rcit") != sp2.entry_hash("rcit")


def _mutate(path: list, value: object, delete: bool = False) -> dict:
    d = base_spec()
    obj = d
    for k in path[:-1]:
        obj = obj[k]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return d


@pytest.mark.parametrize(
    "path,value,message",
    [
        (["entries", 2, "method"], "rcti", r"`entries\[2\]\.method` must be one of 'matchmap', .*'rcit'.*Did you mean 'rcit'"),
        (["entries", 0, "regim"], "clean", r"Unknown spec key `entries\[0\]\.regim`.*Did you mean 'regime'"),
        (["evalution"], {}, r"Unknown spec key `evalution`.*Did you mean 'evaluation'"),
        (["evaluation", "imagenet_c", "corruptions", 1], "fogg",
         r"`evaluation\.imagenet_c\.corruptions\[1\]` must be one of .*'fog'.*but got 'fogg'\. Did you mean 'fog'"),
        (["evaluation", "imagenet_c", "severities"], [1, 6],
         r"`evaluation\.imagenet_c\.severities\[1\]` must be one of 1, 2, 3, 4, 5, but got 6"),
        (["evaluation", "rcit_protocol", "corruptions", 0], "speckle_noise",
         r"`evaluation\.rcit_protocol\.corruptions\[0\]` must be one of 'speckle', 'salt_pepper'.*Did you mean 'speckle'"),
        (["evaluation", "rcit_protocol", "rates", 1], 1.5, r"`evaluation\.rcit_protocol\.rates\[1\]` must be a pixel noise rate"),
        (["evaluation", "text", "perturbations", 0], "char_typos", r"`evaluation\.text\.perturbations\[0\]`.*Did you mean 'char_typo'"),
        (["evaluation", "text", "levels"], [0], r"`evaluation\.text\.levels\[0\]` must be one of 1, 2, 3, 4, 5, but got 0"),
        (["entries", 1, "corruption_mix", 0, "name"], "speckel", r"`entries\[1\]\.corruption_mix\[0\]\.name`.*Did you mean 'speckle'"),
        (["entries", 1, "corruption_mix", 0], {"name": "fog", "rate": 0.5}, r"`entries\[1\]\.corruption_mix\[0\]`: Corruption 'fog' is an ImageNet-C corruption: pass `severity`"),
        (["entries", 1, "regime"], "augmented", r"`entries\[1\]\.regime` must be one of 'clean', 'augment', 'paired'.*Did you mean 'augment'"),
        (["entries", 0, "regime"], "paired", r"`entries\[0\]\.regime`: 'paired' training .* is for methods that train on both views \('rcit'\)"),
        (["baseline"], "vsepp", r"`baseline` must be one of 'vsepp_clean', .*Did you mean 'vsepp_aug'|`baseline` must be one of"),
        (["trainer", "max_epoch"], 1, r"Unknown spec key `trainer\.max_epoch`.*Did you mean 'max_epochs'"),
        (["dataset", "kind"], "flickr", r"`dataset\.kind` must be one of .*Did you mean 'flickr30k'"),
        (["dataset", "options", "seed"], 3, r"`dataset\.options\.seed` is set by the runner"),
        (["seeds"], [0, 0], r"`seeds` has duplicates"),
        (["entries", 1, "id"], "vsepp_clean", r"`entries\[1\]\.id`: duplicate entry id 'vsepp_clean'"),
        (["entries", 0, "overrides"], {"modle": {}}, r"Unknown spec key `entries\[0\]\.overrides\.modle`.*Did you mean 'model'"),
    ],
)
def test_validation_errors_name_key_path(names: None, path: list, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S.validate_spec(_mutate(path, value))


def test_required_keys_and_pointing_game_dataset(names: None) -> None:
    with pytest.raises(ValueError, match=r"`entries\[1\]\.corruption_mix` is required for regime 'augment'"):
        S.validate_spec(_mutate(["entries", 1, "corruption_mix"], None, delete=True))
    with pytest.raises(ValueError, match=r"Spec key `dataset` is required"):
        S.validate_spec(_mutate(["dataset"], None, delete=True))
    d = base_spec()
    d["dataset"]["kind"] = "flickr30k"
    with pytest.raises(ValueError, match=r"`evaluation\.pointing_game` needs object boxes"):
        S.validate_spec(d)


def test_load_spec_file_and_unknown_entry(names: None, tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(base_spec()))
    sp = S.load_spec(p)
    assert sp.path == p and sp.name == "t"
    with pytest.raises(ValueError, match=r"Argument `only` must name an entry.*Did you mean 'vsepp_clean'"):
        sp.entry("vsepp_clen")
    with pytest.raises(FileNotFoundError, match="not found"):
        S.load_spec(tmp_path / "missing.yaml")


def test_deep_merge() -> None:
    base = {"model": {"a": 1, "b": {"c": 2}}, "optim": {"lr": 1e-3}}
    out = S.deep_merge(base, {"model": {"b": {"d": 3}}, "optim": {"lr": 2e-4}})
    assert out == {"model": {"a": 1, "b": {"c": 2, "d": 3}}, "optim": {"lr": 2e-4}}
    assert base["model"]["b"] == {"c": 2}  # not mutated


def _real_modules_available() -> bool:
    try:
        S.known_methods()
        S.known_corruptions()
        S.known_perturbations()
        from rcit_bench.data.datamodule import RetrievalDataModule  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", ["smoke", "quick", "flickr30k", "coco"])
def test_shipped_specs_validate(name: str) -> None:
    """The shipped specs validate against the real registries (methods, corruptions, configs)."""
    if not _real_modules_available():
        pytest.skip("method / corruption modules not importable yet")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.yaml"
    sp = S.load_spec(path)
    assert sp.name == name
    assert sp.baseline is not None and sp.entry(sp.baseline).method == "vsepp"
    assert sp.entry(sp.baseline).regime == "clean"
    if name == "quick":
        assert {e.method for e in sp.entries} == {"vsepp", "rcit", "miie", "matchmap", "vsrpp"}
        assert len(sp.evaluation["imagenet_c"]["corruptions"]) == 19
        assert sp.evaluation["imagenet_c"]["severities"] == [1, 3, 5]
        assert sp.evaluation["rcit_protocol"]["pixel_noise_rates"] == [0.2, 0.4, 0.6]
        assert sp.evaluation["rcit_protocol"]["main_pixel_noise_rate"] == 0.6
        aug = [e for e in sp.entries if e.method == "vsepp" and e.regime == "augment"]
        assert aug and {m["name"] for m in aug[0].corruption_mix} == {"speckle", "salt_pepper"}
    if name in ("quick", "flickr30k", "coco"):  # the correspondence-noise axis: VSE++ and RCIT under mismatched pairs
        rates = {(e.method, bool(e.small_loss)): set() for e in sp.entries}
        for e in sp.entries:
            rates[(e.method, bool(e.small_loss))].add(e.mismatch_rate)
        expected = {0.2, 0.5} if name == "quick" else {0.2, 0.5, 0.8}
        assert rates[("vsepp", False)] >= expected | {0.0} and rates[("rcit", False)] >= expected | {0.0}
        assert rates[("vsepp", True)] == ({0.5} if name == "quick" else expected)
        assert all(e.evaluate == ["clean"] for e in sp.entries if e.mismatch_rate)
    if name in ("flickr30k", "coco"):
        assert sp.seeds == [0, 1, 2]
        assert sp.evaluation["imagenet_c"]["severities"] == [1, 2, 3, 4, 5]
        assert len(sp.evaluation["imagenet_c"]["corruptions"]) == 19


def test_entry_hash_follows_config_file(names: None, tmp_path: Path) -> None:
    d = base_spec()
    d["entries"][0]["config"] = "my_vsepp.yaml"
    cfg = tmp_path / "my_vsepp.yaml"
    cfg.write_text("method: vsepp\nmodel: {embed_dim: 64}\n")
    sp = S.validate_spec(d, tmp_path / "spec.yaml")
    assert S.config_path(sp, sp.entries[0]) == tmp_path / "my_vsepp.yaml"
    h1 = sp.entry_hash("vsepp_clean")
    cfg.write_text("method: vsepp\nmodel: {embed_dim: 128}\n")
    assert sp.entry_hash("vsepp_clean") != h1  # an edited config retrains
    assert sp.entry_hash("vsepp_aug") == S.validate_spec(d, tmp_path / "spec.yaml").entry_hash("vsepp_aug")
