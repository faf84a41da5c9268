"""Pairs per second and peak extra memory of the chunked cross-attention scorer (rcit_bench.models.similarity.
chunked_scores) versus a straightforward per-caption loop, for SCAN text-to-image and matchmap MISA.

Default size: 1,000 images x 5,000 captions, 36 regions / cells, 12 words, dim 256 (float32). The per-caption
loop scores all images against one caption per call (as SCAN's reference code does); it is timed on the first
``--loop-captions`` captions and extrapolated to all captions (said so in the table). Every measurement runs in a
fresh subprocess; peak extra memory = VmHWM after the run minus VmRSS once the inputs exist (peak reset through
/proc/self/clear_refs), so it shows the scorer's own memory against ``--memory-budget-mb``.

    python benchmarks/similarity_speed.py [--memory-budget-mb 512 --n-img 1000 --n-cap 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def machine_header() -> str:
    import torch

    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"# machine: {platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}\n"
        f"# command: python {' '.join(sys.argv)}"
    )


def worker(args: argparse.Namespace) -> dict:
    import functools

    import torch

    from rcit_bench.models.similarity import (
        bytes_factor,
        chunk_sizes,
        chunked_scores,
        default_bytes_per_pair,
        matchmap_scores,
        scan_t2i,
    )

    torch.manual_seed(0)
    regions = torch.randn(args.n_img, args.regions, args.dim)  # (N, R, D)
    words = torch.randn(args.n_cap, args.words, args.dim)  # (M, L, D)
    lengths = torch.randint(max(1, args.words // 2), args.words + 1, (args.n_cap,))
    fn = {"scan_t2i": scan_t2i, "misa": functools.partial(matchmap_scores, mode="misa")}[args.fn]
    bpp = default_bytes_per_pair(regions, words, bytes_factor(fn))
    fn(regions[:2], words[:3], lengths[:3])  # warm-up: thread pools and BLAS buffers are not the scorer's memory
    n_cap = args.n_cap if args.mode == "chunked" else min(args.n_cap, args.loop_captions)
    rss0 = _status_kb("VmRSS")
    reset_ok = _reset_peak()
    hwm0 = _status_kb("VmHWM")
    t0, c0 = time.perf_counter(), time.process_time()
    torch.set_grad_enabled(False)  # inference, as in evaluation
    if args.mode == "chunked":
        scores = chunked_scores(
            fn, regions, words, lengths, memory_budget_mb=args.memory_budget_mb, bytes_per_pair=bpp
        )
    else:
        scores = torch.empty(args.n_img, n_cap)
        for j in range(n_cap):
            scores[:, j : j + 1] = fn(regions, words[j : j + 1], lengths[j : j + 1])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = (_status_kb("VmHWM") - (rss0 if reset_ok else hwm0)) / 1024
    ci, ct = chunk_sizes(args.n_img, args.n_cap, bpp, args.memory_budget_mb)
    out = {
        "fn": args.fn,
        "mode": args.mode,
        "pairs_timed": args.n_img * n_cap,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_extra_mb": peak_mb,
        "output_mb": scores.numel() * 4 / 2**20,
        "block": [ci, ct] if args.mode == "chunked" else [args.n_img, 1],
        "measured_factor": (
            peak_mb * 2**20 / (ci * ct * args.regions * args.words * 4) if args.mode == "chunked" else None
        ),
        "peak_reset": reset_ok,
    }
    if args.mode == "chunked" and args.check_exact:
        # a block of the full matrix recomputed unchunked must match bit for bit
        sub = fn(regions[:37], words[:301], lengths[:301])
        out["exact_vs_unchunked"] = bool(torch.equal(scores[:37, :301], sub))
    return out


def spawn(args: argparse.Namespace, fn: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--fn", fn, "--mode", mode]
    for k in ("n_img", "n_cap", "regions", "words", "dim", "memory_budget_mb", "loop_captions"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.check_exact:
        cmd.append("--check-exact")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-img", type=int, default=1000)
    ap.add_argument("--n-cap", type=int, default=5000)
    ap.add_argument("--regions", type=int, default=36, help="regions (SCAN) / cells (matchmap) per image")
    ap.add_argument("--words", type=int, default=12, help="padded words per caption")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--memory-budget-mb", type=float, default=512)
    ap.add_argument("--loop-captions", type=int, default=100, help="captions the per-caption loop is timed on")
    ap.add_argument("--fns", default="scan_t2i,misa")
    ap.add_argument("--check-exact", action="store_true", help="also check a sub-block against unchunked")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fn", default="scan_t2i", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="chunked", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(machine_header())
    print(
        f"# {args.n_img} images x {args.n_cap} captions; {args.regions} regions/cells, {args.words} words, "
        f"dim {args.dim}, float32; budget {args.memory_budget_mb:g} MB; inputs "
        f"{(args.n_img * args.regions + args.n_cap * args.words) * args.dim * 4 / 2**20:.0f} MB"
    )
    print("| scorer | method | block (img x cap) | pairs timed | wall (s) | CPU (s) | pairs/s (wall) | "
          "time for all pairs (s) | peak extra MB (incl. output) |")
    print("|---|---|---|---|---|---|---|---|---|")
    total_pairs = args.n_img * args.n_cap
    for fn in args.fns.split(","):
        for mode in ("chunked", "loop"):
            r = spawn(args, fn, mode)
            rate = r["pairs_timed"] / r["wall_s"]
            full = total_pairs / rate
            note = "" if r["pairs_timed"] == total_pairs else " (extrapolated)"
            print(
                f"| {mode} | {fn} | {r['block'][0]} x {r['block'][1]} | {r['pairs_timed']} | {r['wall_s']:.2f} | "
                f"{r['cpu_s']:.2f} | {rate:,.0f} | {full:.1f}{note} | {r['peak_extra_mb']:.0f} |"
            )
            if mode == "chunked":
                within = r["peak_extra_mb"] <= args.memory_budget_mb + r["output_mb"]
                exact = r.get("exact_vs_unchunked")
                extra = "" if exact is None else f", exact vs unchunked sub-block: {exact}"
                print(
                    f"|  | peak {r['peak_extra_mb']:.0f} MB <= budget {args.memory_budget_mb:g} MB + output "
                    f"{r['output_mb']:.0f} MB: {within}; measured bytes/pair factor {r['measured_factor']:.2f}{extra} "
                    "|  |  |  |  |  |  |  |"
                )


if __name__ == "__main__":
    main()
