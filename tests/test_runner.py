"""Runner: orchestration with fakes (skip finished cells, force, divergence, config precedence), and one
real end-to-end run of the smoke spec (integration)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from rcit_bench.bench import results as R
from rcit_bench.bench import runner as RN
from rcit_bench.bench.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")


class Fakes:
    """Stand-ins for data, model, training and evaluation that count their calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, diverge: tuple[str, ...] = ()) -> None:
        self.trained: list[str] = []
        self.evaluated: list[tuple[str, str]] = []
        fakes = self

        def fake_train(model: Any, dm: Any, store: Any, seed: int, trainer_kw: dict, wb: Any,
                       early_stopping: Any = None, progress: Any = None) -> RN.TrainResult:
            rd = store.folder
            entry = rd.parent.name
            fakes.trained.append(entry)
            if entry in diverge:
                raise FloatingPointError("Loss became nan at global step 3")
            path = rd / "checkpoints" / "best.ckpt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("weights")
            return RN.TrainResult(str(path), {"epochs": 1, "optimizer_steps": 3})

        class FakeEvaluator:
            def __init__(self, model: Any, dm: Any, seed: int, **kw: Any) -> None:
                self.entry = model

            def __call__(self, cell: Any, images: Any = None) -> dict[str, float]:
                fakes.evaluated.append((self.entry, cell.id))
                return {"rsum": 100.0 + len(cell.id), "i2t_r1": 1.0}

        self.image_loads: list[tuple] = []

        class FakeDM:
            def test_data_key(self) -> str:
                return "same test images"

            def mismatch_record(self) -> dict[str, Any]:
                return {"mismatch_rate": 0.0, "mismatch_actual": 0.0}

            def image_loader(self, split: str, corruption: Any = None, severity: Any = None, rate: Any = None) -> list:
                fakes.image_loads.append((corruption, severity, rate))
                return [{"images": None, "image_index": None}]

        monkeypatch.setattr(RN, "make_datamodule", lambda kw: FakeDM())
        monkeypatch.setattr(RN, "build_model", lambda entry, cfg, dm: _Model(entry.id))
        monkeypatch.setattr(RN, "train", fake_train)
        monkeypatch.setattr(RN, "load_weights", lambda model, path: None)
        monkeypatch.setattr(RN.RunStore, "readable", lambda self, path: True)
        monkeypatch.setattr(RN, "CellEvaluator", FakeEvaluator)


class _Model(str):
    def to(self, device: Any) -> "_Model":
        return self


