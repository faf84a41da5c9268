"""submitit launcher: one job per spec entry, all results in one directory, clear errors, requeue."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cloudpickle
import pytest
import yaml

from rcit_bench.bench.launchers import SpecEntryJob, submit_spec
from rcit_bench.errors import UserError

ENTRIES = ["vsepp-a", "vsepp-b", "vsepp-c"]


def fake_run_spec(spec_path: str, *, only: list[str], results_dir: str, use_wandb: bool, force: bool,
                  **kwargs: object) -> None:
    """Stands in for runner.run_spec (tested elsewhere): one marker file per entry, written by the job."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{only[0]}.json").write_text(json.dumps(
        {"spec": spec_path, "only": only, "use_wandb": use_wandb, "force": force, "kwargs": kwargs,
         "pid": os.getpid()}))


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    spec = {"name": "tiny", "dataset": {"kind": "synthetic"},
            "entries": [{"id": e, "method": "vsepp"} for e in ENTRIES], "evaluation": {"clean": True}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def picklable_fake():
    """Local jobs run in fresh processes that cannot import this test module: ship the fake by value."""
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield fake_run_spec
    cloudpickle.unregister_pickle_by_value(module)


def test_local_executor_one_job_per_entry(tmp_path: Path, spec_file: Path, picklable_fake, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # results_dir is relative: jobs must still agree on one absolute directory
    ids = submit_spec(spec_file, executor_folder=tmp_path / "jobs", cluster="local", gpus_per_job=0,
                      timeout_min=5, results_dir="results", use_wandb=False, run_fn=picklable_fake,
                      run_kwargs={"note": "x"}, wait=True)
    assert len(ids) == len(ENTRIES) and len(set(ids)) == len(ENTRIES)
    markers = sorted((tmp_path / "results").glob("*.json"))
    assert [m.stem for m in markers] == ENTRIES
    rows = [json.loads(m.read_text()) for m in markers]
    assert [r["only"] for r in rows] == [[e] for e in ENTRIES]
    assert {r["spec"] for r in rows} == {str(spec_file.resolve())}
    assert all(r["use_wandb"] is False and r["force"] is False for r in rows)
    assert all(r["kwargs"] == {"note": "x", "build_board": False} for r in rows)
    assert len({r["pid"] for r in rows}) == len(ENTRIES)  # separate jobs, not one process
    assert str(os.getpid()) not in ids


def test_only_submits_selected_entries(tmp_path: Path, spec_file: Path) -> None:
    calls: list[list[str]] = []
    ids = submit_spec(spec_file, executor_folder=tmp_path / "jobs", cluster="debug", only=["vsepp-b"],
                      run_fn=lambda spec, **kw: calls.append(kw["only"]), results_dir=tmp_path / "r")
    assert len(ids) == 1 and calls == [["vsepp-b"]]


def test_checkpoint_requeues_same_entry_without_force() -> None:
    job = SpecEntryJob("spec.yaml", "runs", use_wandb=False, force=True, run_kwargs={"x": 1})
    delayed = job.checkpoint("vsepp-a")
    again = delayed.function
    assert isinstance(again, SpecEntryJob) and delayed.args == ("vsepp-a",)
    assert (again.spec_path, again.results_dir, again.use_wandb, again.run_kwargs) == ("spec.yaml", "runs", False,
                                                                                        {"x": 1})
    assert again.force is False  # a requeued job resumes instead of discarding finished work
    assert SpecEntryJob("spec.yaml", "runs", requeue=False).checkpoint("vsepp-a") is None  # no requeue


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cluster": "slurmm"}, r"Argument `cluster` must be one of 'slurm', 'local', 'debug', but got 'slurmm'. "
                                r"Did you mean 'slurm'\?"),
        ({"gpus_per_job": -1}, r"Argument `gpus_per_job` must be an integer >= 0, but got -1"),
        ({"gpus_per_job": 1.5}, r"Argument `gpus_per_job` must be an integer >= 0, but got 1.5"),
        ({"timeout_min": 0}, r"Argument `timeout_min` must be an integer >= 1, but got 0"),
        ({"only": ["vsepp-d"]}, r"Argument `only` must name entries of spec .*'vsepp-a'.*but got 'vsepp-d'. "
                                r"Did you mean 'vsepp-"),
    ],
)
def test_validation_errors(tmp_path: Path, spec_file: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        submit_spec(spec_file, executor_folder=tmp_path / "jobs", cluster=kwargs.pop("cluster", "debug"),
                    run_fn=fake_run_spec, **kwargs)
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").rglob("*.pkl"))  # nothing queued


def test_invalid_spec_fails_before_submission(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "dataset": {"kind": "synthetic"},
                                   "entries": [{"id": "x", "method": "vsep"}], "evaluation": {"clean": True}}))
    with pytest.raises(ValueError, match=r"entries\[0\]\.method.*Did you mean 'vsepp'"):
        submit_spec(bad, executor_folder=tmp_path / "jobs", cluster="debug", run_fn=fake_run_spec)
    with pytest.raises(FileNotFoundError):
        submit_spec(tmp_path / "missing.yaml", executor_folder=tmp_path / "jobs", cluster="debug")


