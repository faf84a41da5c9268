"""`rcit-bench` command line: builds things and runs them; the work lives in the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from rcit_bench.bench.multiprocess import RankFailed
from rcit_bench.bench.store import CheckpointError
from rcit_bench.errors import UserError
from rcit_bench.utils import keep_freed_memory

SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")


def _load_image(source: str):
    """A file path, or the name of a photograph shipped by scikit-image (astronaut, chelsea, coffee, rocket)."""
    import numpy as np
    import torch

    if source in SAMPLE_IMAGES:
        from skimage import data

        array = getattr(data, source)()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"Image '{source}' not found: pass an image file or one of {', '.join(SAMPLE_IMAGES)}."
            )
        from PIL import Image

        try:
            with Image.open(path) as im:
                array = np.array(im.convert("RGB"))  # a copy: writable, as torch wants
        except Image.DecompressionBombError as err:  # over Pillow's own pixel limit: refused before decoding
            raise UserError(f"Image '{source}' is too large to read ({err}).") from None
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float() / 255.0


def cmd_corrupt(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from rcit_bench.data.corruptions import (
        GRID_MAX_PIXELS, GRID_MAX_SIDE, GRID_MAX_TOTAL_PIXELS, MAX_REFERENCE_SIDE, MIN_SIZE, REFERENCE_SIZE,
        reference_grid_size, short_side_size,
    )
    from rcit_bench.data.corruptions import preview

    if args.size != 0 and not MIN_SIZE <= args.size <= GRID_MAX_SIDE:
        raise UserError(f"--size must be 0 (keep the image's size) or the short side in px, from {MIN_SIZE} to "
                        f"{GRID_MAX_SIDE}, but got {args.size}.")
    if args.seed < 0:
        raise UserError(f"--seed must be an integer >= 0, but got {args.seed}.")
    preview.output_format(args.out)
    plan = preview.plan_preview(preview.parse_only(args.only), preview.parse_severities(args.severities),
                                preview.parse_rates(args.rates))
    tiles = plan.tiles
    image = _load_image(args.image)
    h, w = image.shape[-2:]
    # the preview's budget (rcit_bench.data.corruptions.check_grid_budget), checked before anything is resized
    # or corrupted, with what to pass instead
    th, tw = short_side_size(h, w, args.size)
    shown = f"image '{args.image}' ({w}x{h} px, width x height)"
    rh, rw = reference_grid_size(th, tw)
    if max(rh, rw) > MAX_REFERENCE_SIDE:
        raise UserError(
            f"{shown} is too elongated: snow, frost, fog, spatter and elastic_transform would build their random "
            f"layers on a {rw}x{rh} px grid ({REFERENCE_SIZE} px short side), over the budget of {MAX_REFERENCE_SIDE} "
            f"px on its long side, i.e. an aspect ratio of at most {MAX_REFERENCE_SIDE / REFERENCE_SIZE:.1f}:1; crop "
            f"the image (--size keeps the aspect ratio, so it cannot help)."
        )
    made = f"--size {args.size} makes it {tw}x{th} px" if args.size else f"with --size 0 it stays {tw}x{th} px"
    if min(th, tw) < MIN_SIZE:
        raise UserError(f"{shown} is too small: {made}, and the corruptions need at least {MIN_SIZE} px on the "
                        f"short side; pass --size {REFERENCE_SIZE}.")
    per_image = max(th, tw) > GRID_MAX_SIDE or th * tw > GRID_MAX_PIXELS
    if per_image or tiles * th * tw > GRID_MAX_TOTAL_PIXELS:  # the latter: more tiles than the full built-in grid
        short, long_ = min(h, w), max(h, w)
        pixels = min(GRID_MAX_PIXELS, GRID_MAX_TOTAL_PIXELS // tiles)
        fit = min(GRID_MAX_SIDE * short // long_, int((pixels * short / long_) ** 0.5))
        while fit > MIN_SIZE:
            fh, fw = short_side_size(h, w, fit)
            if max(fh, fw) <= GRID_MAX_SIDE and fh * fw <= pixels:
                break
            fit -= 1
        if per_image:
            raise UserError(
                f"{shown} is too large for the preview: {made}, over its budget of at most {GRID_MAX_SIDE} px on "
                f"the long side and {GRID_MAX_PIXELS:,} px in all (the grid holds a copy per corruption and "
                f"severity); pass a smaller --size, at most {fit}."
            )
        raise UserError(
            f"{shown} is too large for a preview of {tiles} tiles: {made}, {tiles * th * tw:,} px in all, over its "
            f"budget of {GRID_MAX_TOTAL_PIXELS:,} px (the full built-in grid of 114 tiles at {GRID_MAX_PIXELS:,} "
            f"px); pass a smaller --size, at most {fit}, or fewer rows/columns (--only, --severities, --rates)."
        )
    preview.check_output(args.out, plan, th, tw)
    if (th, tw) != (h, w):
        image = F.interpolate(image[None], size=(th, tw), mode="bilinear", antialias=True)[0]
    mosaic = preview.preview_mosaic(image.clamp(0, 1), plan, seed=args.seed)
    size = preview.save_preview(mosaic, args.out)
    logging.info("wrote %s (%dx%d px, %.1f MB)", args.out, mosaic.width, mosaic.height, size / 1e6)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.launcher == "submitit":
        from rcit_bench.bench.launchers import submit_spec

        jobs = submit_spec(
            args.spec,
            executor_folder=args.executor_folder or str(Path(args.results_dir) / "submitit" / "%j"),
            partition=args.partition,
            gpus_per_job=args.gpus_per_job,
            cpus_per_job=args.cpus_per_job,
            mem_gb=args.mem_gb,
            timeout_min=args.timeout_min,
            requeue=not args.no_requeue,
            cluster=args.cluster,
            results_dir=args.results_dir,
            use_wandb=not args.no_wandb,
            force=args.force,
            only=args.only,
            array_parallelism=args.array_parallelism,
            wait=args.wait,
            leaderboard_dir=args.leaderboard_dir,
        )
        sys.stdout.write(f"submitted {len(jobs)} job(s): {' '.join(jobs)}\n")
        if not args.wait:
            sys.stdout.write(f"when they are done: rcit-bench leaderboard {args.spec} --results-dir {args.results_dir}\n")
        return 0
    from rcit_bench.bench.runner import run_spec

    summary = run_spec(
        args.spec,
        results_dir=args.results_dir,
        force=args.force,
        use_wandb=not args.no_wandb,
        only=args.only,
        leaderboard_dir=args.leaderboard_dir,
        wait_for_lock=args.wait_for_lock,
        estimate=not args.no_estimate,
    )
    if summary.failed:  # everything else was written; say where the reasons are, and fail the command
        where = summary.leaderboard.parent / "results.csv" if summary.leaderboard else summary.results_dir
        sys.stderr.write(f"rcit-bench bench: {summary.failed} cell(s) failed; the reasons are in the 'reason' "
                         f"column of {where} and in the result files under {summary.results_dir}.\n")
        return 1
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Predicted wall time of a spec on this machine, by entry and phase, before anything trains."""
    from rcit_bench.bench.costs import format_plan, plan_sweep, unit_costs
    from rcit_bench.bench.runner import preflight
    from rcit_bench.bench.spec import load_spec

    spec = load_spec(args.spec)
    entries = [spec.entry(e) for e in args.only] if args.only else list(spec.entries)
    preflight(spec, entries)
    costs = unit_costs(spec, entries, args.results_dir, use_wandb=not args.no_wandb, measure=args.measure)
    plan = plan_sweep(spec, entries, costs)
    sys.stdout.write(f"estimate for spec {spec.name!r} ({len(entries)} entries x {len(spec.seeds)} seeds, "
                     f"{sum(p.cells for p in plan.entries)} cells), from scratch:\n{format_plan(spec, plan)}\n")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from rcit_bench.bench.leaderboard import build_leaderboard

    out = build_leaderboard(args.spec, results_dir=args.results_dir, out_dir=args.out_dir,
                            include_stale=args.include_stale)
    logging.info("leaderboard written to %s", out)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rcit_bench.bench.spec import load_spec
    from rcit_bench.bench.status import format_status, sweep_status

    spec = load_spec(args.spec, check_devices=False)  # read, not trained: a login node without a GPU may ask
    sys.stdout.write(format_status(sweep_status(spec, args.results_dir), spec.name, args.results_dir))
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from rcit_bench.data.synthetic import ensure_synthetic

    root = ensure_synthetic(
        args.root, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, image_size=args.image_size, seed=args.seed
    )
    logging.info("synthetic dataset ready at %s", root)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from rcit_bench.data.corruptions import list_corruptions
    from rcit_bench.data.text_perturbations import list_perturbations
    from rcit_bench.models.registry import list_image_encoders, list_methods, list_text_encoders

    for title, names in [
        ("methods", list_methods()),
        ("image encoders", list_image_encoders()),
        ("text encoders", list_text_encoders()),
        ("corruptions", list_corruptions()),
        ("text perturbations", list_perturbations()),
    ]:
        sys.stdout.write(f"{title}: {', '.join(names)}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcit-bench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="train the spec's entries and evaluate its grid; writes results and leaderboard")
    p.add_argument("spec", help="benchmark spec YAML, e.g. benchmarks/quick.yaml, or a shipped spec's name. A "
                                "relative `dataset.options.root` (or `json_path`) in it resolves against the current "
                                "directory, not the spec's folder")
    p.add_argument("--results-dir", default="runs", help="where result files, checkpoints and W&B runs go")
    p.add_argument("--leaderboard-dir", default=None, help="default: leaderboards/<spec name>")
    p.add_argument("--force", action="store_true", help="redo finished cells and retrain")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases at all")
    p.add_argument("--wait-for-lock", action="store_true",
                   help="when another run writes an entry this one needs, wait for it (default: stop, naming it)")
    p.add_argument("--only", action="append", default=None, help="run only this entry id (repeatable)")
    p.add_argument("--no-estimate", action="store_true",
                   help="do not read or measure unit costs before training: no plan, and an ETA from this run's own "
                        "means only")
    g = p.add_argument_group("cluster (--launcher submitit: one SLURM job per entry, a job array)")
    g.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="local (default): run here; submitit: submit through submitit")
    g.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                   help="submitit executor (default: slurm when sbatch exists, else local subprocesses)")
    g.add_argument("--partition", default=None, help="SLURM partition")
    g.add_argument("--gpus-per-job", type=int, default=None,
                   help="GPUs per entry job (default: the entry's trainer.devices on SLURM, one per rank; 0: a CPU "
                        "job); it must agree with trainer.devices")
    g.add_argument("--cpus-per-job", type=int, default=None)
    g.add_argument("--mem-gb", type=int, default=None)
    g.add_argument("--timeout-min", type=int, default=24 * 60, help="wall time per job (minutes)")
    g.add_argument("--no-requeue", action="store_true", help="do not requeue preempted / timed-out jobs")
    g.add_argument("--array-parallelism", type=int, default=None, help="max jobs running at once")
    g.add_argument("--executor-folder", default=None, help="submitit logs (default: RESULTS_DIR/submitit/%%j)")
    g.add_argument("--wait", action="store_true", help="wait for all jobs, then build the leaderboard")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("estimate", help="predict a spec's wall time on this machine, by entry and phase, before "
                                        "anything trains")
    p.add_argument("spec")
    p.add_argument("--results-dir", default="runs", help="where the unit-cost cache of the last run is "
                                                         "(RESULTS_DIR/<spec>/unit_costs.json)")
    p.add_argument("--measure", action="store_true", help="measure the unit costs now even when a cache matches")
    p.add_argument("--only", action="append", default=None, help="only this entry id (repeatable)")
    p.add_argument("--no-wandb", action="store_true", help="the run will not log to W&B (its cost is left out)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("leaderboard", help="rebuild a spec's leaderboard from its result files (no training)")
    p.add_argument("spec")
    p.add_argument("--results-dir", default="runs")
    p.add_argument("--out-dir", default=None, help="default: leaderboards/<spec name>")
    p.add_argument("--include-stale", action="store_true",
                   help="also show results of another configuration of an entry (marked; left out by default)")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("status", help="where a sweep stands: per entry and seed, trained or not, cells done / "
                                      "pending / failed (reads only files; safe while it runs)")
    p.add_argument("spec")
    p.add_argument("--results-dir", default="runs")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("corrupt", help="write a labelled grid of every corruption x severity applied to one image")
    p.add_argument("image", help=f"image file, or one of {', '.join(SAMPLE_IMAGES)} (photos shipped by scikit-image)")
    p.add_argument("--out", default="corruptions.png",
                   help="the mosaic; its suffix sets the format: .png (optimised PNG) or .jpg / .jpeg (JPEG, quality "
                        "90, several times smaller)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="show only these corruptions (repeatable, or comma separated; `rcit-bench list` names them). "
                        "Default: every severity-mode corruption, plus the noise-rate ones when --rates is given")
    p.add_argument("--severities", metavar="LIST",
                   help="severities of the severity-mode rows, comma separated, each 1..5 (default 1,2,3,4,5)")
    p.add_argument("--rates", metavar="LIST",
                   help="noise rates (fractions of pixels, each in (0, 1]) of the noise-rate rows (speckle, "
                        "salt_pepper), comma separated; adds those rows unless --only picks the rows (default 0.6 "
                        "for a noise-rate row --only picks)")
    p.add_argument("--size", type=int, default=224,
                   help="resize first so that the SHORT side is SIZE px, keeping the aspect ratio (default 224, the "
                        "size the corruptions' constants are published for; 0 keeps the image's size). Refused "
                        "before anything runs: a result over 4096 px on the long side or 4 Mpx (4,194,304 px), or "
                        "an image more elongated than 9.1:1")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions' random numbers (>= 0)")
    p.set_defaults(func=cmd_corrupt)

    p = sub.add_parser("synthetic", help="generate (or reuse) the embedded synthetic dataset")
    p.add_argument("--root", default="data/synthetic")
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synthetic)

    p = sub.add_parser("list", help="list registered methods, encoders, corruptions and text perturbations")
    p.set_defaults(func=cmd_methods)
    return parser


