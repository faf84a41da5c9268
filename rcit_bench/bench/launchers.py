"""Run a benchmark spec as cluster jobs with submitit: one job per training entry, preemption-safe.

Why one job per entry: entries are independent (each trains its own model and evaluates its own cells),
so a job array spreads a sweep over many GPUs with no coordination; every job writes its per-cell
result files into the same results directory (atomic writes, one file per cell), and the leaderboard is
built afterwards from that directory (``rcit-bench leaderboard SPEC``). Each job calls
``rcit_bench.bench.runner.run_spec(spec, only=[entry_id], ...)``, so the evaluation grid runs inside the
job on the GPU that trained the model.

Multi-process entries (``trainer.devices`` W > 1): the job has W tasks, one per rank (one per GPU on SLURM, W
processes with the local executor); each task joins the process group from submitit's job environment
(rcit_bench.bench.multiprocess.join_from_submitit) and runs the entry rank-aware, so rank 0 alone writes. Entries
with different W are submitted as separate arrays.

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
        from rcit_bench.bench.multiprocess import join_from_submitit

        join_from_submitit()  # a job of W tasks: task r is rank r
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
    path, worlds = spec_entry_worlds(spec_path)
    return path, list(worlds)


def spec_entry_worlds(spec_path: str | os.PathLike) -> tuple[Path, dict[str, tuple[int, str]]]:
    """(resolved spec file, {entry id: (processes per job, trainer accelerator)}), from each entry's composed
    ``trainer.devices`` (rcit_bench.bench.multiprocess.world_size_of; the submitting machine's devices are not
    checked, the job's are)."""
    from rcit_bench.bench.multiprocess import world_size_of
    from rcit_bench.bench.runner import method_config, trainer_kwargs
    from rcit_bench.bench.spec import load_spec

    spec = load_spec(spec_path, check_devices=False)  # submitting needs no GPU here
    path = Path(spec.path if spec.path is not None else spec_path).resolve()
    worlds = {}
    for e in spec.entries:
        tkw = trainer_kwargs(spec, e, method_config(spec, e))
        worlds[e.id] = (world_size_of(tkw), str(tkw.get("accelerator", "auto")))
    return path, worlds


def tasks_and_gpus(worlds: dict[str, tuple[int, str]], gpus_per_job: int | None, cluster: str) -> dict[str, tuple[int, int]]:
    """{entry id: (tasks per job, GPUs per job)}: one task per rank; on SLURM one GPU per rank unless the entry runs
    on the CPU. ``gpus_per_job`` (the --gpus-per-job flag) must agree with each entry's ``trainer.devices``."""
    out = {}
    for eid, (world, accelerator) in worlds.items():
        gpus = world if cluster == "slurm" and accelerator != "cpu" else 0
        if gpus_per_job is not None:
            if gpus_per_job > 0 and gpus_per_job != world:
                raise UserError(f"--gpus-per-job {gpus_per_job} disagrees with `trainer.devices` {world} of entry "
                                 f"{eid!r} (one process per GPU); pass --gpus-per-job {world} (or leave it out), or "
                                 f"set `trainer.devices: {gpus_per_job}` in the spec.")
            gpus = gpus_per_job if cluster == "slurm" else 0
        out[eid] = (world, gpus)
    return out


def _check_int(arg: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"Argument `{arg}` must be an integer >= {minimum}, but got {value!r}.")
    return value


def submit_spec(
    spec_path: str | os.PathLike,
    *,
    executor_folder: str | os.PathLike,
    partition: str | None = None,
    gpus_per_job: int | None = None,
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
    - ``partition``: SLURM partition; ``gpus_per_job`` GPUs per entry (0 = CPU job; default: the entry's
      ``trainer.devices`` on SLURM, one per rank); one task per rank, so a job of W ranks has W tasks (also with the
      local executor), and a ``gpus_per_job`` that disagrees with ``trainer.devices`` is refused before submitting.
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
    if gpus_per_job is not None:
        gpus_per_job = _check_int("gpus_per_job", gpus_per_job, 0)
    timeout_min = _check_int("timeout_min", timeout_min, 1)
    if cpus_per_job is not None:
        _check_int("cpus_per_job", cpus_per_job, 1)
    if mem_gb is not None:
        _check_int("mem_gb", mem_gb, 1)
    if array_parallelism is not None:
        _check_int("array_parallelism", array_parallelism, 1)

    path, worlds = spec_entry_worlds(spec_path)
    entry_ids = list(worlds)
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
    shapes = tasks_and_gpus({e: worlds[e] for e in entry_ids}, gpus_per_job, executor.cluster)
    params: dict[str, Any] = {"name": f"rcit-bench-{path.stem}", "timeout_min": timeout_min, "nodes": 1}
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

    job_fn = SpecEntryJob(str(path), str(Path(results_dir).resolve()), use_wandb=use_wandb, force=force,
                          run_kwargs=run_kwargs, run_fn=run_fn, requeue=requeue)
    jobs: list[Any] = []
    order: list[str] = []
    for shape in sorted(set(shapes.values())):  # one array per (tasks, GPUs) shape
        group = [e for e in entry_ids if shapes[e] == shape]
        tasks, gpus = shape
        shaped = dict(params, tasks_per_node=tasks, gpus_per_node=gpus)
        if cpus_per_job is not None:
            shaped["cpus_per_task"] = max(1, cpus_per_job // tasks)
        executor.update_parameters(**shaped)
        jobs += executor.map_array(job_fn, group)
        order += group
    entry_ids = order
    ids = [str(j.job_id) for j in jobs]
    for eid, jid in zip(entry_ids, ids):
        log.info("submitted entry %s as job %s (%s)", eid, jid, executor.cluster)
    if wait or executor.cluster == "debug":  # the debug executor runs a job only when its result is asked for
        failed = []
        for eid, job in zip(entry_ids, jobs):
            try:
                job.results()  # every task of the job (a multi-process job has one per rank)
            except Exception as err:  # noqa: BLE001 -- collect every failure, then report them together
                failed.append(f"{eid} (job {job.job_id}): {type(err).__name__}: {str(err).strip()[-500:]}")
        if failed:
            raise RuntimeError("Benchmark jobs failed:\n" + "\n".join(failed))
        if run_fn is None:
            from rcit_bench.bench.leaderboard import build_leaderboard

            board = build_leaderboard(path, results_dir=job_fn.results_dir, out_dir=leaderboard_dir)
            log.info("leaderboard written to %s", board)
    return ids
