"""Correspondence noise (mismatched training pairs): the noisy index, the datamodule keeping validation and test
clean, the spec keys (sweeps, identity, bad input), the pixel noise rate's new names, and one tiny sweep through
the runner and the leaderboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from rcit_bench.bench.spec import entry_family, validate_spec
from rcit_bench.data.noise import mismatch_captions, mismatch_fraction
from rcit_bench.errors import UserError
from tiny_specs import TINY_MODEL, tiny_dataset, tiny_trainer

C2I = torch.arange(40).repeat_interleave(5)  # 40 images x 5 captions


# ------------------------------------------------------------------------------------------------ the index


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.8, 0.123, 0.999])
def test_exactly_round_rate_captions_move_and_none_lands_on_its_own_image(rate: float) -> None:
    noisy = mismatch_captions(C2I, rate, seed=0)
    moved = noisy != C2I
    assert int(moved.sum()) == round(rate * len(C2I))  # counted independently: every moved caption changed image
    assert mismatch_fraction(C2I, noisy) == pytest.approx(round(rate * len(C2I)) / len(C2I))
    assert noisy.dtype == torch.long and noisy.min() >= 0 and noisy.max() < 40
    assert torch.equal(C2I, torch.arange(40).repeat_interleave(5))  # the input is not modified


def test_rate_zero_is_the_identity_and_the_seed_decides() -> None:
    assert torch.equal(mismatch_captions(C2I, 0.0, seed=5), C2I)
    a, b, c = (mismatch_captions(C2I, 0.5, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_new_images_are_spread_over_the_other_images() -> None:
    """Uniform over the 39 other images: of ~10,000 captions moved away from image 0, each other image gets ~1/39."""
    c2i = torch.cat([torch.zeros(20000, dtype=torch.long), torch.arange(1, 40)])  # image 0 holds most captions
    noisy = mismatch_captions(c2i, 0.5, seed=0)
    moved_from_0 = noisy[:20000][noisy[:20000] != 0]
    counts = torch.bincount(moved_from_0, minlength=40)[1:].double()
    expected = len(moved_from_0) / 39
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 80  # 38 degrees of freedom: the 99.9% quantile is ~70; a biased rule (e.g. always +1) is ~10^5


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, "0.2", True, None])
def test_bad_rates_name_the_key_and_the_value(rate: object) -> None:
    with pytest.raises(UserError, match=r"`rate` must be a fraction of training pairs in \[0, 1\).*but got"):
        mismatch_captions(C2I, rate, seed=0)  # type: ignore[arg-type]


def test_fewer_than_two_images_is_refused() -> None:
    with pytest.raises(UserError, match=r"`mismatch_rate` 0.5 needs at least two images.*has 1"):
        mismatch_captions(torch.zeros(5, dtype=torch.long), 0.5, seed=0)
    assert torch.equal(mismatch_captions(torch.zeros(5, dtype=torch.long), 0.0, seed=0), torch.zeros(5).long())


# ------------------------------------------------------------------------------------------------ datamodule


def _dm(root: Path, **kw: object):
    from rcit_bench.data.datamodule import RetrievalDataModule

    dm = RetrievalDataModule("synthetic", root, image_size=32, n_train=40, n_val=12, n_test=12, batch_size=50,
                             eval_batch_size=30, **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def test_only_the_training_split_is_mismatched(tmp_path: Path) -> None:
    clean, noisy = _dm(tmp_path / "d"), _dm(tmp_path / "d", mismatch_rate=0.5, mismatch_seed=7)
    own = noisy.split("train").caption_to_image
    expected = mismatch_captions(own, 0.5, seed=7)
    assert torch.equal(noisy.training_caption_to_image(), expected)
    batch = next(iter(noisy.train_dataloader()))  # the pairs the model is given follow the noisy index
    assert torch.equal(batch["image_index"], expected[batch["caption_index"]])
    assert not torch.equal(batch["image_index"], own[batch["caption_index"]])
    for split in ("val", "test"):  # validation (checkpoint selection) and test stay clean
        assert torch.equal(noisy.caption_to_image(split), clean.caption_to_image(split))
        with pytest.raises(UserError, match=rf"applies to the training split only, but split '{split}'"):
            noisy.training_caption_to_image(split)
    for a, b in zip(noisy.val_dataloader(), clean.val_dataloader()):
        assert torch.equal(a["image_index"], b["image_index"]) and torch.equal(a["images"], b["images"])
    assert noisy.test_data_key() == clean.test_data_key()  # one corrupted test set serves both
    rec = noisy.mismatch_record()
    assert rec == {"mismatch_rate": 0.5, "mismatch_actual": 0.5, "mismatch_seed": 7, "mismatched_captions": 100,
                   "train_captions": 200, "split": "train"}
    assert clean.mismatch_record()["mismatched_captions"] == 0


def test_datamodule_refuses_a_bad_rate(tmp_path: Path) -> None:
    from rcit_bench.data.datamodule import RetrievalDataModule

    with pytest.raises(UserError, match=r"`mismatch_rate` must be a fraction.*but got 1.0"):
        RetrievalDataModule("synthetic", tmp_path, mismatch_rate=1.0)
    with pytest.raises(UserError, match=r"`mismatch_seed` must be an integer >= 0, but got -1"):
        RetrievalDataModule("synthetic", tmp_path, mismatch_rate=0.2, mismatch_seed=-1)


# ------------------------------------------------------------------------------------------------ spec


def _spec(tmp_path: Path, entries: list[dict], evaluation: dict | None = None, options: dict | None = None):
    ds = tiny_dataset(tmp_path / "data")
    ds["options"].update(options or {})
    return validate_spec({"name": "nc", "dataset": ds, "trainer": tiny_trainer(1), "entries": entries,
                          "evaluation": evaluation or {"clean": True}})


def test_a_sweep_expands_into_one_model_per_rate(tmp_path: Path) -> None:
    base = {"id": "v", "method": "vsepp", "overrides": TINY_MODEL}
    spec = _spec(tmp_path, [base, {**base, "id": "nc", "mismatch_rates": [0.2, 0.5], "mismatch_seed": 3},
                            {**base, "id": "one", "mismatch_rate": 0.2}])
    ids = [e.id for e in spec.entries]
    assert ids == ["v", "nc-mis0.2-mseed3", "nc-mis0.5-mseed3", "one"]
    assert [e.mismatch_rate for e in spec.entries] == [0.0, 0.2, 0.5, 0.2]
    assert [e.mismatch_seed for e in spec.entries] == [0, 3, 3, 0]
    hashes = {e.id: spec.entry_hash(e.id) for e in spec.entries}
    assert len(set(hashes.values())) == 4  # the rate and the seed are part of the identity
    # the entry without noise hashes as before the option existed (its trained models stay valid)
    plain = _spec(tmp_path, [base])
    assert plain.entry_hash("v") == hashes["v"]
    assert "mismatch_rate" not in plain.raw["entries"][0]
    # same family, one row of the noise table
    assert len({entry_family(spec, i) for i in ids}) == 1
    seeded = _spec(tmp_path, [{**base, "id": "nc", "mismatch_rates": [0.2], "mismatch_seed": 4}])
    assert seeded.entry_hash("nc-mis0.2-mseed4") != hashes["nc-mis0.2-mseed3"]


def test_evaluate_narrows_the_grid_without_changing_the_model(tmp_path: Path) -> None:
    base = {"id": "v", "method": "vsepp", "overrides": TINY_MODEL}
    ev = {"clean": True, "imagenet_c": {"corruptions": ["contrast"], "severities": [3]}}
    spec = _spec(tmp_path, [{**base, "evaluate": ["clean"]}], ev)
    full = _spec(tmp_path, [base], ev)
    assert [c.id for c in spec.cells("v")] == ["clean"]
    assert [c.id for c in full.cells("v")] == ["clean", "ic-contrast-s3"]
    assert spec.entry_hash("v") == full.entry_hash("v")
    with pytest.raises(UserError, match=r"selects 'text', none of which the spec's `evaluation` grid enables"):
        _spec(tmp_path, [{**base, "evaluate": ["text"]}], ev)


@pytest.mark.parametrize(("entry", "evaluation", "options", "message"), [
    ({"mismatch_rate": 1.0}, None, None, r"`entries\[0\].mismatch_rate` must be a fraction of training pairs in "
                                          r"\[0, 1\).*but got 1.0"),
    ({"mismatch_rates": [0.2, -0.5]}, None, None, r"`entries\[0\].mismatch_rates\[1\]` must be a fraction.*-0.5"),
    ({"mismatch_rates": [0.2, 0.2]}, None, None, r"`entries\[0\].mismatch_rates` has duplicates"),
    ({"mismatch_rate": 0.2, "mismatch_rates": [0.5]}, None, None, r"gives both `mismatch_rate`.*keep one"),
    ({"mismatch_seed": 2}, None, None, r"`entries\[0\].mismatch_seed` applies only with a `mismatch_rate` above 0"),
    ({"mismatch_rate": 0.2, "mismatch_seed": -1}, None, None, r"`entries\[0\].mismatch_seed` must be an integer"),
    ({}, {"clean": True, "mismatch_rate": 0.2}, None,
     r"`evaluation.mismatch_rate` \(0.2\): correspondence noise applies to training pairs only; validation and test "
     r"stay clean"),
    ({}, None, {"mismatch_rate": 0.2}, r"`dataset.options.mismatch_rate`: correspondence noise applies to the "
                                       r"training pairs of one entry"),
    ({"small_loss": "yes"}, None, None, r"`entries\[0\].small_loss` must be true, false or a mapping"),
    ({"small_loss": {"warmup": 1}}, None, None, r"Unknown key 'warmup' in argument `entries\[0\].small_loss`.*"
                                                r"Did you mean 'warmup_epochs'"),
])
def test_bad_noise_keys_are_named(tmp_path: Path, entry: dict, evaluation: dict | None, options: dict | None,
                                  message: str) -> None:
    with pytest.raises(UserError, match=message):
        _spec(tmp_path, [{"id": "v", "method": "vsepp", **entry}], evaluation, options)


def test_pixel_noise_rate_spellings(tmp_path: Path) -> None:
    base = {"id": "r", "method": "vsepp", "regime": "augment"}
    new = _spec(tmp_path, [{**base, "corruption_mix": [{"name": "speckle", "pixel_noise_rate": 0.6}]}],
                {"rcit_protocol": {"corruptions": ["speckle"], "pixel_noise_rates": [0.6, 0.2],
                                   "main_pixel_noise_rate": 0.6}})
    old = _spec(tmp_path, [{**base, "corruption_mix": [{"name": "speckle", "rate": 0.6}]}],
                {"rcit_protocol": {"corruptions": ["speckle"], "rates": [0.6, 0.2], "main_rate": 0.6}})
    assert new.raw == old.raw and new.entry_hash("r") == old.entry_hash("r")  # the older spelling is the same spec
    assert new.evaluation["rcit_protocol"] == {"corruptions": ["speckle"], "pixel_noise_rates": [0.2, 0.6],
                                               "main_pixel_noise_rate": 0.6}
    with pytest.raises(UserError, match=r"gives both `pixel_noise_rates` and its older spelling `rates`"):
        _spec(tmp_path, [base | {"corruption_mix": [{"name": "speckle", "rate": 0.6}]}],
              {"rcit_protocol": {"corruptions": ["speckle"], "rates": [0.6], "pixel_noise_rates": [0.6]}})
    with pytest.raises(UserError, match=r"gives both `pixel_noise_rate` and its older spelling `rate`"):
        _spec(tmp_path, [base | {"corruption_mix": [{"name": "speckle", "rate": 0.6, "pixel_noise_rate": 0.6}]}])
    with pytest.raises(UserError, match=r"`evaluation.rcit_protocol.pixel_noise_rates\[0\]` must be a pixel noise rate"):
        _spec(tmp_path, [base | {"corruption_mix": [{"name": "speckle", "rate": 0.6}]}],
              {"rcit_protocol": {"corruptions": ["speckle"], "pixel_noise_rates": [1.5]}})


# ------------------------------------------------------------------------------------------------ a whole sweep


@pytest.mark.integration
def test_a_mismatch_sweep_runs_and_reaches_the_board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     one_thread: None) -> None:
    from rcit_bench.bench.results import iter_results
    from rcit_bench.bench.runner import run_spec

    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = {"method": "vsepp", "overrides": TINY_MODEL}
    data = {"name": "nc", "dataset": tiny_dataset(tmp_path / "data"), "trainer": tiny_trainer(1),
            "entries": [{"id": "v", **base}, {"id": "v_nc", "mismatch_rates": [0.5], "evaluate": ["clean"], **base}],
            "evaluation": {"clean": True, "rcit_protocol": {"corruptions": ["salt_pepper"], "pixel_noise_rates": [0.6]}}}
    path = tmp_path / "nc.yaml"
    path.write_text(yaml.safe_dump(data))
    summary = run_spec(path, results_dir=tmp_path / "runs", use_wandb=False, leaderboard_dir=tmp_path / "board")
    assert summary.failed == 0
    rows = {(r.entry, r.cell): r for r in iter_results(tmp_path / "runs", "nc")}
    assert sorted(rows) == [("v", "clean"), ("v", "rcit-salt_pepper-r0.6"), ("v_nc-mis0.5", "clean")]
    noise = rows[("v_nc-mis0.5", "clean")].record["correspondence_noise"]
    assert noise["mismatch_rate"] == 0.5 and noise["mismatch_actual"] == 0.5 and noise["mismatch_seed"] == 0
    assert noise["mismatched_captions"] == 120 and noise["train_captions"] == 240
    assert rows[("v", "clean")].record["correspondence_noise"]["mismatched_captions"] == 0
    raw = json.loads(rows[("v", "rcit-salt_pepper-r0.6")].path.read_text())
    assert raw["cell"]["pixel_noise_rate"] == 0.6 and "rate" not in raw["cell"]
    cfg = yaml.safe_load((tmp_path / "runs" / "nc" / "v_nc-mis0.5" / "seed0" / "config.yaml").read_text())
    assert cfg["data"]["mismatch_rate"] == 0.5 and cfg["data"]["mismatch_seed"] == 0
    board = (tmp_path / "board" / "README.md").read_text()
    section = board.split("## Correspondence noise")[1].split("\n## ")[0]
    v = rows[("v", "clean")].metrics["rsum"]
    n = rows[("v_nc-mis0.5", "clean")].metrics["rsum"]
    assert f"| `v` (vsepp, clean) | {v:.1f} [" in section and f"{n:.1f} [" in section
    assert f"{100 * (1 - n / v):.1f}%" in section  # the relative drop from rate 0
    assert "`v_nc-mis0.5` − `v`" in section and "412.2" in section
    assert (tmp_path / "board" / "rsum_vs_mismatch_rate.png").stat().st_size > 1000
    csv_head = (tmp_path / "board" / "results.csv").read_text().splitlines()[0].split(",")
    assert "mismatch_rate" in csv_head and "pixel_noise_rate" in csv_head and "rate" not in csv_head
    rcit_part = board.split("## RCIT protocol")[1].split("\n## ")[0]
    assert "v_nc" not in rcit_part  # a clean-only entry has no row where it has no cells


def test_preflight_refuses_a_mismatch_rate_with_one_training_image(tmp_path: Path) -> None:
    from rcit_bench.bench.runner import preflight

    spec = _spec(tmp_path, [{"id": "v", "method": "vsepp", "overrides": TINY_MODEL, "mismatch_rate": 0.5}],
                 options={"limit_train": 1})
    with pytest.raises(UserError, match=r"entry `v` \(mismatch_rate 0.5\): `mismatch_rate` 0.5 needs at least two "
                                        r"images to move captions between, but the split has 1"):
        preflight(spec, spec.entries)


def test_the_mismatch_rate_and_its_seed_name_the_wandb_run(tmp_path: Path) -> None:
    from rcit_bench.bench.runner import _wandb_run, wandb_run_id

    base = {"id": "v", "method": "vsepp", "overrides": TINY_MODEL}
    spec = _spec(tmp_path, [{**base, "id": "sweep", "mismatch_rates": [0.2]},
                            {**base, "id": "one", "mismatch_rate": 0.5, "mismatch_seed": 2, "small_loss": True}])
    names = {}
    for e in spec.entries:
        run = _wandb_run(spec, e, 0, tmp_path, False, wandb_run_id(spec.name, spec.entry_hash(e.id), 0), {}, "h")
        names[e.id] = (run.name, run.tags)
    assert names["sweep-mis0.2"] == ("nc-sweep-mis0.2-mseed0-seed0", ["nc", "vsepp", "clean", "mismatch0.2"])
    assert names["one"] == ("nc-one-mis0.5-mseed2-seed0", ["nc", "vsepp", "clean", "mismatch0.5", "small_loss"])


def test_unit_costs_are_measured_once_per_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep members differ only in which captions are mismatched: one measurement serves the family (with the same
    kinds of cells), the cached costs still carry each member's own entry hash."""
    from rcit_bench.bench import costs as C

    base = {"method": "vsepp", "overrides": TINY_MODEL}
    spec = _spec(tmp_path, [{"id": "v", **base}, {"id": "nc", "mismatch_rates": [0.2, 0.5], "evaluate": ["clean"], **base},
                            {"id": "full", "mismatch_rate": 0.5, **base}],
                 {"clean": True, "rcit_protocol": {"corruptions": ["speckle"], "pixel_noise_rates": [0.6]}})
    measured: list[str] = []

    def fake(spec_: object, entry: object, seed: int) -> tuple[object, None]:
        measured.append(entry.id)  # type: ignore[attr-defined]
        return C.EntryCosts(setup_s=1, step_s=0.1, val_s=1, caption_s=1, image_cell_s=1, text_cell_s=0, pointing_s=0,
                            fit_overhead_s=1, batches_per_epoch=3, entry_hash=spec.entry_hash(entry.id)), None  # type: ignore[attr-defined]

    monkeypatch.setattr(C, "_measure_entry", fake)
    monkeypatch.setattr(C, "_grid_corruptions", lambda spec_, entries: [])
    costs = C.measure_unit_costs(spec, spec.entries, use_wandb=False)
    assert measured == ["v", "nc-mis0.2"]  # `full` has v's model and cells, nc-mis0.5 nc-mis0.2's
    assert {k: c.entry_hash for k, c in costs.entries.items()} == {e.id: spec.entry_hash(e.id) for e in spec.entries}


def test_mismatch_combines_with_paired_training_corruption(tmp_path: Path) -> None:
    """RCIT's regime: every training item carries a clean and a corrupted view of the image it is *paired* with."""
    noisy = _dm(tmp_path / "d", mismatch_rate=0.5, train_corruption="paired",
                corruption_mix=[{"name": "salt_pepper", "rate": 0.6}])
    batch = next(iter(noisy.train_dataloader()))
    expected = noisy.training_caption_to_image()[batch["caption_index"]]
    assert torch.equal(batch["image_index"], expected)
    store = noisy._store("train")
    for row in (0, 1, 2):
        assert torch.equal(batch["images"][row], store.get(int(expected[row])))  # the paired (wrong or right) image
    assert not torch.equal(batch["corrupted_images"], batch["images"])