#: What the command line reports in one line: the user's mistakes (spec, arguments, data files), missing files,
#: a full disk, an unreadable checkpoint. Every other exception shows its traceback.
# RankFailed: a rank of a multi-process job died; its own traceback is printed above, the command says what to do
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError, CheckpointError, RankFailed)


def quiet_console(verbose: bool) -> None:
    """Each fact once: third-party deprecation warnings, Lightning's start-up notes ('GPU available', tips) and
    W&B's banners are hidden unless -v. Only the command line does this: as a library, rcit-bench leaves warnings
    and logging to its user."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    for name in ("lightning.pytorch", "lightning.fabric"):  # they print through their own handler already
        logging.getLogger(name).propagate = False
        if not verbose:
            logging.getLogger(name).setLevel(logging.WARNING)
    if verbose:
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!rcit_bench)")
    # Lightning's advice that suits other setups than this suite's (it picks its own loaders and logging)
    # (the validation metrics are computed on the gathered shards, identical on every rank: no sync_dist needed)
    for text in (r".*does not have many workers", r".*`log_every_n_steps`", r".*LeafSpec",
                 r".*when logging on epoch level in distributed setting"):
        warnings.filterwarnings("ignore", message=text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # batched CPU work page-faults its buffers in again on every call otherwise
    quiet_console(args.verbose)
    try:
        return args.func(args)
    except USER_ERRORS as err:  # the user's mistake; its message says what to do (the traceback with -v)
        if args.verbose:
            traceback.print_exc()
        sys.stderr.write(f"rcit-bench {args.command}: error: {err}\n")
        return 2
    # anything else is a bug in rcit-bench or below it: Python prints the whole traceback


if __name__ == "__main__":
    sys.exit(main())
