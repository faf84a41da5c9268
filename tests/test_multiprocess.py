"""Multi-process (DDP) jobs on CPU with gloo: the whole bench command with `trainer.devices: 2`, the submitit path
with two tasks per job, a rank killed mid-training, and the checks before anything starts.

Equality with one process, and its tolerance. A 2-process run sees the same global batches (each rank its half,
gathered), the same global batch-norm statistics and, for one step, the same gradients up to float32 rounding
(summation order; tests/test_global_batch.py shows it per method, to a few 1e-6 of each gradient's largest entry).
Over several steps Adam amplifies that rounding where a gradient is near zero: it normalises each weight's step, so
such a weight can move by up to the learning rate either way. After the smoke spec's 4 steps at lr 2e-3 the best
checkpoints differ by at most 7.8e-5 (VSE++) and 2.2e-3 (RCIT) in any weight, and on 32 test images a few near-tied
queries swap neighbouring places. So every metric must agree with the committed single-process smoke board to
within one query: a recall within one query's share (100/32 points image-to-text, 100/160 text-to-image), RSUM
within the sum of those six shares, a median rank within 1 and a mean rank within 0.25. Observed: VSE++ equal in
every cell; RCIT at most one text query per recall, a median rank by 1, a mean rank by 0.16.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from rcit_bench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"
COMMITTED = ROOT / "leaderboards" / "smoke" / "results.csv"
N_IMG, N_CAP = 32, 160  # the smoke spec's test split
ONE_QUERY = {"i2t": 100 / N_IMG, "t2i": 100 / N_CAP}
TOLERANCE = {**{f"{d}_r{k}": ONE_QUERY[d] for d in ONE_QUERY for k in (1, 5, 10)},
             "rsum": 3 * (ONE_QUERY["i2t"] + ONE_QUERY["t2i"]), "i2t_medr": 1.0, "t2i_medr": 1.0,
             "i2t_meanr": 0.25, "t2i_meanr": 0.25}
METRICS = tuple(TOLERANCE)


def _two_process_smoke(tmp_path: Path) -> Path:
    spec = yaml.safe_load(SMOKE.read_text())
    spec["trainer"]["devices"] = 2  # the global batch stays `batch_size` 32: 16 pairs on each rank
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _cell_records(results: Path) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for f in sorted(results.glob("smoke/*/seed0/*.json")):
        if f.name in ("state.json",):
            continue
        rec = json.loads(f.read_text())
        if "cell" in rec:
            out[(rec["entry"]["id"], rec["cell"]["id"])] = rec
    return out


def _assert_equals_committed_board(records: dict[tuple[str, str], dict[str, Any]]) -> None:
    with open(COMMITTED, newline="") as f:
        rows = {(r["entry"], r["cell"]): r for r in csv.DictReader(f)}
    assert set(records) == set(rows)  # every cell of the board, and only those
    for key, rec in records.items():
        assert rec["status"] == "ok", (key, rec["reason"])
        for m in METRICS:
            if rows[key].get(m):
                assert abs(rec["metrics"][m] - float(rows[key][m])) <= TOLERANCE[m] + 1e-9, (key, m)


def _assert_parallelism(records: dict[tuple[str, str], dict[str, Any]]) -> None:
    for rec in records.values():
        assert rec["parallelism"] == {"world_size": 2, "per_rank_batch": 16, "global_batch": 32, "device_type": "cpu",
                                      "device_name": None, "backend": "gloo"}


def test_bench_with_two_devices_on_cpu_equals_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rcit-bench bench` with trainer.devices 2 runs the smoke spec to the end: exit code 0, one result file per cell
    written once (by rank 0), one W&B run per (entry, seed), a leaderboard, and the committed 1-process numbers."""
    from rcit_bench.cli import main

    spec = _two_process_smoke(tmp_path)
    monkeypatch.chdir(tmp_path)  # the spec's data root is relative
    monkeypatch.setenv("WANDB_MODE", "offline")  # the bench command's default: the runs are files to count
    rc = main(["bench", str(spec), "--results-dir", "runs", "--leaderboard-dir", "board", "--no-estimate"])
    assert rc == 0
    records = _cell_records(tmp_path / "runs")
    _assert_equals_committed_board(records)
    _assert_parallelism(records)
    # the board, and W&B: one offline run per (entry, seed) plus the board's summary run, each created once
    assert "vsepp_clean" in (tmp_path / "board" / "README.md").read_text()
    runs = sorted(p.name.split("-")[-1] for p in (tmp_path / "runs" / "wandb").glob("offline-run-*"))
    ids = {rec["provenance"]["wandb_run_id"] for rec in records.values()}
    assert len(ids) == 2 and all(runs.count(i) == 1 for i in ids)
    assert len(runs) == 3, runs
    assert not list((tmp_path / "runs").rglob("ranks.json"))  # the launcher's pid file is gone


