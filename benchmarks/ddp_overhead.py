"""Multi-process training overhead: optimizer steps per second with 1 and with W processes at the same global batch.

Why: a multi-process job (``trainer.devices`` W > 1, rcit_bench.bench.multiprocess) gathers every rank's
embeddings for the global-batch loss, all-reduces the batch-norm statistics (rcit_bench.models.global_batch) and
the gradients (DDP). On one machine's CPUs the ranks share the cores, so W processes cannot be faster than one;
what this measures there is the price of the communication and of the duplicated global-batch loss. On a machine
with GPUs it measures the scaling across the GPUs present (1, 2, 4, ... up to all of them).

Each configuration trains the quick spec's VSE++ model (the ``vsepp_clean`` entry's config) on the synthetic set for
``--steps`` optimizer steps after ``--warmup`` steps, through Lightning's DDP with the suite's own launcher
environment, and reports the median step time of rank 0.

    python benchmarks/ddp_overhead.py [--batch 128] [--steps 30] [--warmup 5] [--worlds 1,2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rcit_bench.utils import machine_header

HERE = Path(__file__).resolve().parent


def rank_main(args: argparse.Namespace) -> None:
    """One rank: join the group (when W > 1), train `warmup + steps` steps, rank 0 writes its step times."""
    import lightning as L
    import torch

    from rcit_bench.bench import runner
    from rcit_bench.bench.multiprocess import init_from_env
    from rcit_bench.bench.spec import load_spec
    from rcit_bench.cli import quiet_console

    quiet_console(False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if world > 1:
        init_from_env(accelerator)
    spec = load_spec(HERE / "quick.yaml")
    entry = spec.entry("vsepp_clean")
    cfg = runner.method_config(spec, entry)
    composed = runner.composed_config(spec, entry, 0, cfg)
    data = {**composed["data"], "batch_size": args.batch, "root": args.root}
    dm = runner.make_datamodule(data)
    runner._seed(0)
    model = runner.build_model(entry, composed, dm)
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if accelerator == "gpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    kw: dict[str, Any] = dict(accelerator=accelerator, devices=world, max_steps=args.warmup + args.steps,
                              limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()])
    if world > 1:
        kw.update(strategy="ddp_find_unused_parameters_true", use_distributed_sampler=False)
    L.Trainer(**kw).fit(model, datamodule=dm)
    if int(os.environ.get("RANK", "0")) == 0:
        gaps = [b - a for a, b in zip(times, times[1:])][args.warmup - 1:]
        Path(args.out).write_text(json.dumps({"world": world, "step_s": statistics.median(gaps), "steps": len(gaps),
                                              "device": accelerator}))


def run_world(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """Start `world` ranks of this script (the launcher's environment) and read rank 0's figures."""
    from rcit_bench.bench.multiprocess import RANK_ENV, free_port, rank_env

    out = Path(args.root) / f"ddp_overhead_w{world}.json"
    out.unlink(missing_ok=True)
    port = free_port()
    cmd = [sys.executable, __file__, "--rank-main", "--out", str(out), "--batch", str(args.batch), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--root", args.root, "--threads", str(args.threads or 0)]
    procs = []
    for rank in range(world):
        env = rank_env(rank, world, port)
        if world == 1:  # one plain process, no process group
            env = {k: v for k, v in env.items() if k not in RANK_ENV}
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"world {world}: ranks exited with {codes}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="global batch (split over the ranks)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--worlds", default=None, help="comma list of process counts (default: 1,2 on CPU; 1,2,4.. "
                                                  "up to the GPUs present)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--root", default="data/synthetic-quick", help="the synthetic data (generated when missing)")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_main:
        rank_main(args)
        return
    import torch

    gpus = torch.cuda.device_count()
    if args.worlds:
        worlds = [int(w) for w in args.worlds.split(",")]
    elif gpus:
        worlds = [w for w in (1, 2, 4, 8, 16) if w <= gpus]
    else:
        worlds = [1, 2]
    print(machine_header("cuda" if gpus else "cpu"))
    print(f"# global batch {args.batch}, {args.steps} timed steps after {args.warmup}, VSE++ (quick config)\n")
    rows = [run_world(args, w) for w in worlds]
    base = rows[0]["step_s"]
    print("| processes | device | per-rank batch | ms/step | steps/s | pairs/s | vs 1 process |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['device']} | {args.batch // r['world']} | {1000 * r['step_s']:.1f} | "
              f"{1 / r['step_s']:.2f} | {args.batch / r['step_s']:.0f} | {base / r['step_s']:.2f}x |")


if __name__ == "__main__":
    main()
