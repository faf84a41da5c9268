"""Training throughput per method: image-caption pairs per second, ms per optimisation step, peak memory, FLOP/s.

Why: the quick benchmark's wall time is dominated by training on CPU and the paper specs need a GPU-hour budget;
both need a per-method step cost measured on the path the benchmark really takes. So the model and datamodule are
built by the runner's own builders (``rcit_bench.bench.runner``: method_config, datamodule_kwargs,
make_datamodule, build_model, trainer_kwargs) from an in-memory one-entry spec, and the steps run in a Lightning
``Trainer`` as in ``runner.train`` (forward, backward, gradient clipping, optimizer step, and data loading with
training-time corruption, e.g. RCIT's paired copies). Validation, checkpoints and loggers are off.

A step's time is measured between consecutive ``on_train_batch_end`` hooks, so it includes loading the batch.
``--warmup`` steps are excluded; after the ``--steps`` timed steps one more step runs under
``torch.utils.flop_counter.FlopCounterMode`` (not timed) to count its FLOPs (matmuls and convolutions, forward and
backward; elementwise ops are not counted, so FLOP/s is a lower bound on work done). Each method runs in a fresh
subprocess so that peak RSS is its own. Only the first epoch's steps are timed (MIIE: its triplet-only first
stage; the adversarial stage adds a small classifier).

    python benchmarks/train_throughput.py [--methods vsepp,rcit] [--steps 20] [--warmup 3]
    python benchmarks/train_throughput.py --device cuda --precision bf16-mixed --paper --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from rcit_bench.utils import keep_freed_memory, machine_header

METHODS = ("vsepp", "rcit", "miie", "matchmap", "vsrpp")
RCIT_MIX = [{"name": "speckle", "rate": 0.6}, {"name": "salt_pepper", "rate": 0.6}]
# --paper on a machine without the datasets: the paper model configs on generated synthetic images at the paper
# configs' decoded size (256 px; the encoders resize to 224) and batch 128. Throughput does not depend on content.
PAPER_SYNTHETIC_ROOT = "data/synthetic-256"


def throughput_spec(method: str, *, paper: bool = False, n_train: int | None = None, trainer: dict | None = None,
                    root: str | None = None) -> Any:
    """A validated one-entry spec for `method` at its default synthetic config (or its paper config, on synthetic
    data, ImageNet weights off: they change no cost). RCIT trains on paired copies as in the quick spec."""
    from rcit_bench.bench.spec import validate_spec

    entry: dict[str, Any] = {"id": method, "method": method}
    if method == "rcit":
        entry.update(regime="paired", corruption_mix=RCIT_MIX)
    options: dict[str, Any] = {"root": root or ("data/synthetic" if not paper else PAPER_SYNTHETIC_ROOT)}
    if paper:
        entry["config"] = f"paper/{method}_flickr30k"
        entry["overrides"] = {"model": {"image_encoder": {"pretrained": False}}}  # deep-merged: keeps the backbone
        options.update(n_val=64, n_test=64)
    if n_train is not None:
        options["n_train"] = n_train
    data = {"name": "throughput", "dataset": {"kind": "synthetic", "options": options}, "entries": [entry],
            "evaluation": {"clean": True}, "trainer": dict(trainer or {})}
    return validate_spec(data)


def measure(method: str, steps: int, warmup: int, device: str, precision: str | None, paper: bool,
            count_flops: bool = True) -> dict[str, Any]:
    """Train `warmup` + `steps` (+1 FLOP-counted) steps of `method` in this process; returns the measurements."""
    import lightning as L
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rcit_bench.bench import runner

    batch_hint = 128
    total = warmup + steps + (1 if count_flops else 0)
    # enough training images for one epoch of `total` steps (5 captions per image), so no epoch boundary
    n_train = max(64, (total * batch_hint) // 5 + 1) if paper else None
    spec = throughput_spec(method, paper=paper, n_train=n_train)
    entry = spec.entries[0]
    cfg = runner.method_config(spec, entry)
    dkw = runner.datamodule_kwargs(spec, entry, 0, cfg)
    t_setup = time.perf_counter()
    dm = runner.make_datamodule(dkw)
    runner._seed(0)
    model = runner.build_model(entry, cfg, dm)
    setup_s = time.perf_counter() - t_setup
    batch = int(dkw.get("batch_size", 128))
    tkw = runner.trainer_kwargs(spec, entry, cfg)
    tkw.update(max_steps=total, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1)
    tkw.pop("limit_train_batches", None)
    tkw.pop("val_check_interval", None)
    if precision:
        tkw["precision"] = precision
    elif not device.startswith("cuda"):
        tkw.pop("precision", None)  # the paper configs' 16-mixed is for GPUs

    class Timer(L.Callback):
        """Wall time of each step (previous step's end to this step's end: data loading included)."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []  # process CPU seconds (all threads): less affected by other jobs
            self.starts: list[float] = []
            self.flops = None
            self._fc = None

        def _sync(self) -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self._sync()
            self.starts.append(time.perf_counter())
            if count_flops and batch_idx == total - 1:
                self._fc = FlopCounterMode(display=False)
                self._fc.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self._sync()
            if self._fc is not None:
                self._fc.__exit__(None, None, None)
                self.flops = int(self._fc.get_total_flops())
                self._fc = None
                return
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

    timer = Timer()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(default_root_dir=os.environ.get("TMPDIR", "/tmp") + "/rcit-throughput", callbacks=[timer],
                        logger=False, **tkw)
    trainer.fit(model, datamodule=dm)
    ends, starts = timer.ends, timer.starts
    if len(ends) < warmup + steps:
        raise RuntimeError(f"{method}: only {len(ends)} steps ran, expected {warmup + steps}.")
    timed = ends[warmup - 1: warmup + steps] if warmup else [starts[0]] + ends[:steps]
    wall = timed[-1] - timed[0]
    # data time: previous step's end to this step's start (the dataloader's share of the step)
    data = sum(starts[i] - ends[i - 1] for i in range(max(warmup, 1), warmup + steps))
    ms_step = wall / steps * 1e3
    cpu = timer.cpu_ends[warmup + steps - 1] - timer.cpu_ends[warmup - 1] if warmup else None
    out = {
        "method": method, "batch": batch, "steps": steps, "wall_s": wall, "ms_per_step": ms_step,
        "data_ms_per_step": data / max(1, min(steps, warmup + steps - max(warmup, 1))) * 1e3,
        "pairs_per_s": batch * steps / wall, "flops_per_step": timer.flops,
        "cpu_ms_per_step": None if cpu is None else cpu / steps * 1e3,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "setup_s": setup_s,
        "image_size": int(dkw.get("image_size", 64)), "precision": str(tkw.get("precision", "32-true")),
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def spawn(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter (its own peak RSS, no state from the previous method)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.paper:
        cmd.append("--paper")
    if args.no_flops:
        cmd.append("--no-flops")
    return run_worker(cmd)


def run_worker(cmd: list[str]) -> dict[str, Any]:
    """Run a worker command in a fresh interpreter (W&B off) and return the JSON of its last output line."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]], peak_tflops: float | None) -> list[str]:
    """Markdown table lines (the test parses them)."""
    head = ("| method | batch | px | precision | steps | pairs/s | ms/step | CPU ms/step | data ms/step | GFLOP/step | "
            "achieved GFLOP/s | % of peak | peak RSS MB |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        fl = r.get("flops_per_step")
        achieved = fl / (r["ms_per_step"] / 1e3) / 1e9 if fl else None  # GFLOP/s
        share = f"{100 * achieved / 1e3 / peak_tflops:.1f}" if (achieved is not None and peak_tflops) else "-"
        cpu = "-" if r.get("cpu_ms_per_step") is None else f"{r['cpu_ms_per_step']:.0f}"
        rss = f"{r['peak_rss_mb']:.0f}" + (f" (GPU {r['peak_gpu_mb']:.0f})" if "peak_gpu_mb" in r else "")
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['image_size']} | {r['precision']} | {r['steps']} | "
            f"{r['pairs_per_s']:.1f} | {r['ms_per_step']:.1f} | "
            f"{cpu} | "
            f"{r['data_ms_per_step']:.1f} | "
            f"{'-' if fl is None else f'{fl / 1e9:.1f}'} | {'-' if achieved is None else f'{achieved:,.1f}'} | "
            f"{share} | {rss} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    keep_freed_memory()  # as the rcit-bench command runs (see its docstring)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all five)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimisation steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (cuda only when available)")
    ap.add_argument("--precision", default=None,
                    help="Lightning precision, e.g. bf16-mixed (GPU); default: the config's (CPU: 32-true)")
    ap.add_argument("--paper", action="store_true",
                    help="paper configs (configs/paper/<method>_flickr30k.yaml: ResNet-152 at 224 px, batch 128) on "
                         "synthetic 256 px images; meant for a GPU")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak (e.g. bf16 dense: A100 312, H100 SXM 989) for the '%% of peak' column")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP-counted step")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda but torch.cuda.is_available() is False on this machine")
    if args.worker:
        print(json.dumps(measure(args.worker, args.steps, args.warmup, args.device, args.precision, args.paper,
                                 count_flops=not args.no_flops)))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    print(machine_header(args.device))
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other jobs may share the "
          "machine; CPU ms/step is less affected by them than wall ms/step)")
    cfgs = "rcit_bench/configs/paper/<method>_flickr30k.yaml on synthetic 256 px" if args.paper else \
        "rcit_bench/configs/<method>.yaml (synthetic 64 px)"
    print(f"# training throughput: {cfgs}; {args.warmup} warm-up + {args.steps} timed steps per method, "
          "each method in a fresh process")
    rows = []
    for m in methods:
        rows.append(spawn(m, args))
        print(f"# {m}: done ({rows[-1]['ms_per_step']:.0f} ms/step)", file=sys.stderr, flush=True)
    for line in table(rows, args.peak_tflops):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": machine_header(args.device), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