@pytest.mark.integration
def test_real_smoke_spec_through_local_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped smoke spec, real runner, one local job per entry, then one leaderboard."""
    spec = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke.yaml"
    entries = [e["id"] for e in yaml.safe_load(spec.read_text())["entries"]]
    monkeypatch.chdir(tmp_path)  # the spec's relative dataset root lands in tmp_path
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ids = submit_spec(spec, executor_folder=tmp_path / "jobs", cluster="local", gpus_per_job=0, timeout_min=20,
                      results_dir="results", use_wandb=False, wait=True, leaderboard_dir=tmp_path / "board")
    assert len(ids) == len(entries)
    for entry in entries:
        cells = list((tmp_path / "results" / "smoke" / entry).rglob("clean.json"))
        assert len(cells) == 1, entry
        assert json.loads(cells[0].read_text())  # a readable result row
    assert "vsepp_clean" in (tmp_path / "board" / "README.md").read_text()


def test_slurm_parameters(tmp_path: Path, spec_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SLURM request (nothing submitted: map_array is replaced by a recorder)."""
    import submitit

    seen: dict = {}

    class FakeJob:
        def __init__(self, i: int) -> None:
            self.job_id = f"123_{i}"

    def fake_map_array(self, fn, ids):
        seen.update(params=dict(self._executor.parameters), fn=fn, ids=list(ids))
        return [FakeJob(i) for i in range(len(seen["ids"]))]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # pretend srun exists
    spec = yaml.safe_load(spec_file.read_text())
    spec["trainer"] = {"devices": 2}  # two ranks per entry: two tasks, one GPU each
    spec_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=r"--gpus-per-job 4 disagrees with `trainer.devices` 2 of entry 'vsepp-a' "
                                        r"\(one process per GPU\); pass --gpus-per-job 2 \(or leave it out\), or set "
                                        r"`trainer.devices: 4` in the spec"):
        submit_spec(spec_file, executor_folder=tmp_path / "jobs", cluster="slurm", gpus_per_job=4)
    assert not seen  # refused before anything was submitted
    ids = submit_spec(spec_file, executor_folder=tmp_path / "jobs", cluster="slurm", partition="gpu",
                      gpus_per_job=2, cpus_per_job=16, timeout_min=90, array_parallelism=2,
                      results_dir=tmp_path / "r", use_wandb=False)
    assert ids == ["123_0", "123_1", "123_2"] and seen["ids"] == ENTRIES
    p = seen["params"]
    assert p["job_name"] == "rcit-bench-tiny" and p["nodes"] == 1
    assert (p["partition"], p["gpus_per_node"], p["ntasks_per_node"], p["cpus_per_task"], p["time"]) == \
        ("gpu", 2, 2, 8, 90)
    assert p["array_parallelism"] == 2
    assert isinstance(seen["fn"], SpecEntryJob) and seen["fn"].results_dir == str(tmp_path / "r")


def test_cli_launcher_submitit_passes_options(tmp_path: Path, spec_file: Path, monkeypatch, capsys) -> None:
    """`rcit-bench bench SPEC --launcher submitit ...` reaches submit_spec with the options it was given."""
    import rcit_bench.bench.launchers as launchers
    from rcit_bench.cli import main

    seen: dict = {}

    def fake_submit(spec, **kwargs):
        seen.update(kwargs, spec=spec)
        return ["101", "102"]

    monkeypatch.setattr(launchers, "submit_spec", fake_submit)
    rc = main(["bench", str(spec_file), "--launcher", "submitit", "--partition", "gpu", "--gpus-per-job", "2",
               "--timeout-min", "90", "--no-requeue", "--results-dir", str(tmp_path / "r"), "--only", "vsepp-a",
               "--cluster", "local", "--no-wandb"])
    assert rc == 0
    assert seen["spec"] == str(spec_file) and seen["partition"] == "gpu" and seen["gpus_per_job"] == 2
    assert seen["timeout_min"] == 90 and seen["requeue"] is False and seen["cluster"] == "local"
    assert seen["only"] == ["vsepp-a"] and seen["use_wandb"] is False
    assert seen["executor_folder"] == str(tmp_path / "r" / "submitit" / "%j")
    out = capsys.readouterr().out
    assert "submitted 2 job(s): 101 102" in out and "rcit-bench leaderboard" in out


def test_cli_launcher_submitit_runs_local_jobs(tmp_path: Path, spec_file: Path, monkeypatch) -> None:
    """The CLI path end to end with submitit's in-process executor (the runner replaced by the fake)."""
    import rcit_bench.bench.runner as runner
    from rcit_bench.cli import main

    import rcit_bench.bench.leaderboard as leaderboard

    monkeypatch.setattr(runner, "run_spec", fake_run_spec)
    boards: list[tuple] = []  # the fake jobs write no result files: record the board call instead
    monkeypatch.setattr(leaderboard, "build_leaderboard",
                        lambda path, results_dir, out_dir: boards.append((results_dir, out_dir)) or Path(out_dir))
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", str(spec_file), "--launcher", "submitit", "--cluster", "debug", "--gpus-per-job", "0",
               "--results-dir", str(tmp_path / "r"), "--leaderboard-dir", str(tmp_path / "board"), "--no-wandb"])
    assert rc == 0
    assert sorted(p.stem for p in (tmp_path / "r").glob("*.json")) == ENTRIES
    assert [(str(r), str(o)) for r, o in boards] == [(str(tmp_path / "r"), str(tmp_path / "board"))]
