"""Pairs per second and peak extra memory of the chunked cross-attention scorer (rcit_bench.models.similarity.
chunked_scores) versus a straightforward per-caption loop, for SCAN text-to-image and matchmap MISA.

Also the dual-encoder cosine score (VSE++ / RCIT / MIIE): chunked versus one (N, D) x (D, M) product, both measured
on every pair. Sizes (``--sizes``, default 1000x5000): 1K x 5K is the Flickr30k / quick test split; 5000x25000 is
COCO 5K. Every pair is scored except where the table says "extrapolated": the per-caption loop is timed on the
first ``--loop-captions`` captions, and for a cross-attention size above ``--max-measured-pairs`` the chunked
scorer runs its real blocks for the first ``--block-images`` images against all captions, scaled linearly in pairs
to the full matrix (its block shape does not depend on N, so time is linear in pairs).

Default: 36 regions / cells, 12 words, dim 256 (float32). The per-caption loop scores all images against one
caption per call (as SCAN's reference code does). Every measurement runs in a
fresh subprocess; peak extra memory = VmHWM after the run minus VmRSS once the inputs exist (peak reset through
/proc/self/clear_refs), so it shows the scorer's own memory against ``--memory-budget-mb``.

    python benchmarks/similarity_speed.py [--memory-budget-mb 512] [--sizes 1000x5000,5000x25000] [--fns ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from rcit_bench.utils import keep_freed_memory, machine_header, proc_status_kb, reset_peak_rss


def worker(args: argparse.Namespace) -> dict:
    import functools

    import torch

    from rcit_bench.models.similarity import (
        bytes_factor,
        chunk_sizes,
        chunked_scores,
        cosine_sim,
        default_bytes_per_pair,
        matchmap_scores,
        scan_t2i,
    )

    torch.manual_seed(0)
    dual = args.fn == "cosine"
    n_rows = min(args.n_img, args.rows_timed or args.n_img)  # images actually scored (all unless extrapolating)
    if dual:  # global vectors (N, D), (M, D)
        regions, words, lengths = torch.randn(n_rows, args.dim), torch.randn(args.n_cap, args.dim), None
    else:
        regions = torch.randn(n_rows, args.regions, args.dim)  # (N, R, D)
        words = torch.randn(args.n_cap, args.words, args.dim)  # (M, L, D)
        lengths = torch.randint(max(1, args.words // 2), args.words + 1, (args.n_cap,))
    fn = {"scan_t2i": scan_t2i, "misa": functools.partial(matchmap_scores, mode="misa"), "cosine": cosine_sim}[args.fn]
    bpp = default_bytes_per_pair(regions, words, bytes_factor(fn))
    if dual:
        fn(regions[:2], words[:3])  # warm-up: thread pools and BLAS buffers are not the scorer's memory
    else:
        fn(regions[:2], words[:3], lengths[:3])
    n_cap = args.n_cap if args.mode in ("chunked", "full") else min(args.n_cap, args.loop_captions)
    rss0 = proc_status_kb("VmRSS")
    reset_ok = reset_peak_rss()
    hwm0 = proc_status_kb("VmHWM")
    t0, c0 = time.perf_counter(), time.process_time()
    torch.set_grad_enabled(False)  # inference, as in evaluation
    if args.mode == "chunked":
        scores = chunked_scores(
            fn, regions, words, lengths, memory_budget_mb=args.memory_budget_mb, bytes_per_pair=bpp
        )
    elif args.mode == "full":  # the straightforward dual-encoder score: one product
        scores = fn(regions, words)
    else:
        scores = torch.empty(n_rows, n_cap)
        for j in range(n_cap):
            scores[:, j : j + 1] = fn(regions, words[j : j + 1], lengths[j : j + 1])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = (proc_status_kb("VmHWM") - (rss0 if reset_ok else hwm0)) / 1024
    ci, ct = chunk_sizes(n_rows, args.n_cap, bpp, args.memory_budget_mb)
    r, l_max = (1, 1) if dual else (args.regions, args.words)
    out = {
        "fn": args.fn,
        "mode": args.mode,
        "pairs_timed": n_rows * n_cap,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_extra_mb": peak_mb,
        "output_mb": scores.numel() * 4 / 2**20,
        "block": [ci, ct] if args.mode == "chunked" else [n_rows, n_cap if args.mode == "full" else 1],
        "measured_factor": (
            peak_mb * 2**20 / (ci * ct * r * l_max * 4) if args.mode == "chunked" and not dual else None
        ),
        "peak_reset": reset_ok,
    }
    if args.mode == "chunked" and args.check_exact and not dual:
        # a block of the full matrix recomputed unchunked must match bit for bit
        sub = fn(regions[:37], words[:301], lengths[:301])
        out["exact_vs_unchunked"] = bool(torch.equal(scores[:37, :301], sub))
    return out


def spawn(args: argparse.Namespace, fn: str, mode: str, rows_timed: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--fn", fn, "--mode", mode, "--rows-timed", str(rows_timed)]
    for k in ("n_img", "n_cap", "regions", "words", "dim", "memory_budget_mb", "loop_captions"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.check_exact:
        cmd.append("--check-exact")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    keep_freed_memory()  # as the rcit-bench command runs (see its docstring)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None,
                    help="comma-separated IMGxCAP sizes, e.g. 1000x5000,5000x25000 (default: --n-img x --n-cap)")
    ap.add_argument("--n-img", type=int, default=1000)
    ap.add_argument("--n-cap", type=int, default=5000)
    ap.add_argument("--regions", type=int, default=36, help="regions (SCAN) / cells (matchmap) per image")
    ap.add_argument("--words", type=int, default=12, help="padded words per caption")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--memory-budget-mb", type=float, default=512)
    ap.add_argument("--loop-captions", type=int, default=100, help="captions the per-caption loop is timed on")
    ap.add_argument("--max-measured-pairs", type=float, default=5e6,
                    help="cross-attention sizes above this are timed on --block-images images and extrapolated")
    ap.add_argument("--block-images", type=int, default=200, help="images scored when extrapolating")
    ap.add_argument("--fns", default="cosine,scan_t2i,misa", help="cosine (dual encoder), scan_t2i (VSR++), misa")
    ap.add_argument("--check-exact", action="store_true", help="also check a sub-block against unchunked")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fn", default="scan_t2i", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="chunked", help=argparse.SUPPRESS)
    ap.add_argument("--rows-timed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sizes = [(args.n_img, args.n_cap)]
    if args.sizes:
        sizes = [tuple(int(x) for x in size.lower().split("x")) for size in args.sizes.split(",")]
    print(machine_header())
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other jobs may share the "
          "machine)")
    print(
        f"# {args.regions} regions/cells, {args.words} words, dim {args.dim}, float32; budget "
        f"{args.memory_budget_mb:g} MB; cosine = dual encoder (global vectors), scan_t2i = VSR++ local branch, "
        "misa = matchmap"
    )
    print("| size | scorer | method | block (img x cap) | pairs timed | wall (s) | CPU (s) | pairs/s (wall) | "
          "time for all pairs (s) | peak extra MB (incl. output) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n_img, n_cap in sizes:
        args.n_img, args.n_cap = n_img, n_cap
        total_pairs = n_img * n_cap
        size = f"{n_img} x {n_cap}"
        for fn in args.fns.split(","):
            dual = fn == "cosine"
            rows = 0 if dual or total_pairs <= args.max_measured_pairs else min(n_img, args.block_images)
            for mode in ("chunked", "full" if dual else "loop"):
                r = spawn(args, fn, mode, rows_timed=rows if mode == "chunked" else 0)
                rate = r["pairs_timed"] / r["wall_s"]
                full = total_pairs / rate
                note = ""
                if r["pairs_timed"] != total_pairs:
                    note = (f" (extrapolated from measured blocks: {r['pairs_timed']:,} of {total_pairs:,} pairs)"
                            if mode == "chunked" else " (extrapolated)")
                peak = f"{r['peak_extra_mb']:.0f}" + (" (of the pairs timed)" if note else "")
                print(
                    f"| {size} | {mode} | {fn} | {r['block'][0]} x {r['block'][1]} | {r['pairs_timed']} | "
                    f"{r['wall_s']:.2f} | {r['cpu_s']:.2f} | {rate:,.0f} | {full:.1f}{note} | {peak} |"
                )
                if mode == "chunked" and not dual:
                    within = r["peak_extra_mb"] <= args.memory_budget_mb + r["output_mb"]
                    exact = r.get("exact_vs_unchunked")
                    extra = "" if exact is None else f", exact vs unchunked sub-block: {exact}"
                    print(
                        f"|  |  | peak {r['peak_extra_mb']:.0f} MB <= budget {args.memory_budget_mb:g} MB + output "
                        f"{r['output_mb']:.0f} MB: {within}; measured bytes/pair factor {r['measured_factor']:.2f}"
                        f"{extra} |  |  |  |  |  |  |  |"
                    )


if __name__ == "__main__":
    main()
