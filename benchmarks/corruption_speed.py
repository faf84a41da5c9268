"""Corruption throughput: rcit-bench (batched torch) versus the `imagecorruptions` package (NumPy per image).

Usage:
    python benchmarks/corruption_speed.py [--batch 16] [--severity 3] [--repeats 3] [--device cpu|cuda]
        [--only NAME ...] [--ic-glass-images 2] [--threads N] [--system-malloc]

Prints a markdown table (images per second, best of --repeats for both, timed alternately; imagecorruptions
one call per image over the batch, glass blur on only --ic-glass-images images because it is slow). The
batch is built from scikit-image sample photos (astronaut, chelsea, coffee, rocket), short side resized
to 224 px and centre/side cropped or flipped into 16 distinct 224 x 224 images. The imagecorruptions
release on PyPI imports `pkg_resources` (absent from recent setuptools) for its frost files; a stub is
installed so the other corruptions can be compared. Where the package fails (it crashes on current
NumPy/scikit-image for glass_blur, gaussian_blur and fog) the row says 'peer failed: <reason>' and the
benchmark goes on. Both sides run in the same process, one corruption after the other, so they see the
same machine load; rcit-bench is given the images as one batch (its API), imagecorruptions one at a time
(its API), each after one untimed warm-up call. Both run with the allocator setting of the rcit-bench command
(freed memory kept for reuse, see rcit_bench.utils.keep_freed_memory) unless --system-malloc is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

from rcit_bench.data.corruptions import RATE_CORRUPTIONS, corrupt, list_corruptions
from rcit_bench.utils import keep_freed_memory, machine_header


def sample_batch(n: int = 16, size: int = 224) -> torch.Tensor:
    """(n, 3, size, size) float in [0, 1] from skimage sample photos."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = []
    for ph in photos:
        t = torch.from_numpy(np.ascontiguousarray(ph)).permute(2, 0, 1).float()[None] / 255
        h, w = t.shape[-2:]
        s = size / min(h, w)
        t = F.interpolate(t, size=(max(size, round(h * s)), max(size, round(w * s))), mode="area")
        h, w = t.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        centre = t[..., top:top + size, left:left + size]
        first = t[..., :size, :size]
        last = t[..., h - size:, w - size:]
        out += [centre, centre.flip(-1), first, last]
    return torch.cat(out)[:n].clamp(0, 1).contiguous()


def _import_imagecorruptions():
    """Import imagecorruptions, stubbing pkg_resources.resource_filename if setuptools no longer has it."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pkg_resources")

        def resource_filename(package: str, resource: str) -> str:
            import importlib.util

            base = os.path.dirname(importlib.util.find_spec(package).origin)
            return os.path.join(base, resource)

        stub.resource_filename = resource_filename
        sys.modules["pkg_resources"] = stub
    try:
        import imagecorruptions

        return imagecorruptions
    except Exception as e:  # noqa: BLE001 - report any import failure
        return f"peer failed: import: {type(e).__name__}: {e}"


def _rcit_once(x: torch.Tensor, name: str, severity: int) -> float:
    kw = {"rate": 0.6} if name in RATE_CORRUPTIONS else {"severity": severity}
    ids = list(range(x.shape[0]))
    if x.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    corrupt(x, name, image_ids=ids, **kw)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _ic_once(ic, arrays: list[np.ndarray], name: str, severity: int) -> float:
    t = time.perf_counter()
    for a in arrays:
        ic.corrupt(a, corruption_name=name, severity=severity)
    return time.perf_counter() - t


def time_pair(
    x: torch.Tensor, ic, arrays: list[np.ndarray], name: str, severity: int, repeats: int
) -> tuple[float, float | str]:
    """Images/s of rcit-bench (one batch call) and imagecorruptions (one call per image), best of `repeats`.

    The two are timed alternately within each repeat, after one untimed warm-up each, so that both see the
    same machine load (other jobs make single timings noisy on a small machine)."""
    _rcit_once(x, name, severity)  # warm-up (imports, caches, allocator, kernels)
    theirs: float | str
    if isinstance(ic, str):
        theirs = ic
    elif name in RATE_CORRUPTIONS or name not in ic.get_corruption_names("all"):
        theirs = "n/a"
    else:
        try:
            np.random.seed(0)
            ic.corrupt(arrays[0], corruption_name=name, severity=severity)  # warm-up
            theirs = float("inf")
        except Exception as e:  # noqa: BLE001 - the package crashes on current numpy/skimage for some
            msg = str(e).splitlines()[0] if str(e) else ""
            theirs = f"peer failed: {type(e).__name__}: {msg[:60]}"
    ours = float("inf")
    for _ in range(repeats):
        ours = min(ours, _rcit_once(x, name, severity))
        if isinstance(theirs, float):
            theirs = min(theirs, _ic_once(ic, arrays, name, severity))
    return x.shape[0] / ours, (len(arrays) / theirs if isinstance(theirs, float) else theirs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--only", nargs="*", default=None, help="corruption names to run (default: all)")
    p.add_argument("--ic-glass-images", type=int, default=2)
    p.add_argument("--no-ic", action="store_true", help="skip imagecorruptions")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's). imagecorruptions is single-threaded NumPy; on a small "
        "machine shared with other jobs, torch's thread pool can lose more to waiting than it gains",
    )
    p.add_argument(
        "--system-malloc", action="store_true",
        help="leave glibc's allocator at its defaults instead of keeping freed memory as the rcit-bench command "
        "does (rcit_bench.utils.keep_freed_memory); shows what page faults cost",
    )
    args = p.parse_args(argv)
    if not args.system_malloc:
        keep_freed_memory()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")

    x = sample_batch(args.batch).to(args.device)
    arrays = [(im.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8) for im in x]
    ic = "skipped" if args.no_ic else _import_imagecorruptions()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# Corruption throughput, {args.batch} images of 224 px, severity {args.severity} (rate 0.6 for RCIT modes)")
    print(machine_header(args.device))
    print(f"# numpy {np.__version__}, load average {load:.1f} at start")
    print()
    print("| corruption | rcit-bench img/s | imagecorruptions img/s | speedup |")
    print("|---|---:|---:|---:|")
    names = args.only or list_corruptions()
    for name in names:
        sub = arrays[: args.ic_glass_images] if name == "glass_blur" else arrays
        ours, theirs = time_pair(x, ic, sub, name, args.severity, args.repeats)
        if isinstance(theirs, float):
            cell, speed = f"{theirs:.1f}", f"{ours / theirs:.1f}x"
        else:
            cell, speed = theirs, "-"
        print(f"| {name} | {ours:.1f} | {cell} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
