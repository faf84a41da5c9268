"""Time and peak extra memory of rcit_bench.metrics at COCO 5K x 25K: retrieval_metrics, compute_ranks with and
without tie flags, and the bootstrap intervals (from the scores, and from stored ranks), beside torchmetrics'
RetrievalHitRate at a smaller size (torchmetrics needs tens of seconds and ~10 GB at 5K x 25K).

Each measurement runs in a fresh subprocess: the inputs are built (for ``bootstrap_from_ranks`` the ranks too),
the peak-RSS counter is reset (``/proc/self/clear_refs``), the metric runs, and ``VmHWM - VmRSS(before)`` is the
peak extra memory.

    python benchmarks/metrics_speed.py [--n-img 5000 --caps-per-image 5 --tm-n-img 1000 --repeats 3
                                        --resamples 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from rcit_bench.utils import keep_freed_memory, machine_header, proc_status_kb, reset_peak_rss


KINDS = {
    "ours": "rcit_bench retrieval_metrics",
    "ranks": "rcit_bench compute_ranks",
    "ranks_ties": "rcit_bench compute_ranks(return_ties=True)",
    "bootstrap": "rcit_bench bootstrap_intervals ({resamples} resamples)",
    "bootstrap_ranks": "rcit_bench bootstrap_from_ranks ({resamples} resamples, ranks given)",
    "torchmetrics": "torchmetrics RetrievalHitRate (6 calls)",
}


def worker(kind: str, n_img: int, caps: int, repeats: int, resamples: int = 1000) -> dict:
    import torch

    torch.manual_seed(0)
    n_cap = n_img * caps
    c2i = torch.randperm(n_cap) % n_img
    # strictly positive scores (torchmetrics versions differ on non-positive ones); positives boosted
    sims = torch.rand(n_img, n_cap) + 0.05
    sims[c2i, torch.arange(n_cap)] += 0.3
    if kind == "ours":
        from rcit_bench.metrics import retrieval_metrics

        def run() -> dict:
            return retrieval_metrics(sims, c2i)

    elif kind in ("ranks", "ranks_ties"):
        from rcit_bench.metrics import compute_ranks, metrics_from_ranks

        def run() -> dict:
            return metrics_from_ranks(*compute_ranks(sims, c2i, return_ties=kind == "ranks_ties")[:2])

    elif kind in ("bootstrap", "bootstrap_ranks"):
        from rcit_bench.metrics import bootstrap_from_ranks, bootstrap_intervals, compute_ranks

        ranks = compute_ranks(sims, c2i)  # a stored result's ranks: built before the measurement

        def run() -> dict:
            if kind == "bootstrap":
                return bootstrap_intervals(sims, c2i, n_resamples=resamples)
            return bootstrap_from_ranks(*ranks, c2i, n_resamples=resamples)

    else:
        from torchmetrics.retrieval import RetrievalHitRate

        def run() -> dict:
            target = c2i[None, :] == torch.arange(n_img)[:, None]  # (N_img, N_cap)
            out = {}
            for k in (1, 5, 10):
                out[f"i2t_r{k}"] = 100 * float(
                    RetrievalHitRate(top_k=k)(
                        sims.flatten(), target.flatten(), indexes=torch.arange(n_img)[:, None].expand_as(sims).flatten()
                    )
                )
                out[f"t2i_r{k}"] = 100 * float(
                    RetrievalHitRate(top_k=k)(
                        sims.T.flatten(),
                        target.T.flatten(),
                        indexes=torch.arange(n_cap)[:, None].expand(-1, n_img).flatten(),
                    )
                )
            return out

    run_times, cpu_times = [], []
    rss0 = proc_status_kb("VmRSS")
    reset_ok = reset_peak_rss()
    hwm_before = proc_status_kb("VmHWM")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = run()
        run_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak_extra_mb = (proc_status_kb("VmHWM") - (rss0 if reset_ok else hwm_before)) / 1024
    return {
        "kind": kind,
        "n_img": n_img,
        "n_cap": n_cap,
        "best_s": min(run_times),
        "times_s": run_times,
        "best_cpu_s": min(cpu_times),
        "peak_extra_mb": peak_extra_mb,
        "peak_reset": reset_ok,
        # recalls and rsum (bootstrap kinds: their (lo, hi) intervals)
        "recalls": {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]) for k, v in result.items()
                    if k.endswith(("_r1", "_r5", "_r10")) or k == "rsum"},
    }


def spawn(kind: str, n_img: int, caps: int, repeats: int, resamples: int = 1000) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--n-img", str(n_img), "--caps-per-image", str(caps)]
    cmd += ["--repeats", str(repeats), "--resamples", str(resamples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    keep_freed_memory()  # as the rcit-bench command runs (see its docstring)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-img", type=int, default=5000)
    ap.add_argument("--caps-per-image", type=int, default=5)
    ap.add_argument("--tm-n-img", type=int, default=1000, help="images for the torchmetrics comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--worker", choices=list(KINDS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n_img, args.caps_per_image, args.repeats, args.resamples)))
        return
    print(machine_header())
    big = [spawn(kind, args.n_img, args.caps_per_image, args.repeats, args.resamples)
           for kind in ("ours", "ranks", "ranks_ties", "bootstrap", "bootstrap_ranks")]
    small = spawn("ours", args.tm_n_img, args.caps_per_image, args.repeats)
    tm = spawn("torchmetrics", args.tm_n_img, args.caps_per_image, 1)
    base = big[0]["best_cpu_s"]
    print("| implementation | sims (N_img x N_cap) | best wall (s) | CPU time (s) | CPU / retrieval_metrics | "
          "peak extra memory (MB) |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(big + [small, tm]):
        name = KINDS[r["kind"]].format(resamples=args.resamples)
        size = f"{r['n_img']} x {r['n_cap']}"
        ratio = f"{r['best_cpu_s'] / base:.2f}" if i < len(big) else "-"
        print(f"| {name} | {size} | {r['best_s']:.3f} | {r['best_cpu_s']:.3f} | {ratio} | {r['peak_extra_mb']:.0f} |")
    same = all(abs(small["recalls"][k] - v) < 1e-3 for k, v in tm["recalls"].items())
    print(f"\nrecalls at {args.tm_n_img} x {args.tm_n_img * args.caps_per_image}: ours == torchmetrics: {same}")
    if not same:
        print(f"ours: {small['recalls']}\ntorchmetrics: {tm['recalls']}")
    point, boot = big[0]["recalls"], big[3]["recalls"]
    print(f"{args.n_img} x {args.n_img * args.caps_per_image} rsum {point['rsum']:.2f}, "
          f"95% bootstrap interval [{boot['rsum'][0]:.2f}, {boot['rsum'][1]:.2f}]")
    print("(wall times are best of --repeats; CPU time = process time over all threads, robust to a shared machine)")
    if not all(r["peak_reset"] for r in big + [small, tm]):
        print("note: /proc/self/clear_refs unavailable; peak includes input construction")


if __name__ == "__main__":
    main()