def test_submitit_two_tasks_per_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The submitit path with its local executor: each entry is one job of two tasks, task r is rank r; the jobs
    finish, the leaderboard is built once, the numbers are the committed 1-process ones."""
    from rcit_bench.bench.launchers import submit_spec

    spec = _two_process_smoke(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ids = submit_spec(spec, executor_folder=tmp_path / "jobs" / "%j", cluster="local", results_dir="runs",
                      use_wandb=False, wait=True, leaderboard_dir=tmp_path / "board", timeout_min=20)
    assert len(ids) == 2
    records = _cell_records(tmp_path / "runs")
    _assert_equals_committed_board(records)
    _assert_parallelism(records)
    assert "rcit" in (tmp_path / "board" / "README.md").read_text()
    # two tasks per job: submitit kept one log per task
    for jid in ids:
        logs = sorted(p.name for p in (tmp_path / "jobs" / jid).glob("*_log.err"))
        assert len(logs) == 2, logs


def _kill_spec(root: Path, max_epochs: int) -> dict[str, Any]:
    from tiny_specs import TINY_MODEL, tiny_trainer

    trainer = {**tiny_trainer(max_epochs), "devices": 2, "limit_train_batches": 12}
    return {"name": "kill", "seeds": [0], "trainer": trainer, "early_stopping": None,  # every epoch runs
            "dataset": {"kind": "synthetic", "options": {
                "root": str(root), "image_size": 32, "n_train": 48, "n_val": 16, "n_test": 16, "batch_size": 16,
                "eval_batch_size": 16, "num_workers": 0}},
            "entries": [{"id": "e", "method": "vsepp", "regime": "clean", "overrides": TINY_MODEL}],
            "evaluation": {"clean": True, "imagenet_c": {"corruptions": ["contrast"], "severities": [3]}}}


def test_sigkill_of_one_rank_fails_cleanly_and_the_rerun_resumes(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """SIGKILL rank 1 after the first epoch's last.ckpt: the job fails within seconds naming the rank and the signal,
    no rank is left running; the rerun resumes from last.ckpt and ends with every epoch validated once and one
    result file per cell."""
    from rcit_bench.bench.multiprocess import RankFailed
    from rcit_bench.bench.runner import run_spec
    from rcit_bench.bench.spec import validate_spec

    spec = validate_spec(_kill_spec(tmp_path / "data", max_epochs=10))
    folder = tmp_path / "runs" / "kill" / "e" / "seed0"
    outcome: dict[str, Any] = {}

    def first_run() -> None:
        try:
            run_spec(spec, results_dir=tmp_path / "runs", use_wandb=False, build_board=False)
        except BaseException as err:  # noqa: BLE001 -- the test inspects it
            outcome["error"] = err
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=first_run)
    thread.start()
    deadline = time.monotonic() + 120
    while not (folder / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = json.loads((folder / "ranks.json").read_text())["ranks"]
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the job hung after a rank was killed"
    assert outcome["ended"] - killed < 15  # polled every 0.2 s; the survivor gets SIGTERM (SIGKILL after 10 s)
    err = outcome.get("error")
    assert isinstance(err, RankFailed) and "rank 1 of 2 was killed by SIGKILL" in str(err), err
    for pid in pids:  # no rank left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list(folder.glob("*.json")) or not any("cell" in json.loads(p.read_text())
                                                      for p in folder.glob("*.json") if p.name != "state.json")
    assert 0 <= _ckpt_epoch(folder / "checkpoints" / "last.ckpt") < 9  # killed with epochs left to train

    capfd.readouterr()
    summary = run_spec(spec, results_dir=tmp_path / "runs", use_wandb=False, build_board=False)
    assert summary.failed == 0 and summary.evaluated == 2
    assert "seed0: resuming from last.ckpt" in capfd.readouterr().err  # rank 0 said so: not trained from scratch
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "state.json"]
    assert sorted(r["cell"]["id"] for r in records) == ["clean", "ic-contrast-s3"]
    training = records[0]["training"]
    epochs = [c["epoch"] for c in training["val_curve"]]
    assert epochs == list(range(10)), epochs  # nothing lost, nothing validated twice
    assert training["optimizer_steps"] == 10 * 12  # 240 captions / 16 a global batch, limited to 12 steps an epoch
    assert records[0]["parallelism"]["world_size"] == 2


def _ckpt_epoch(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


@pytest.mark.parametrize("change, message", [
    ({"trainer": {"devices": 64}}, r"entry `e`: `trainer.devices` asks for 64 processes, but this machine has \d+ "
                                   r"CPUs?; set `trainer.devices` to at most \d+, or run the spec where 64 CPUs are "
                                   r"available"),
    ({"trainer": {"limit_val_batches": 2}}, r"entry `e`: `trainer.limit_val_batches` 2 counts batches per process, "
                                            r"so with 2 processes \(`trainer.devices` 2\) it would validate another "
                                            r"set of captions than one process does; remove it and shrink the "
                                            r"validation split with the data option `limit_val`"),
    ({"batch_size": 15}, r"entry `e`: the global batch `data.batch_size` 15 does not split over 2 processes "
                         r"\(`trainer.devices` 2\); use a multiple of 2, e.g. 14 or 16"),
])
def test_bad_multiprocess_input_is_refused_before_anything_starts(tmp_path: Path, change: dict, message: str) -> None:
    from rcit_bench.bench.runner import run_spec
    from rcit_bench.bench.spec import validate_spec

    raw = _kill_spec(tmp_path / "data", max_epochs=1)
    raw["trainer"].update(change.get("trainer", {}))
    if "batch_size" in change:
        raw["dataset"]["options"]["batch_size"] = change["batch_size"]
    with pytest.raises(UserError, match=message):
        run_spec(validate_spec(raw), results_dir=tmp_path / "runs", use_wandb=False, build_board=False)
    assert not (tmp_path / "runs" / "kill" / "e").exists()  # nothing trained, nothing written


def test_world_size_of_reads_devices_as_lightning_does(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from rcit_bench.bench.multiprocess import world_size_of

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert world_size_of({"devices": 2, "accelerator": "cpu"}) == 2
    assert world_size_of({"devices": "3", "accelerator": "cpu"}) == 3
    assert world_size_of({"devices": [0, 1], "accelerator": "cpu"}) == 2
    assert world_size_of({"devices": "0,1,2", "accelerator": "cpu"}) == 3
    assert world_size_of({"devices": "auto", "accelerator": "cpu"}) == 1  # one process on CPU unless asked
    assert world_size_of({}) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert world_size_of({"devices": "auto", "accelerator": "gpu"}) == 4
    assert world_size_of({"devices": -1, "accelerator": "auto"}) == 4


def test_ddp_timeout_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from rcit_bench.bench.multiprocess import DDP_TIMEOUT_S, ddp_timeout_s

    monkeypatch.delenv("RCIT_BENCH_DDP_TIMEOUT_S", raising=False)
    assert ddp_timeout_s() == DDP_TIMEOUT_S
    monkeypatch.setenv("RCIT_BENCH_DDP_TIMEOUT_S", "45")
    assert ddp_timeout_s() == 45.0
    monkeypatch.setenv("RCIT_BENCH_DDP_TIMEOUT_S", "soon")
    with pytest.raises(UserError, match=r"RCIT_BENCH_DDP_TIMEOUT_S must be a positive number of seconds, but got "
                                        r"'soon'"):
        ddp_timeout_s()


# ----------------------------------------------------------------------------------------------------------
# the corruption grid of one model, evaluated by two processes


def _grid_spec(root: Path) -> Any:
    from rcit_bench.bench.spec import validate_spec
    from tiny_specs import TINY_MODEL, tiny_dataset, tiny_trainer

    data = tiny_dataset(root)
    data["options"]["eval_batch_size"] = 6  # 16 test images: batches of 6, 6, 4 -> ranks hold 2 and 1 batches
    return validate_spec({"name": "grid", "dataset": data, "seeds": [0], "trainer": tiny_trainer(1),
                          "entries": [{"id": "e", "method": "vsepp", "regime": "clean", "overrides": TINY_MODEL}],
                          "evaluation": {"clean": True, "imagenet_c": {"corruptions": ["gaussian_noise", "contrast"],
                                                                       "severities": [3]},
                                         "rcit_protocol": {"corruptions": ["salt_pepper"],
                                                           "pixel_noise_rates": [0.6]},
                                         "text": {"perturbations": ["char_typo"], "levels": [2]}}})


def _grid_results(spec: Any) -> dict[str, Any]:
    """Every cell of the spec's entry with an untrained model from seed 0 (CellEvaluator, as the runner calls it)."""
    from rcit_bench.bench import runner
    from rcit_bench.evaluation import CellEvaluator

    entry = spec.entries[0]
    composed = runner.composed_config(spec, entry, 0, runner.method_config(spec, entry))
    dm = runner.make_datamodule(composed["data"])
    runner._seed(0)
    model = runner.build_model(entry, composed, dm)
    evaluator = CellEvaluator(model, dm, 0)
    out = {}
    for cell in spec.cells(entry):
        res = evaluator(cell)
        out[cell.id] = None if res is None else (res.metrics, res.ranks_i2t, res.ranks_t2i, res.image_change)
    return out


