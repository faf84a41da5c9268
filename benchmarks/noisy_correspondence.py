"""Noisy correspondence: VSE++ trained plainly vs with small-loss selection, at one mismatch rate.

Why: with a fraction ``--rate`` of the training captions paired with the wrong image, the small-loss baseline
(rcit_bench.models.small_loss: per-pair triplet losses, a two-component Gaussian mixture fitted on them every epoch,
pairs of the high-loss component down-weighted) should find the mismatched pairs and train a better model. This
measures both on the synthetic set: after every epoch, how well the selection flags the mismatched pairs
(precision and recall of ``p_clean < --threshold`` among the training captions, from the data module's mismatch
mask, which the model never sees; the mean weight the next epoch gives to mismatched and to true pairs), and the
clean-test RSUM of both models (the test split is never noisy). Both runs share the seed, data and budget.

The per-epoch RSUM is a measurement only: no checkpoint is selected on it (the last epoch's model is the result).

    python benchmarks/noisy_correspondence.py [--rate 0.5] [--epochs 10] [--n-train 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace
from typing import Any

from rcit_bench.utils import keep_freed_memory, machine_header

MODEL = {
    # a 32 px CNN whose 4x4 grid is kept whole, a Bi-GRU: the CPU configs' shape, smaller (embed 64)
    "image_encoder": {"name": "small_cnn", "input_size": 32, "channels": [16, 32, 64], "stem_stride": 2,
                      "global_pool": "flatten"},
    "text_encoder": {"name": "bigru", "word_dim": 32},
    "embed_dim": 64,
    "lr_decay_epochs": None,
    # the sum over negatives throughout: with half the positives wrong, the hardest negative alone does not train
    # from scratch here (both runs collapse to chance RSUM)
    "warmup_epochs": 10_000,
}


def train_one(args: argparse.Namespace, small_loss: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Train one VSE++ model; one row per epoch: clean-test RSUM and (with small_loss) the selection's quality."""
    import lightning as L
    import torch

    from rcit_bench.data.datamodule import RetrievalDataModule
    from rcit_bench.evaluation import CellEvaluator
    from rcit_bench.models.registry import build_method
    from rcit_bench.models.small_loss import selection_quality

    L.seed_everything(args.seed, verbose=False)
    dm = RetrievalDataModule("synthetic", root=args.root, image_size=args.image_size, n_train=args.n_train,
                             n_val=16, n_test=args.n_test, batch_size=args.batch_size, eval_batch_size=500,
                             num_workers=0, seed=args.seed, mismatch_rate=args.rate, mismatch_seed=args.mismatch_seed)
    dm.prepare_data()
    dm.setup("fit")
    mismatched = dm.mismatched_captions()
    model = build_method("vsepp", **MODEL, lr=args.lr, vocab_size=dm.vocab_size, small_loss=small_loss)
    clean = SimpleNamespace(kind="image", corruption=None, severity=None, rate=None)
    rows: list[dict[str, Any]] = []

    def record(pl: Any, epoch: int) -> None:
        """After `epoch` and its fit: the model's clean-test RSUM and the weights the next epoch will use."""
        was_training = pl.training
        with torch.no_grad():
            rsum = CellEvaluator(pl, dm, seed=args.seed)(clean).metrics["rsum"]  # CellEvaluator: eval mode
        pl.train(was_training)
        row: dict[str, Any] = {"epoch": epoch + 1, "rsum": rsum, "wall_s": time.perf_counter() - t0}
        post = pl.small_loss_posterior()
        if post is not None:
            p, seen = post
            row.update(selection_quality(p, seen, mismatched, threshold=args.threshold))
            weights = p.clamp(min=pl.small_loss_selector.options["min_weight"])
            mis = mismatched[: len(p)] & seen
            row["w_mismatched"] = float(weights[mis].mean()) if bool(mis.any()) else float("nan")
            row["w_true"] = float(weights[~mismatched[: len(p)] & seen].mean())
        rows.append(row)

    class PerEpoch(L.Callback):
        # a callback's on_train_epoch_end runs before the module's (where the mixture is fitted): record epoch
        # e at the start of epoch e + 1, and the last epoch when training ends
        def on_train_epoch_start(self, trainer: Any, pl: Any) -> None:
            if trainer.current_epoch > 0:
                record(pl, trainer.current_epoch - 1)

        def on_train_end(self, trainer: Any, pl: Any) -> None:
            record(pl, trainer.current_epoch - 1)

    trainer = L.Trainer(accelerator=args.device, devices=1, max_epochs=args.epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[PerEpoch()],
                        default_root_dir=args.root)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return rows


