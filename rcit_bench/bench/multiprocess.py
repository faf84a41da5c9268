"""Multi-process (DDP) jobs: one (entry, seed) trained and evaluated by W processes, each rank knowing its place.

Why the runner starts the ranks itself: Lightning's own launcher re-executes the whole command in every rank, so
every rank would run the whole sweep (clear checkpoints, evaluate the grid, write the same result files and W&B
runs). Instead, for an entry whose ``trainer.devices`` is W > 1, :func:`run_job` starts W processes of
``python -m rcit_bench.bench.multiprocess``, one per rank (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` in their environment), and waits for them. Each rank joins the process group and
runs ``run_spec(only=[entry], seeds=[seed])``, which is rank-aware (rcit_bench.bench.runner): rank 0 decides what
to train and evaluate and broadcasts it, and rank 0 alone writes result files, run state, configs, checkpoints
(Lightning saves on rank 0) and the W&B run; every rank trains on its part of each global batch and encodes its
shard of the test data. The leaderboard is built by the process that started the job. Under submitit (SLURM or
its local executor) the tasks of one job are the ranks: :func:`join_from_submitit` sets the same environment.

Failures: the launcher polls its ranks; when one ends with an error or a signal (a SIGKILL, an out-of-memory
kill), it stops the others (SIGTERM, then SIGKILL after ``GRACE_S``) and raises :class:`RankFailed` naming the
rank and how it ended, within about a second. Ranks not started by this launcher (other nodes) are ended by the
process group's timeout, ``RCIT_BENCH_DDP_TIMEOUT_S`` (default ``DDP_TIMEOUT_S``): a collective waiting longer for
a vanished peer fails instead of hanging. A rerun resumes from the entry's ``last.ckpt``; cells whose result files
exist are not evaluated again.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rcit_bench.errors import UserError

log = logging.getLogger(__name__)

#: seconds a collective may wait for a peer before the process group gives up (a rank that vanished)
DDP_TIMEOUT_S = 300.0
#: seconds the other ranks get to exit after SIGTERM before SIGKILL
GRACE_S = 10.0
#: how often the launcher looks at its ranks
POLL_S = 0.2


#: the environment that tells a process its place in a job (torch's env:// rendezvous)
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailed(RuntimeError):
    """A rank of a multi-process job ended with an error or a signal; the other ranks were stopped."""


# ----------------------------------------------------------------------------------------------------------
# world size and the checks before anything starts


def _is_gpu(accelerator: Any) -> bool:
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator in ("auto", None) and torch.cuda.is_available())


def available_devices(accelerator: Any) -> tuple[int, str]:
    """(how many, 'GPU' or 'CPU') devices of the trainer's accelerator this machine has for one job's ranks."""
    import torch

    if _is_gpu(accelerator):
        return torch.cuda.device_count(), "GPU"
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), "CPU"


def world_size_of(trainer_kw: dict[str, Any]) -> int:
    """The number of processes an entry's trainer arguments ask for: ``devices`` as Lightning reads it (an int, a
    list or comma string of device indices, -1 = every device, 'auto' = every GPU, one process on CPU)."""
    devices, accelerator = trainer_kw.get("devices", "auto"), trainer_kw.get("accelerator", "auto")
    if devices in ("auto", None):
        return max(available_devices(accelerator)[0], 1) if _is_gpu(accelerator) else 1
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        devices = int(text)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices == -1:
        return max(available_devices(accelerator)[0], 1)
    return int(devices)


def check_world(entry_id: str, trainer_kw: dict[str, Any], batch_size: int) -> int:
    """The entry's world size after the checks a multi-process job needs before it starts: no more processes than
    devices, and a global batch that splits evenly over the ranks. Raises UserError naming both values and the fix
    (the caller names the entry)."""
    world = world_size_of(trainer_kw)
    if world <= 1:
        return 1
    have, kind = available_devices(trainer_kw.get("accelerator", "auto"))
    if world > have:
        raise UserError(f"`trainer.devices` asks for {world} processes, but this machine has "
                        f"{have} {kind}{'s' if have != 1 else ''}; set `trainer.devices` to at most {have}, or run "
                        f"the spec where {world} {kind}s are available.")
    strategy = trainer_kw.get("strategy", "auto")
    if strategy not in ("auto", "ddp", "ddp_find_unused_parameters_true"):
        raise UserError(f"`trainer.strategy` {strategy!r} cannot run a job of {world} processes here: rcit-bench starts "
                        f"one process per rank itself and trains them with DDP; remove `strategy` (or use 'ddp').")
    limit = trainer_kw.get("limit_val_batches")
    if limit not in (None, 1.0):
        raise UserError(f"`trainer.limit_val_batches` {limit!r} counts batches per process, so with {world} processes "
                        f"(`trainer.devices` {world}) it would validate another set of captions than one process "
                        f"does; remove it and shrink the validation split with the data option `limit_val` (images) "
                        f"instead, which every number of processes reads the same.")
    if batch_size % world:
        lower, upper = batch_size - batch_size % world, batch_size + world - batch_size % world
        raise UserError(f"the global batch `data.batch_size` {batch_size} does not split over "
                        f"{world} processes (`trainer.devices` {world}); use a multiple of {world}, e.g. "
                        f"{lower or upper} or {upper}, so every rank holds the same number of pairs.")
    return world


def ddp_timeout_s() -> float:
    """The process group timeout: ``RCIT_BENCH_DDP_TIMEOUT_S`` or :data:`DDP_TIMEOUT_S`."""
    raw = os.environ.get("RCIT_BENCH_DDP_TIMEOUT_S")
    if raw is None:
        return DDP_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"Environment variable RCIT_BENCH_DDP_TIMEOUT_S must be a positive number of seconds, but "
                        f"got {raw!r}.")
    return value


# ----------------------------------------------------------------------------------------------------------
# the ranks' side


def init_from_env(accelerator: Any = "auto") -> None:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (gloo on CPU, NCCL on
    GPU, where each rank takes the GPU of its LOCAL_RANK), with :func:`ddp_timeout_s`. Lightning finds the group
    already initialised and uses it."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "gloo"
    if _is_gpu(accelerator) and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend, init_method="env://", timeout=_dt.timedelta(seconds=ddp_timeout_s()))


def join_from_submitit() -> bool:
    """In a submitit task of a job with several tasks: export its rank environment and join the process group.
    False (nothing done) in a one-task job."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return False
    if env.num_tasks <= 1:
        return False
    for key in RANK_ENV:  # inherited from the submitting process (e.g. its own DDP run): this job's are set here
        os.environ.pop(key, None)
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    init_from_env()
    return True


