"""Run a benchmark spec as cluster jobs with submitit: one job per training entry, preemption-safe.

Why one job per entry: entries are independent (each trains its own model and evaluates its own cells),
so a job array spreads a sweep over many GPUs with no coordination; every job writes its per-cell
result files into the same results directory (atomic writes, one file per cell), and the leaderboard is
built afterwards from that directory (``rcit-bench leaderboard SPEC``). Each job calls
``rcit_bench.bench.runner.run_spec(spec, only=[entry_id], ...)``, so the evaluation grid runs inside the
job on the GPU that trained the model.

Preemption / timeout: the job callable is a ``submitit.helpers.Checkpointable``; when SLURM signals the
job, submitit requeues the same call, and the runner resumes training from the entry's ``last.ckpt``
and skips cells whose result files exist.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit
from submitit.core.utils import DelayedSubmission

from rcit_bench.errors import UserError
from rcit_bench.utils import check_choice, did_you_mean, keep_freed_memory

log = logging.getLogger(__name__)

#: submitit executors: 'slurm' on a cluster, 'local' = subprocesses on this machine, 'debug' = in process.
CLUSTERS = ("slurm", "local", "debug")


class SpecEntryJob(submitit.helpers.Checkpointable):
    """One entry of a spec as a requeueable job: ``job(entry_id)`` runs that entry's training and cells.

    ``run_fn`` defaults to ``rcit_bench.bench.runner.run_spec`` (imported inside the job); it is a
    parameter so that tests and other runners can substitute it.
    """

    def __init__(self, spec_path: str, results_dir: str, *, use_wandb: bool = True, force: bool = False,
                 run_kwargs: dict[str, Any] | None = None, run_fn: Callable[..., Any] | None = None,
                 requeue: bool = True) -> None:
        self.spec_path = spec_path
        self.requeue = requeue
        self.results_dir = results_dir
        self.use_wandb = use_wandb
        self.force = force
        self.run_kwargs = dict(run_kwargs or {})
        self.run_fn = run_fn
        self.workdir = os.getcwd()  # relative paths in the spec (dataset root) resolve as at submission

    def __call__(self, entry_id: str) -> str:
        fn = self.run_fn
        if fn is None:
            from rcit_bench.bench.runner import run_spec as fn
        os.chdir(self.workdir)
        keep_freed_memory()  # as the rcit-bench command does
        log.info("job: spec %s entry %s -> %s", self.spec_path, entry_id, self.results_dir)
        # build_board=False: concurrent jobs would race on the leaderboard and each see partial results
        kwargs = {"build_board": False, **self.run_kwargs}
        fn(self.spec_path, only=[entry_id], results_dir=self.results_dir, use_wandb=self.use_wandb,
           force=self.force, **kwargs)
        return entry_id

    def checkpoint(self, entry_id: str) -> DelayedSubmission | None:  # type: ignore[override]
        """On preemption/timeout requeue the same entry; ``force`` is dropped so the requeued job resumes
        (runner: last.ckpt, finished cells skipped) instead of starting over. None (no requeue) when
        the job was submitted with ``requeue=False``."""
        if not self.requeue:
            return None
        log.info("job for entry %s preempted or timed out; requeueing", entry_id)
        again = SpecEntryJob(self.spec_path, self.results_dir, use_wandb=self.use_wandb, force=False,
                             run_kwargs=self.run_kwargs, run_fn=self.run_fn)
        again.workdir = self.workdir
        return DelayedSubmission(again, entry_id)


def spec_entry_ids(spec_path: str | os.PathLike) -> tuple[Path, list[str]]:
    """(resolved spec file, entry ids) after full validation, so a bad spec fails before any job is queued.

    Accepts a path or a shipped spec name ('smoke', 'quick', ...), like ``load_spec``.
    """
    from rcit_bench.bench.spec import load_spec

    spec = load_spec(spec_path, check_devices=False)  # submitting needs no GPU here
    path = Path(spec.path if spec.path is not None else spec_path).resolve()
    return path, [e.id for e in spec.entries]


def _check_int(arg: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"Argument `{arg}` must be an integer >= {minimum}, but got {value!r}.")
    return value


def submit_spec(
    spec_path: str | os.PathLike,
    *,
    executor_folder: str | os.PathLike,
    partition: str | None = None,
    gpus_per_job: int = 1,
    cpus_per_job: int | None = None,
    mem_gb: int | None = None,
    timeout_min: int = 24 * 60,
    requeue: bool = True,
    cluster: str | None = None,
    results_dir: str | os.PathLike = "runs",
    use_wandb: bool = True,
    force: bool = False,
    only: Sequence[str] | None = None,
    array_parallelism: int | None = None,
    slurm_additional_parameters: dict[str, Any] | None = None,
    run_kwargs: dict[str, Any] | None = None,
    run_fn: Callable[..., Any] | None = None,
    wait: bool = False,
    leaderboard_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Submit one job per training entry of a spec (a submitit job array) and return the job ids.

    - ``executor_folder``: where submitit keeps job pickles and logs (``%j`` expands to the job id).
    - ``cluster``: 'slurm', 'local' (subprocesses here; for tests and single machines), 'debug' (in
      process) or None = detect (slurm when ``sbatch`` is available, else local).
    - ``partition``: SLURM partition; ``gpus_per_job`` GPUs per entry (0 = CPU job); one task per GPU, so
      multi-GPU jobs run Lightning DDP under SLURM's launcher (the spec's ``trainer.devices`` should match).
    - ``timeout_min``: wall time per job; with ``requeue`` a job that times out or is preempted is
      resubmitted (up to 3 times for timeouts) and resumes from its checkpoint.
    - ``results_dir``, ``use_wandb``, ``force``, ``run_kwargs``: passed to ``run_spec`` in every job, with
      ``only=[entry_id]``; all jobs write into the same ``results_dir`` (made absolute here).
    - ``only``: submit just these entry ids. ``wait``: block until all jobs end (raises if one failed),
      then build the leaderboard once into ``leaderboard_dir`` (default ``leaderboards/<spec name>``).
      Jobs never build it themselves (``build_board=False``); without ``wait`` run
      ``rcit-bench leaderboard SPEC --results-dir ...`` when the jobs are done.
    - ``run_fn``: replaces ``runner.run_spec`` in the jobs (tests); it must be picklable.
    """
    if cluster is not None:
        check_choice("cluster", cluster, CLUSTERS)
    gpus_per_job = _check_int("gpus_per_job", gpus_per_job, 0)
    timeout_min = _check_int("timeout_min", timeout_min, 1)
    if cpus_per_job is not None:
        _check_int("cpus_per_job", cpus_per_job, 1)
    if mem_gb is not None:
        _check_int("mem_gb", mem_gb, 1)
    if array_parallelism is not None:
        _check_int("array_parallelism", array_parallelism, 1)

    path, entry_ids = spec_entry_ids(spec_path)
    if only is not None:
        if isinstance(only, str):
            only = [only]
        for eid in only:
            if eid not in entry_ids:
                listed = ", ".join(repr(e) for e in entry_ids)
                raise UserError(f"Argument `only` must name entries of spec {str(spec_path)!r} ({listed}), "
                                 f"but got {eid!r}.{did_you_mean(eid, entry_ids)}")
        entry_ids = [e for e in entry_ids if e in set(only)]

    max_timeouts = 3 if requeue else 0
    executor = submitit.AutoExecutor(folder=str(executor_folder), cluster=cluster,
                                     slurm_max_num_timeout=max_timeouts, local_max_num_timeout=max_timeouts)
    params: dict[str, Any] = {
        "name": f"rcit-bench-{path.stem}",
        "timeout_min": timeout_min,
        "gpus_per_node": gpus_per_job,
        # SLURM: one task per GPU (Lightning DDP reads SLURM's ranks). Elsewhere one process per job:
        # Lightning launches its own DDP processes, a second task would train the same entry twice.
        "tasks_per_node": max(gpus_per_job, 1) if executor.cluster == "slurm" else 1,
        "nodes": 1,
    }
    if cpus_per_job is not None:
        params["cpus_per_task"] = max(1, cpus_per_job // params["tasks_per_node"])
    if mem_gb is not None:
        params["mem_gb"] = mem_gb
    if partition is not None:
        params["slurm_partition"] = partition
    if array_parallelism is not None:
        params["slurm_array_parallelism"] = array_parallelism
    if slurm_additional_parameters:
        params["slurm_additional_parameters"] = dict(slurm_additional_parameters)
    if executor.cluster != "slurm":  # the local executors accept only the generic keys
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)

    job_fn = SpecEntryJob(str(path), str(Path(results_dir).resolve()), use_wandb=use_wandb, force=force,
                          run_kwargs=run_kwargs, run_fn=run_fn, requeue=requeue)
    jobs = executor.map_array(job_fn, entry_ids)
    ids = [str(j.job_id) for j in jobs]
    for eid, jid in zip(entry_ids, ids):
        log.info("submitted entry %s as job %s (%s)", eid, jid, executor.cluster)
    if wait or executor.cluster == "debug":  # the debug executor runs a job only when its result is asked for
        failed = []
        for eid, job in zip(entry_ids, jobs):
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 -- collect every failure, then report them together
                failed.append(f"{eid} (job {job.job_id}): {type(err).__name__}: {str(err).strip()[-500:]}")
        if failed:
            raise RuntimeError("Benchmark jobs failed:\n" + "\n".join(failed))
        if run_fn is None:
            from rcit_bench.bench.leaderboard import build_leaderboard

            board = build_leaderboard(path, results_dir=job_fn.results_dir, out_dir=leaderboard_dir)
            log.info("leaderboard written to %s", board)
    return ids