def _grid_worker(rank: int, world: int, init_file: str, root: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_grid_results(_grid_spec(Path(root))), Path(out_dir) / f"grid-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_grid_evaluation_over_two_processes_equals_one_process(tmp_path: Path) -> None:
    """Each rank encodes its block of whole batches of the (corrupted) test images and of the captions; rank 0 gets
    the single-process metrics and per-query ranks exactly, and the image-change figures (sums reduced over ranks)
    to float64 rounding; rank 1 returns None for every cell (it writes nothing)."""
    import torch
    import torch.multiprocessing as mp

    spec = _grid_spec(tmp_path / "data")
    reference = _grid_results(spec)  # also generates the synthetic data before the ranks read it
    mp.start_processes(_grid_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "data"), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    lead = torch.load(tmp_path / "grid-rank0.pt", weights_only=False)
    other = torch.load(tmp_path / "grid-rank1.pt", weights_only=False)
    assert set(lead) == set(reference) and len(reference) == 5
    assert all(v is None for v in other.values())
    for cell, (metrics, r_i2t, r_t2i, change) in reference.items():
        got = lead[cell]
        assert got[0] == metrics, cell
        assert torch.equal(got[1], r_i2t) and torch.equal(got[2], r_t2i), cell
        if change is None:
            assert got[3] is None
        else:
            assert got[3].keys() == change.keys() and change["images"] == 16
            for k, v in change.items():
                assert got[3][k] == (pytest.approx(v, rel=1e-12) if isinstance(v, float) else v), (cell, k)
    assert reference["clean"][0]["rsum"] != reference["ic-contrast-s3"][0]["rsum"]  # the cells differ


def test_check_world_refuses_a_strategy_that_starts_its_own_processes() -> None:
    from rcit_bench.bench.multiprocess import check_world

    assert check_world("e", {"devices": 2, "accelerator": "cpu", "strategy": "ddp"}, 32) == 2
    assert check_world("e", {"devices": 1, "accelerator": "cpu", "strategy": "ddp_spawn"}, 33) == 1  # one process
    with pytest.raises(UserError, match=r"`trainer.strategy` 'ddp_spawn' cannot run a job of 2 processes here: "
                                        r"rcit-bench starts one process per rank itself"):
        check_world("e", {"devices": 2, "accelerator": "cpu", "strategy": "ddp_spawn"}, 32)


def test_cli_reports_a_failed_rank_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The command that started a job says which rank failed and what to do, exit code 2, no traceback of its own
    (the rank printed its own)."""
    import rcit_bench.bench.runner as runner
    from rcit_bench.bench.multiprocess import RankFailed
    from rcit_bench.cli import main

    def failing(*args: Any, **kwargs: Any) -> None:
        raise RankFailed("e/seed0: rank 1 of 2 was killed by SIGKILL; the other ranks were stopped.")

    monkeypatch.setattr(runner, "run_spec", failing)
    assert main(["bench", str(SMOKE), "--no-wandb", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rcit-bench bench: error: e/seed0: rank 1 of 2 was killed by SIGKILL" in err and "Traceback" not in err


def test_pretrained_entry_evaluated_by_two_processes_equals_one(tmp_path: Path) -> None:
    """A zero-shot entry (a tiny random CLIP from a local save_pretrained folder) with trainer.devices 2 is evaluated
    by a 2-process job: nothing is trained, and with nothing trained there is no rounding to amplify: every metric
    and every per-query rank equals the 1-process run exactly."""
    import numpy as np

    from rcit_bench.bench.runner import run_spec
    from tiny_specs import tiny_dataset, tiny_trainer, write_tiny_clip

    clip = write_tiny_clip(tmp_path / "tiny-clip")
    (tmp_path / "clip.yaml").write_text(yaml.safe_dump({"method": "hf_dual_encoder", "model": {"pretrained": str(clip)}}))
    out = {}
    for devices in (1, 2):
        data = tiny_dataset(tmp_path / "data")
        data["options"]["eval_batch_size"] = 6  # 16 test images in 3 batches: the ranks hold 2 and 1
        spec = {"name": "zs", "dataset": data, "seeds": [0], "trainer": {**tiny_trainer(1), "devices": devices},
                "entries": [{"id": "clip", "method": "hf_dual_encoder", "config": "clip.yaml", "regime": "pretrained"}],
                "evaluation": {"clean": True, "imagenet_c": {"corruptions": ["contrast"], "severities": [3]},
                               "text": {"perturbations": ["char_swap"], "levels": [5]}}}
        path = tmp_path / f"zs{devices}.yaml"
        path.write_text(yaml.safe_dump(spec))
        summary = run_spec(path, results_dir=tmp_path / f"runs{devices}", use_wandb=False, build_board=False)
        assert summary.failed == 0 and summary.evaluated == 3 and summary.trained == []
        out[devices] = tmp_path / f"runs{devices}" / "zs" / "clip" / "seed0"
    for cell in ("clean", "ic-contrast-s3", "text-char_swap-l5"):
        one, two = (json.loads((out[d] / f"{cell}.json").read_text()) for d in (1, 2))
        assert two["metrics"] == one["metrics"], cell
        assert two["parallelism"]["world_size"] == 2 and one["parallelism"]["world_size"] == 1
        r1, r2 = (np.load(out[d] / f"{cell}.ranks.npz") for d in (1, 2))
        assert all(np.array_equal(r1[k], r2[k]) for k in r1.files), cell