def table(plain: list[dict[str, Any]], robust: list[dict[str, Any]]) -> list[str]:
    """Markdown table, one line per epoch."""
    head = ("| epoch | plain RSUM | small-loss RSUM | precision | recall | flagged | mismatched seen | "
            "mean weight, mismatched | mean weight, true |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for a, b in zip(plain, robust):
        lines.append(f"| {a['epoch']} | {a['rsum']:.1f} | {b['rsum']:.1f} | {b['precision']:.3f} | {b['recall']:.3f} | "
                     f"{b['flagged']} | {b['mismatched']} | {b['w_mismatched']:.3f} | {b['w_true']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=0.5, help="mismatch rate of the training captions, in [0, 1)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-train", type=int, default=1000, help="training images (5 captions each)")
    ap.add_argument("--n-test", type=int, default=500, help="test images (clean), 5 captions each")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=1, help="epochs of plain training before the first mixture fit")
    ap.add_argument("--min-weight", type=float, default=0.0, help="floor on a pair's weight")
    ap.add_argument("--threshold", type=float, default=0.5, help="p_clean below it flags a pair as mismatched")
    ap.add_argument("--seed", type=int, default=0, help="training seed (order, initialisation)")
    ap.add_argument("--mismatch-seed", type=int, default=0, help="which captions are mismatched")
    ap.add_argument("--root", default="data/synthetic-noisy-correspondence",
                    help="where the synthetic set is (generated on first use)")
    ap.add_argument("--device", default="cpu", help="Lightning accelerator: cpu | gpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write both runs' rows to this JSON file")
    args = ap.parse_args(argv)
    if not 0.0 <= args.rate < 1.0:
        ap.error(f"--rate must be in [0, 1), but got {args.rate}")
    if args.epochs < args.warmup + 1:
        ap.error(f"--epochs {args.epochs} leaves no epoch after the --warmup {args.warmup} for the selection to act")
    import lightning  # noqa: F401  (first: importing it resets its loggers' levels)
    import torch

    from rcit_bench.cli import quiet_console

    keep_freed_memory()  # as the rcit-bench command runs
    quiet_console(verbose=False)  # Lightning's start-up notes and third-party deprecations, as the command line
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_header(args.device))
    print(f"# VSE++ (32 px CNN, Bi-GRU, embed 64, sum over negatives), synthetic {args.n_train} training images x 5 "
          f"captions at mismatch rate {args.rate} (seed {args.mismatch_seed}), {args.epochs} epochs of batch "
          f"{args.batch_size}, lr {args.lr}, seed {args.seed}; clean test: {args.n_test} images x 5 captions")
    print(f"# small-loss: warm-up {args.warmup} epoch(s), min_weight {args.min_weight}; a pair is flagged when "
          f"p_clean < {args.threshold}. Precision/recall after epoch e: the fit on epoch e's losses, which weights "
          f"epoch e + 1")
    small = {"warmup_epochs": args.warmup, "min_weight": args.min_weight, "threshold": args.threshold}
    runs = {}
    for name, sl in (("plain", None), ("small_loss", small)):
        t = time.perf_counter()
        runs[name] = train_one(args, sl)
        print(f"# {name}: trained in {time.perf_counter() - t:.0f} s", flush=True)
    for line in table(runs["plain"], runs["small_loss"]):
        print(line)
    a, b = runs["plain"][-1], runs["small_loss"][-1]
    print(f"# final clean-test RSUM: plain {a['rsum']:.1f}, small-loss {b['rsum']:.1f} ({b['rsum'] - a['rsum']:+.1f}); "
          f"mismatched pairs found: precision {b['precision']:.3f}, recall {b['recall']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": machine_header(args.device), "args": vars(args), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
