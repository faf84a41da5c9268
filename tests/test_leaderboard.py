"""Leaderboard built from result files written here: table numbers, bold best, std, failed row, csv, plots."""

from __future__ import annotations

import csv
import math
import copy
import json
import logging
from pathlib import Path

import pytest

from rcit_bench.bench import results as R
from rcit_bench.bench import spec as S
from rcit_bench.bench.leaderboard import build_leaderboard

IC = ["gaussian_noise", "fog"]


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "known_methods", lambda: ["matchmap", "rcit", "vsepp"])
    monkeypatch.setattr(S, "known_corruptions", lambda: (IC + ["speckle", "salt_pepper"], IC, ["speckle", "salt_pepper"]))
    monkeypatch.setattr(S, "known_perturbations", lambda: ["char_typo", "word_drop"])
    monkeypatch.setattr(S, "_resolve_config", lambda where, value, method, spec_dir: value)
    monkeypatch.setattr(S, "_datamodule_params", lambda: None)


SPEC = {
    "name": "lb",
    "description": "leaderboard test",
    "dataset": {"kind": "synthetic"},
    "seeds": [0, 1],
    "baseline": "base",
    "entries": [
        {"id": "base", "method": "vsepp"},
        {"id": "aug", "method": "vsepp", "regime": "augment", "corruption_mix": [{"name": "speckle", "rate": 0.6}]},
        {"id": "rc", "method": "rcit", "regime": "paired", "corruption_mix": [{"name": "speckle", "rate": 0.6}]},
        {"id": "mm", "method": "matchmap"},
    ],
    "evaluation": {
        "clean": True,
        "imagenet_c": {"corruptions": IC, "severities": [1, 3]},
        "rcit_protocol": {"corruptions": ["speckle"], "rates": [0.6, 0.2]},
        "text": {"perturbations": ["char_typo"], "levels": [1]},
        "pointing_game": True,
    },
}


def recalls_for(rsum: float) -> dict[str, float]:
    """Six recalls summing to rsum (i2t_r1 = rsum / 6 etc. with fixed offsets)."""
    offs = {"i2t_r1": -20.0, "i2t_r5": 5.0, "i2t_r10": 15.0, "t2i_r1": -25.0, "t2i_r5": 8.0, "t2i_r10": 17.0}
    m = {k: rsum / 6 + o for k, o in offs.items()}
    m["rsum"] = rsum
    return m


def value(entry: str, seed: int, cell: str) -> float:
    """Deterministic fake rsum for a cell: the augment entry is more robust; seeds differ a little."""
    clean = {"base": 400.0, "aug": 390.0, "mm": 300.0}[entry] + 4.0 * seed
    if cell == "clean" or cell.startswith("text-"):
        return clean - (10.0 if cell.startswith("text-") else 0.0)
    drop = {"base": 30.0, "aug": 10.0, "mm": 40.0}[entry]
    level = int(cell[-1]) if cell.startswith("ic-") else (3 if cell.endswith("0.6") else 1)
    return clean - drop * level - (5.0 if "fog" in cell else 0.0)


def write_results(root: Path, sp: S.Spec) -> None:
    for entry in sp.entries:
        for seed in sp.seeds:
            if entry.id == "mm" and seed == 1:
                continue  # one seed only: no std shown
            for cell in sp.cells(entry):
                if entry.id == "rc":
                    rec = R.make_record(spec_name="lb", spec_hash=sp.hash, entry_hash=sp.entry_hash("rc"),
                                        entry={"id": "rc", "method": "rcit", "regime": "paired"}, seed=seed,
                                        cell=cell.to_dict(), metrics=None, status="failed",
                                        reason="training diverged: loss is nan at step 12")
                else:
                    metrics = ({"accuracy": 80.0 if cell.corruption is None else 55.0} if cell.kind == "pointing_game"
                               else recalls_for(value(entry.id, seed, cell.id)))
                    rec = R.make_record(spec_name="lb", spec_hash=sp.hash, entry_hash=sp.entry_hash(entry.id),
                                        entry={"id": entry.id, "method": entry.method, "regime": entry.regime},
                                        seed=seed, cell=cell.to_dict(), metrics=metrics, wandb_run_id=f"run-{entry.id}")
                R.write_result(R.cell_path(root, "lb", entry.id, seed, cell.id), rec)
                if entry.id == "rc":
                    break  # training failed: one failed file per seed
    # a stray file for a cell not in the spec must be ignored
    extra = R.make_record(spec_name="lb", spec_hash="x", entry_hash="x", entry={"id": "base"}, seed=0,
                          cell={"id": "ic-snow-s1", "kind": "imagenet_c", "corruption": "snow", "severity": 1},
                          metrics={"rsum": 1.0})
    R.write_result(R.cell_path(root, "lb", "base", 0, "ic-snow-s1"), extra)


