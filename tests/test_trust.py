"""Verdicts a reviewer can trust: what every result record carries (per-query ranks, ties, bootstrap
intervals, image change, training budget, the composed config), early stopping, the leaderboard's
intervals / verdicts / budget sections, and a non-zero exit when a cell failed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from rcit_bench.bench import results as R
from rcit_bench.bench import runner as RN
from rcit_bench.bench.spec import sha256_json, validate_spec
from rcit_bench.metrics import metrics_from_ranks
from tiny_specs import TINY_MODEL, tiny_dataset, tiny_trainer

MIX = [{"name": "speckle", "rate": 0.6}, {"name": "salt_pepper", "rate": 0.6}]


def _spec_dict(root: Path, max_epochs: int = 3, patience: int = 1) -> dict[str, Any]:
    return {
        "name": "trust", "dataset": tiny_dataset(root), "seeds": [0], "baseline": "vsepp_clean",
        "trainer": tiny_trainer(max_epochs), "early_stopping": {"patience": patience},
        "entries": [
            {"id": "vsepp_clean", "method": "vsepp", "regime": "clean", "overrides": TINY_MODEL},
            {"id": "vsepp_corrupt", "method": "vsepp", "regime": "augment", "corruption_mix": MIX,
             "overrides": TINY_MODEL},
            {"id": "rcit", "method": "rcit", "regime": "paired", "corruption_mix": MIX, "overrides": TINY_MODEL},
        ],
        "evaluation": {"clean": True, "imagenet_c": {"corruptions": ["gaussian_noise", "pixelate"], "severities": [1]},
                       "rcit_protocol": {"corruptions": ["salt_pepper"], "rates": [0.6]}},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real sweep of a tiny 3-entry spec, its leaderboard, and what the tests read back."""
    tmp = tmp_path_factory.mktemp("trust")
    spec = validate_spec(_spec_dict(tmp / "data"))
    summary = RN.run_spec(spec, results_dir=tmp / "runs", use_wandb=False, leaderboard_dir=tmp / "board")
    records = {p: json.loads(p.read_text()) for p in sorted((tmp / "runs" / "trust").glob("*/seed0/*.json"))
               if p.name != "state.json"}
    return {"tmp": tmp, "spec": spec, "summary": summary, "records": records}


def test_records_carry_ranks_ties_intervals(run: dict[str, Any]) -> None:
    assert run["summary"].failed == 0 and len(run["records"]) == 3 * 4
    for path, rec in run["records"].items():
        ranks = R.read_ranks(path.with_name(rec["ranks_file"]))
        assert ranks is not None and len(ranks["i2t"]) == 16 and len(ranks["t2i"]) == 16 * 5
        # the stored ranks reproduce the stored metrics exactly: later metrics need no model
        again = metrics_from_ranks(torch.from_numpy(ranks["i2t"]), torch.from_numpy(ranks["t2i"]))
        assert again == pytest.approx(rec["metrics"], abs=1e-12)
        lo, hi = rec["intervals"]["rsum"]
        assert lo <= rec["metrics"]["rsum"] <= hi and hi - lo > 0
        ties = rec["ties"]
        assert ties["i2t_queries"] == 16 and ties["t2i_queries"] == 80
        assert 0 <= ties["i2t"] <= 16 and 0 <= ties["t2i"] <= 80