def test_skip_finished_cells_and_force(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = load_spec(SMOKE)
    n = {e.id: len(spec.cells(e)) for e in spec.entries}
    f = Fakes(monkeypatch)
    s1 = RN.run_spec(spec, results_dir=tmp_path, use_wandb=False, build_board=False)
    assert f.trained == ["vsepp_clean", "rcit"] and len(f.evaluated) == sum(n.values())
    assert f.evaluated[:2] == [("vsepp_clean", "clean"), ("rcit", "clean")]  # cell-major
    # both entries share the test set: each image cell is built once (clean, 2 ImageNet-C, 1 RCIT), not twice
    assert sorted(f.image_loads, key=str) == sorted([(None, None, None), ("gaussian_noise", 3, None),
                                                     ("contrast", 3, None), ("salt_pepper", None, 0.6)], key=str)
    assert (s1.evaluated, s1.skipped, s1.failed, s1.total_cells) == (sum(n.values()), 0, 0, sum(n.values()))
    rec = json.loads(R.cell_path(tmp_path, "smoke", "rcit", 0, "ic-contrast-s3").read_text())
    assert rec["status"] == "ok" and rec["metrics"]["rsum"] == 100.0 + len("ic-contrast-s3")
    assert rec["spec_hash"] == spec.hash and rec["entry_hash"] == spec.entry_hash("rcit")
    assert rec["provenance"]["checkpoint"].endswith("best.ckpt") and rec["provenance"]["wandb_run_id"] is None

    # second run: nothing trained, nothing evaluated
    f2 = Fakes(monkeypatch)
    s2 = RN.run_spec(spec, results_dir=tmp_path, use_wandb=False, build_board=False)
    assert f2.trained == [] and f2.evaluated == [] and s2.skipped == sum(n.values())

    # one cell lost: only it is evaluated, the trained model is reused (no retraining)
    R.cell_path(tmp_path, "smoke", "vsepp_clean", 0, "text-char_typo-l2").unlink()
    f3 = Fakes(monkeypatch)
    RN.run_spec(spec, results_dir=tmp_path, use_wandb=False, build_board=False)
    assert f3.trained == [] and f3.evaluated == [("vsepp_clean", "text-char_typo-l2")]

    # --only and --force: retrain and re-evaluate that entry only
    f4 = Fakes(monkeypatch)
    RN.run_spec(spec, results_dir=tmp_path, use_wandb=False, build_board=False, force=True, only=["rcit"])
    assert f4.trained == ["rcit"] and len(f4.evaluated) == n["rcit"]


def test_divergence_writes_failed_results_and_continues(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    spec = load_spec(SMOKE)
    f = Fakes(monkeypatch, diverge=("vsepp_clean",))
    with caplog.at_level(logging.INFO, logger="rcit_bench"):
        s = RN.run_spec(spec, results_dir=tmp_path, use_wandb=False, build_board=False)
    assert f.trained == ["vsepp_clean", "rcit"]  # the sweep went on after the divergence
    assert [e for e, _ in f.evaluated] == ["rcit"] * len(spec.cells("rcit"))
    assert s.failed == len(spec.cells("vsepp_clean"))
    rec = json.loads(R.cell_path(tmp_path, "smoke", "vsepp_clean", 0, "clean").read_text())
    assert rec["status"] == "failed" and rec["reason"].startswith("training diverged: Loss became nan")
    # progress lines over the whole sweep: the divergence once, then the evaluation of the other entry
    lines = [r.getMessage() for r in caplog.records if r.name == "rcit_bench.bench.progress"]
    n_rcit = len(spec.cells("rcit"))
    assert sum("training diverged" in line for line in lines) == 1
    assert any(line.startswith(f"vsepp_clean/seed0: training diverged: Loss became nan") and
               f"its {len(spec.cells('vsepp_clean'))} cells are recorded as failed" in line for line in lines)
    assert lines[-1].startswith(f"evaluated {n_rcit}/{n_rcit} results") and "| ETA 0s" in lines[-1]
    # failed cells are retried on the next run (training is attempted again)
    f2 = Fakes(monkeypatch)
    RN.run_spec(spec, results_dir=tmp_path, use_wandb=False, build_board=False)
    assert f2.trained == ["vsepp_clean"]


def test_config_precedence() -> None:
    spec = load_spec(SMOKE)
    entry = spec.entry("rcit")
    cfg = RN.method_config(spec, entry)
    assert cfg["model"]["embed_dim"] == 32  # spec override beats the method config (256)
    base = RN.deep_merge({}, __import__("rcit_bench.models.registry", fromlist=["x"]).load_method_config("rcit"))
    assert cfg["model"]["image_encoder"] == {**base["model"]["image_encoder"], "name": "small_cnn", "input_size": 32}
    assert cfg["optim"] == base["optim"]  # untouched sections kept
    dkw = RN.datamodule_kwargs(spec, entry, 7, cfg)
    assert dkw["dataset"] == "synthetic" and dkw["seed"] == 7 and dkw["train_corruption"] == "paired"
    assert dkw["n_train"] == 128 and dkw["root"] == "data/synthetic-smoke"  # spec options beat config data
    assert dkw["corruption_mix"] == [{"name": "speckle", "rate": 0.6}, {"name": "salt_pepper", "rate": 0.6}]
    clean = RN.datamodule_kwargs(spec, spec.entry("vsepp_clean"), 0, RN.method_config(spec, spec.entry("vsepp_clean")))
    assert clean["train_corruption"] == "clean" and "corruption_mix" not in clean
    tkw = RN.trainer_kwargs(spec, entry, cfg)
    assert tkw["max_epochs"] == 1 and tkw["limit_train_batches"] == 4  # spec trainer beats config (8 epochs)


def test_unknown_only_entry(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Argument `only` must name an entry of spec 'smoke'.*Did you mean 'rcit'"):
        RN.run_spec(SMOKE, results_dir=tmp_path, use_wandb=False, only="rcti")


def test_missing_dataset_says_how_to_get_it(tmp_path: Path) -> None:
    pytest.importorskip("rcit_bench.data.datamodule")
    spec = load_spec(SMOKE)
    cfg = RN.method_config(spec, spec.entries[0])
    kw = RN.datamodule_kwargs(spec, spec.entries[0], 0, cfg)
    kw.update(dataset="flickr30k", root=str(tmp_path / "nope"))
    for k in ("n_train", "n_val", "n_test"):
        kw.pop(k)
    with pytest.raises(FileNotFoundError, match=r"flickr30k.*not found"):
        RN.make_datamodule(kw)


@pytest.mark.integration
def test_smoke_spec_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real data, training and evaluation on the smoke spec; then a rerun trains and evaluates nothing."""
    monkeypatch.chdir(tmp_path)  # the spec's relative data root lands in tmp_path
    spec = load_spec(SMOKE)
    s = RN.run_spec(SMOKE, results_dir="runs", use_wandb=False)
    total = sum(len(spec.cells(e)) for e in spec.entries)
    assert s.evaluated == total and s.failed == 0 and len(s.trained) == 2
    rows = list(R.iter_results("runs", "smoke"))
    assert len(rows) == total and all(r.status == "ok" for r in rows)
    for r in rows:
        m = r.metrics
        assert 0 <= m["rsum"] <= 600
        assert abs(m["rsum"] - sum(m[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))) < 1e-3
    rec = json.loads(R.cell_path("runs", "smoke", "rcit", 0, "clean").read_text())
    prov = rec["provenance"]
    assert Path(prov["checkpoint"]).is_file() and {"torch", "lightning"} <= set(prov["packages"])
    assert (Path("runs") / "smoke" / "rcit" / "seed0" / "checkpoints" / "last.ckpt").is_file()
    readme = Path("leaderboards") / "smoke" / "README.md"
    assert s.leaderboard == readme and "| vsepp_clean | vsepp | clean |" in readme.read_text()

    # rerun: counts prove no training and no evaluation happen
    calls = {"train": 0, "eval": 0}
    orig_train, orig_call = RN.train, RN.CellEvaluator.__call__

    def counting_train(*a: Any, **k: Any) -> str:
        calls["train"] += 1
        return orig_train(*a, **k)

    def counting_call(self: Any, cell: Any, images: Any = None) -> dict:
        calls["eval"] += 1
        return orig_call(self, cell, images)

    monkeypatch.setattr(RN, "train", counting_train)
    monkeypatch.setattr(RN.CellEvaluator, "__call__", counting_call)
    s2 = RN.run_spec(SMOKE, results_dir="runs", use_wandb=False)
    assert calls == {"train": 0, "eval": 0} and s2.skipped == total and s2.trained == []


def test_corrupt_checkpoint_is_set_aside_and_entry_retrained(tmp_path: Path) -> None:
    """A truncated best checkpoint: the safe loader refuses it, the file is kept as *.corrupt, the entry is
    trained again, and the finished cells of the other entry are not touched."""
    spec = load_spec(SMOKE)
    RN.run_spec(spec, results_dir=tmp_path, use_wandb=False, build_board=False)
    rd = R.run_dir(tmp_path, spec.name, "rcit", 0)
    best = Path(json.loads((rd / "state.json").read_text())["best_checkpoint"])
    best.write_bytes(best.read_bytes()[:100])  # truncated
    for cell in spec.cells(spec.entry("rcit")):
        R.cell_path(tmp_path, spec.name, "rcit", 0, cell.id).unlink()
    other = R.cell_path(tmp_path, spec.name, "vsepp_clean", 0, "clean")
    before = other.read_bytes()
    s = RN.run_spec(spec, results_dir=tmp_path, use_wandb=False, build_board=False)
    assert s.trained == ["rcit/seed0"] and s.failed == 0
    assert (best.parent / (best.name + ".corrupt")).is_file()
    assert other.read_bytes() == before
    with pytest.raises(RN.CheckpointError, match=r"best\.ckpt\.corrupt.*cannot be loaded safely.*--force"):
        RN.load_weights(None, str(best.parent / (best.name + ".corrupt")))