def main(argv: list[str] | None = None) -> int:
    """One rank of a job started by :func:`run_job`: join the group, run the (entry, seed), leave the group."""
    import torch.distributed as dist

    from rcit_bench.bench.runner import run_spec
    from rcit_bench.cli import quiet_console
    from rcit_bench.utils import keep_freed_memory

    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    rank = int(os.environ["RANK"])
    keep_freed_memory()
    quiet_console(False)
    if rank != 0:  # one voice: rank 0 reports progress; the others only warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    init_from_env(args.get("accelerator", "auto"))
    try:
        run_spec(args["spec"], only=[args["entry"]], seeds=[args["seed"]], results_dir=args["results_dir"],
                 force=args["force"], use_wandb=args["use_wandb"], build_board=False,
                 wait_for_lock=args["wait_for_lock"], estimate=False, live=False)
        # every rank done before any tears its connections down: a rank whose peer closed the group first can
        # abort in gloo's teardown (seen: SIGABRT, "terminate called without an active exception")
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------------------
# the launcher's side


def free_port() -> int:
    """A TCP port free on this machine now, for the ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment of rank `rank` of a `world`-process job on this machine (the keys of ``RANK_ENV``, plus
    NODE_RANK), over the current one."""
    place = dict(zip(RANK_ENV, (str(rank), str(rank), str(world), str(world), "127.0.0.1", str(port))))
    return dict(os.environ, **place, NODE_RANK="0")


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_job(spec_path: str | Path, entry_id: str, seed: int, world: int, *, results_dir: str | Path,
            force: bool = False, use_wandb: bool = True, wait_for_lock: bool = False, accelerator: Any = "auto",
            pid_file: str | Path | None = None) -> None:
    """Run one (entry, seed) as `world` local processes and wait for them; raises RankFailed when a rank fails
    (the others are stopped first). ``pid_file``: where the ranks' pids are written while they run (JSON
    ``{"ranks": [pid, ...]}``), to find or stop them from outside; removed at the end."""
    args = {"spec": str(spec_path), "entry": entry_id, "seed": int(seed), "results_dir": str(results_dir),
            "force": bool(force), "use_wandb": bool(use_wandb), "wait_for_lock": bool(wait_for_lock),
            "accelerator": accelerator}
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(world):
            procs.append(subprocess.Popen([sys.executable, "-m", "rcit_bench.bench.multiprocess", json.dumps(args)],
                                          env=rank_env(rank, world, port)))
        if pid_file is not None:
            Path(pid_file).parent.mkdir(parents=True, exist_ok=True)
            Path(pid_file).write_text(json.dumps({"ranks": [p.pid for p in procs]}))
        log.info("%s/seed%d: %d processes (pids %s)", entry_id, seed, world, ", ".join(str(p.pid) for p in procs))
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                rank, code = bad[0]
                _stop(procs)
                raise RankFailed(f"{entry_id}/seed{seed}: rank {rank} of {world} {_how(code)}; the other ranks were "
                                 f"stopped. Finished cells are kept; rerun the same command to resume from the "
                                 f"entry's last.ckpt (the error of rank {rank}, if any, is printed above).")
            if all(c == 0 for c in codes):
                return
            time.sleep(POLL_S)
    except BaseException:
        _stop(procs)
        raise
    finally:
        if pid_file is not None:
            Path(pid_file).unlink(missing_ok=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every rank still running, then SIGKILL the ones alive after GRACE_S."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