def test_image_change_measured_against_an_independent_computation(run: dict[str, Any]) -> None:
    from rcit_bench.data.datamodule import RetrievalDataModule

    recs = {p.stem: r for p, r in run["records"].items() if p.parent.parent.name == "vsepp_clean"}
    assert "image_change" not in recs["clean"]
    dm = RetrievalDataModule(**recs["clean"]["config"]["data"])
    dm.prepare_data()
    dm.setup("fit")
    clean = torch.cat([b["images"] for b in dm.image_loader("test")]).double().numpy()
    for cell, name, kw in (("ic-gaussian_noise-s1", "gaussian_noise", {"severity": 1}),
                           ("ic-pixelate-s1", "pixelate", {"severity": 1}),
                           ("rcit-salt_pepper-r0.6", "salt_pepper", {"rate": 0.6})):
        bad = torch.cat([b["images"] for b in dm.image_loader("test", corruption=name, **kw)]).double().numpy()
        ch = recs[cell]["image_change"]
        mad = float(np.abs(bad - clean).mean())
        assert ch["mean_abs_diff"] == pytest.approx(mad, rel=1e-9, abs=1e-12)
        mse = float(((bad - clean) ** 2).mean())
        assert (ch["psnr_db"] is None) == (mse == 0)
        if mse:
            assert ch["psnr_db"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
        assert ch["barely_changed"] == (mad < 1 / 255)
    assert recs["rcit-salt_pepper-r0.6"]["image_change"]["mean_abs_diff"] > 0.1
    # scaled to 32 px, pixelate at severity 1 leaves the images as they are: the leaderboard must say so
    assert recs["ic-pixelate-s1"]["image_change"]["barely_changed"]


def test_one_composed_config_is_saved_logged_and_hashed(run: dict[str, Any]) -> None:
    rd = run["tmp"] / "runs" / "trust" / "vsepp_corrupt" / "seed0"
    saved = yaml.safe_load((rd / "config.yaml").read_text())
    rec = json.loads((rd / "clean.json").read_text())
    assert rec["config"] == saved and rec["config_hash"] == sha256_json(saved)
    assert saved["data"]["train_corruption"] == "augment" and saved["data"]["corruption_mix"] == MIX
    assert saved["trainer"]["max_epochs"] == 3 and saved["early_stopping"] == {"patience": 1, "min_delta": 0.0}
    ckpt = torch.load(json.loads((rd / "state.json").read_text())["best_checkpoint"], map_location="cpu",
                      weights_only=True)
    # the checkpoint's data settings are the ones the model was trained with, not the method config's defaults
    assert ckpt["hyper_parameters"]["data_config"] == saved["data"]


def test_training_budget_recorded(run: dict[str, Any]) -> None:
    for entry, images_per_pair in (("vsepp_clean", 1), ("vsepp_corrupt", 1), ("rcit", 2)):
        rec = json.loads((run["tmp"] / "runs" / "trust" / entry / "seed0" / "clean.json").read_text())
        tr = rec["training"]
        assert tr["optimizer_steps"] == 3 * tr["epochs"] and tr["pairs_seen"] == 16 * tr["optimizer_steps"]
        assert tr["images_encoded"] == images_per_pair * tr["pairs_seen"]
        curve = tr["val_curve"]
        assert [c["epoch"] for c in curve] == list(range(tr["epochs"])) and tr["train_wall_time_s"] > 0
        best = max(c["rsum"] for c in curve)
        assert tr["best_val_rsum"] == best and curve[tr["best_epoch"] - 1]["rsum"] == best
        if tr["stop"] == "plateau":  # patience 1: the last validation did not improve on the best
            assert tr["epochs"] < 3 and curve[-1]["rsum"] <= best and tr["best_epoch"] == tr["epochs"] - 1
        else:
            assert tr["stop"] == "cap" and tr["epochs"] == 3
            assert tr["still_improving"] == (curve[-1]["rsum"] > max(c["rsum"] for c in curve[:-1]))


class _Meter:
    def __init__(self, rsums: list[float]) -> None:
        self.pairs, self.images = 10, 20
        self.curve = [{"epoch": i, "step": i, "rsum": r} for i, r in enumerate(rsums)]

    def elapsed(self) -> float:
        return 1.5


@pytest.mark.parametrize("rsums, stopped, stop, improving, best, gain", [
    ([1.0, 2.0, 3.0], False, "cap", True, 3, 1.0),
    ([1.0, 3.0, 2.0], False, "cap", False, 2, -1.0),
    ([1.0, 2.0, 2.4], False, "cap", False, 3, 0.4),  # a gain within min delta (0.5) is not "improving"
    ([3.0, 3.0, 1.0], True, "plateau", False, 1, -2.0),  # first of equal maxima, as ModelCheckpoint keeps it
])
def test_budget_record_stop_reason(rsums: list[float], stopped: bool, stop: str, improving: bool, best: int,
                                   gain: float) -> None:
    tr = RN.budget_record(_Meter(rsums), {"max_epochs": 3}, {"patience": 2, "min_delta": 0.5}, stopped, 3, 30)
    assert (tr["stop"], tr["still_improving"], tr["best_epoch"]) == (stop, improving, best)
    assert tr["last_gain"] == pytest.approx(gain)
    assert (tr["epochs"], tr["optimizer_steps"], tr["pairs_seen"], tr["images_encoded"]) == (3, 30, 10, 20)


def test_leaderboard_intervals_verdicts_budget(run: dict[str, Any]) -> None:
    board = run["tmp"] / "board"
    text = (board / "README.md").read_text()
    recs = {(p.parent.parent.name, p.stem): r for p, r in run["records"].items()}
    # the main table shows the clean RSUM with its stored interval
    clean = recs[("rcit", "clean")]
    lo, hi = clean["intervals"]["rsum"]
    assert f"{clean['metrics']['rsum']:.1f} [{lo:.1f}, {hi:.1f}]" in text
    # verdicts: the RCIT claim against the VSE++ twin trained on the same corruptions, and vs the baseline
    assert "## Verdicts" in text
    m = re.search(r"RCIT protocol \(salt_pepper, rate 0\.6\): `rcit` − `vsepp_corrupt` = ([+-]\d+\.\d) RSUM, "
                  r"95% CI \[([+-]\d+\.\d), ([+-]\d+\.\d)\], (\*\*significant\*\*|not significant)", text)
    assert m, text
    cell = "rcit-salt_pepper-r0.6"
    expected = recs[("rcit", cell)]["metrics"]["rsum"] - recs[("vsepp_corrupt", cell)]["metrics"]["rsum"]
    assert float(m.group(1)) == pytest.approx(expected, abs=0.051)
    lo_d, hi_d = float(m.group(2)), float(m.group(3))
    assert lo_d <= float(m.group(1)) <= hi_d
    assert (m.group(4) == "**significant**") == (lo_d > 0 or hi_d < 0)
    assert "`vsepp_corrupt` − `vsepp_clean`" in text and "mean corrupted RSUM (ImageNet-C grid)" in text
    # budget, curves, image change and the tie rule are on the board
    assert "## Training budget" in text and "| rcit | 0 |" in text and (board / "val_rsum_curves.png").is_file()
    assert "## Image change per cell" in text and "°" in text
    assert "Ranks count ties against the model" in text


def test_constant_scorer_through_the_evaluation_path() -> None:
    """All-zero image embeddings (a dead image tower): cosine 0 everywhere; ties rank it last, never first."""
    from rcit_bench.evaluation import evaluate_ranks
    from rcit_bench.models.registry import build_method, tiny_config

    model = build_method("vsepp", model=tiny_config("vsepp"))
    n_img, per = 16, 5
    images = {"global": torch.zeros(n_img, model.hparams.embed_dim), "image_index": torch.arange(n_img)}
    texts = {"global": torch.randn(n_img * per, model.hparams.embed_dim), "caption_index": torch.arange(n_img * per)}
    out = evaluate_ranks(model, images, texts, torch.arange(n_img * per) // per)
    assert out.metrics["rsum"] == 0.0 and out.metrics["t2i_medr"] == n_img
    assert out.tie_counts() == {"i2t": n_img, "t2i": n_img * per, "i2t_queries": n_img, "t2i_queries": n_img * per}


def test_early_stopping_spec_key() -> None:
    base = _spec_dict(Path("data"))
    assert validate_spec({**base, "early_stopping": False}).early_stopping is None
    del base["early_stopping"]
    assert validate_spec(base).early_stopping == {"patience": 3, "min_delta": 0.0}
    with pytest.raises(ValueError, match=r"`early_stopping.patience` must be an integer >= 1.*got 0"):
        validate_spec({**base, "early_stopping": {"patience": 0}})
    with pytest.raises(ValueError, match=r"Unknown spec key `early_stopping.patiense`.*Did you mean"):
        validate_spec({**base, "early_stopping": {"patiense": 2}})
    # the rule is part of what a trained model is: changing it retrains
    a = validate_spec({**base, "early_stopping": {"patience": 2}})
    b = validate_spec({**base, "early_stopping": {"patience": 3}})
    assert a.entry_hash("rcit") != b.entry_hash("rcit")


def test_bench_exits_nonzero_when_a_cell_failed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from test_runner import SMOKE, Fakes

    from rcit_bench import cli

    Fakes(monkeypatch)
    inner = RN.CellEvaluator.__call__

    def failing(self: Any, cell: Any, images: Any = None) -> Any:
        if cell.id == "clean":
            raise ValueError("shape mismatch in the similarity")
        return inner(self, cell, images)

    monkeypatch.setattr(RN.CellEvaluator, "__call__", failing)
    rc = cli.main(["bench", str(SMOKE), "--results-dir", str(tmp_path / "runs"), "--no-wandb", "--no-estimate",
                   "--leaderboard-dir", str(tmp_path / "board")])
    err = capsys.readouterr().err
    assert rc == 1 and "2 cell(s) failed" in err.splitlines()[-1] and "results.csv" in err.splitlines()[-1]
    # everything else was written: the other cells and the board that shows the failure
    assert (tmp_path / "board" / "README.md").is_file()
    ok = [p for p in (tmp_path / "runs" / "smoke").glob("*/seed0/*.json") if p.name != "state.json"]
    failed = [p for p in ok if json.loads(p.read_text())["status"] == "failed"]
    assert len(failed) == 2 and len(ok) > 2