def table_rows(md: str, heading: str) -> dict[str, list[str]]:
    """Rows of the first markdown table after `heading`, keyed by first cell."""
    part = md.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(part) if ln.startswith("|"))
    lines = []
    for ln in part[start:]:
        if not ln.startswith("|"):
            break
        lines.append(ln)
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out.setdefault(cells[0], cells)
    return out


def test_leaderboard_numbers(names: None, tmp_path: Path) -> None:
    sp = S.validate_spec(SPEC, tmp_path / "lb.yaml")
    write_results(tmp_path / "runs", sp)
    readme = build_leaderboard(sp, results_dir=tmp_path / "runs", out_dir=tmp_path / "lb")
    md = readme.read_text()
    assert "generated by rcit-bench" in md and "do not edit" in md
    assert "before** the model's own resize and normalisation" in md

    main = table_rows(md, "## Main table")
    # clean RSUM: base seeds 400, 404 -> 402 ± 2.83 (sample std); aug 392 ± 2.83; mm single seed 300 -> no std
    assert main["base"][9] == "**402.0 ± 2.8**"
    assert main["aug"][9] == "392.0 ± 2.8"
    assert main["mm"][9] == "300.0"
    # i2t R@1 = rsum/6 - 20
    assert main["base"][3] == f"**{402 / 6 - 20:.1f} ± {math.sqrt(8) / 6:.1f}**"
    # mean corrupted RSUM of base seed 0: severities 1,3 x (noise, fog): drops 30,90 and 35,95
    base_mc = [400 + 4 * s - (30 + 90 + 35 + 95) / 4 for s in (0, 1)]
    aug_mc = [390 + 4 * s - (10 + 30 + 15 + 35) / 4 for s in (0, 1)]
    assert main["base"][10] == f"{sum(base_mc) / 2:.1f} ± 2.8"
    assert main["aug"][10] == f"**{sum(aug_mc) / 2:.1f} ± 2.8**"  # most robust: bold
    # relative robustness and MMI (per seed, then mean)
    rr = [aug_mc[s] / (390 + 4 * s) for s in (0, 1)]
    assert main["aug"][11].startswith(f"**{sum(rr) / 2:.3f}")
    assert main["aug"][12].startswith(f"**{1 - sum(rr) / 2:.3f}")  # lower MMI is better: bold
    # mCE: per corruption sum of (600 - rsum) over severities / baseline's, mean over corruptions, percent
    def mce_ref(entry: str, seed: int) -> float:
        ratios = []
        for c in IC:
            m = sum(600 - value(entry, seed, f"ic-{c}-s{s}") for s in (1, 3))
            b = sum(600 - value("base", seed, f"ic-{c}-s{s}") for s in (1, 3))
            ratios.append(m / b)
        return 100 * sum(ratios) / len(ratios)

    assert main["base"][13] == "100.0 ± 0.0"
    aug_mce = [mce_ref("aug", s) for s in (0, 1)]
    assert main["aug"][13].startswith(f"**{sum(aug_mce) / 2:.1f} ± ")
    mm_mce = mce_ref("mm", 0)
    assert main["mm"][13] == f"{mm_mce:.1f}"
    # failed entry: shown as failed with the reason
    assert main["rc"][3].startswith("**failed**: training diverged: loss is nan at step 12")
    assert "run-base" in main["base"][15]

    rcit = md.split("## RCIT protocol", 1)[1]
    assert "speckle (rate 0.6)" in rcit
    per_corr = table_rows(md, "## Per corruption")
    assert per_corr["base"][2] == f"{402 - (35 + 95) / 2:.1f} ± 2.8"  # fog: mean over severities 1 and 3
    text = table_rows(md, "## Text perturbations")
    assert text["base"][2] == "**392.0 ± 2.8**" and text["aug"][2] == "382.0 ± 2.8"
    pg = table_rows(md, "## Matchmap pointing game")
    assert list(pg) == ["mm"] and pg["mm"][1:] == ["80.0", "55.0"]
    assert "## Reported by the papers" in md and "409.8" in md and "380.4" in md
    assert md.index("## Reported by the papers") > md.index("## Main table")
    reported = table_rows(md, "## Reported by the papers")
    assert "base" not in reported  # measured rows never mixed in

    # csv: every cell of the spec (stray cell excluded), metrics read back exactly
    with open(tmp_path / "lb" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    n_cells = len(sp.cells("base"))
    assert len(rows) == 2 * n_cells + 2 * n_cells + len(sp.cells("mm")) + 2
    r = next(r for r in rows if r["entry"] == "aug" and r["seed"] == "1" and r["cell"] == "ic-fog-s3")
    assert float(r["rsum"]) == value("aug", 1, "ic-fog-s3") and r["status"] == "ok"
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and failed[0]["reason"].startswith("training diverged")
    assert not any(r["cell"] == "ic-snow-s1" for r in rows)

    # plots exist and are embedded
    pngs = sorted(p.name for p in (tmp_path / "lb").glob("*.png"))
    assert "rsum_vs_rate.png" in pngs and any(p.startswith("rsum_vs_severity_") for p in pngs)
    for p in pngs:
        assert f"]({p})" in md
        assert (tmp_path / "lb" / p).read_bytes()[:4] == b"\x89PNG"
    assert "](../lb.yaml)" in md  # link to the spec, relative to the leaderboard folder


def test_no_results_is_an_error_and_the_old_board_stays(names: None, tmp_path: Path) -> None:
    sp = S.validate_spec(SPEC, tmp_path / "lb.yaml")
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("the committed board")
    with pytest.raises(ValueError, match=r"No result files of spec 'lb' under .*typo.lb: nothing to publish, and .*out "
                                         r"was left as it is\. Check --results-dir"):
        build_leaderboard(sp, results_dir=tmp_path / "typo", out_dir=out)
    assert (out / "README.md").read_text() == "the committed board" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out"]


def test_stale_results_are_left_out_or_marked(names: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Results of another configuration (the trainer budget changed) never appear as the spec's: they are left
    out with a warning saying what differs, or shown marked with --include-stale."""
    sp = S.validate_spec(SPEC, tmp_path / "lb.yaml")
    write_results(tmp_path, sp)
    changed = copy.deepcopy(SPEC)
    changed["trainer"] = {**changed.get("trainer", {}), "max_epochs": 3}
    sp3 = S.validate_spec(changed, tmp_path / "lb.yaml")
    assert sp3.entry_hash("base") != sp.entry_hash("base")
    rec = json.loads(R.cell_path(tmp_path, "lb", "aug", 0, "clean").read_text())  # 'aug' is re-made under the new spec
    for path in (tmp_path / "lb" / "aug").rglob("*.json"):
        r = json.loads(path.read_text())
        r["entry_hash"] = sp3.entry_hash("aug")
        path.write_text(json.dumps(r))
    base_cfg = {"trainer": {"max_epochs": 1}}
    for path in (tmp_path / "lb" / "base").rglob("*.json"):  # 'base' keeps the old files, with their config
        r = json.loads(path.read_text())
        r["config"] = base_cfg
        path.write_text(json.dumps(r))
    with caplog.at_level(logging.WARNING):
        md = build_leaderboard(sp3, results_dir=tmp_path, out_dir=tmp_path / "out").read_text()
    assert "left out" in caplog.text and "`base`:" in caplog.text and "trainer.max_epochs: 1 -> 3" in caplog.text
    rows = table_rows(md, "## Main table")
    assert rows["base"][3] == "-" and rows["aug"][3] != "-"  # base's old numbers are not shown as current
    assert rec["metrics"]["rsum"] > 0
    md = build_leaderboard(sp3, results_dir=tmp_path, out_dir=tmp_path / "out", include_stale=True).read_text()
    assert "Includes" in md and "stale result file(s)" in md and "| base §" in md


def test_a_failure_midway_leaves_the_old_board_whole(names: None, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sp = S.validate_spec(SPEC, tmp_path / "lb.yaml")
    write_results(tmp_path, sp)
    first = build_leaderboard(sp, results_dir=tmp_path, out_dir=tmp_path / "out").read_text()
    import rcit_bench.bench.leaderboard as LB

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk went away while plotting")

    monkeypatch.setattr(LB, "plot_rate", broken)
    with pytest.raises(RuntimeError, match="disk went away"):
        build_leaderboard(sp, results_dir=tmp_path, out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text() == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no half-built folder left