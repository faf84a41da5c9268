"""Cost model of a whole benchmark grid: predicted wall time of a spec on this machine from measured unit costs,
which part dominates, how it grows, the measured saving of text-representation reuse, and (for the paper specs)
a FLOP-based GPU-hour ESTIMATE.

Why: ``make bench`` runs for hours on CPU and the paper specs need a GPU budget; a sweep's cost is a sum of a few
unit costs (a training step, corrupting / encoding the test images, scoring N x 5N pairs, encoding 5N captions)
times counts the spec fixes (entries, seeds, cells, epochs), so measuring the units once predicts any grid.

What the runner does, and so what the model counts (see rcit_bench/bench/runner.py):
- per (entry, seed): training (steps = epochs x batches per epoch) plus Lightning's validation after every epoch
  (encode n_val images and 5 n_val captions, score n_val x 5 n_val);
- per (seed, image cell): the corrupted test images are built once and shared by every entry (cell-major
  evaluation), so corruption is counted once per cell, not per entry;
- per (entry, seed, image cell): encode N images + score N x 5N;
- per (entry, seed): the 5N captions are encoded once and reused by every image cell (``CellEvaluator``), plus
  once per text-perturbation cell (whose clean image reps are reused);
- matchmap's pointing-game cells are measured separately (one clean cell).

Unit costs are measured with the runner's builders on the spec's dataset with an untrained model (cost does not
depend on the weights). Training steps come from benchmarks/train_throughput.py. All cross-attention scoring times
are measured on ``--score-images`` images x all 5N captions and scaled linearly in pairs (the chunked scorer's
blocks do not depend on N, so time is linear in pairs); the table says so.

    python benchmarks/grid_cost.py [--spec benchmarks/quick.yaml] [--reuse-k 3] [--paper-specs ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rcit_bench.utils import keep_freed_memory, machine_header  # noqa: E402
from train_throughput import run_worker  # noqa: E402

# Karpathy-split sizes of the paper datasets (images; 5 captions per image), used only for the GPU estimate.
PAPER_SPLITS = {"flickr30k": {"train": 29000, "val": 1014, "test": 1000},
                "coco": {"train": 113287, "val": 5000, "test": 5000}}
CAPTIONS_PER_IMAGE = 5


def _fmt(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _entry_setup(spec: Any, entry: Any, seed: int = 0, **data_over: Any) -> tuple[dict, dict, dict]:
    """(method config, datamodule kwargs, trainer kwargs) exactly as the runner derives them."""
    from rcit_bench.bench import runner

    cfg = runner.method_config(spec, entry)
    dkw = runner.datamodule_kwargs(spec, entry, seed, cfg)
    dkw.update(data_over)
    return cfg, dkw, runner.trainer_kwargs(spec, entry, cfg)


def training_plan(spec: Any, entry: Any, n_train: int | None = None) -> tuple[int, int, int]:
    """(epochs, steps per epoch, batch) of an entry from its merged trainer and data settings."""
    _, dkw, tkw = _entry_setup(spec, entry)
    n_train = n_train if n_train is not None else int(dkw.get("n_train", 10000))
    batch = int(dkw.get("batch_size", 128))
    full = math.ceil(n_train * CAPTIONS_PER_IMAGE / batch)
    lim = tkw.get("limit_train_batches")
    per_epoch = full if lim is None else (min(full, int(lim)) if isinstance(lim, int) or float(lim) > 1 else
                                         max(1, int(full * float(lim))))
    epochs = int(tkw.get("max_epochs", 1))
    return epochs, per_epoch, batch


def cell_counts(spec: Any, entry: Any) -> dict[str, int]:
    """Cells of an entry by what they cost: image cells, text cells, pointing-game cells."""
    counts = {"image": 0, "text": 0, "pointing_game": 0}
    for c in spec.cells(entry):
        counts["text" if c.kind == "text" else "pointing_game" if c.kind == "pointing_game" else "image"] += 1
    return counts


# ------------------------------------------------------------------------------------------------ workers
def unit_worker(spec_path: str, method: str, score_images: int, reuse_k: int, pg: bool) -> dict[str, Any]:
    """Unit costs of one method on the spec's test split (untrained weights; cost does not depend on them)."""
    import torch

    from rcit_bench.bench import runner
    from rcit_bench.bench.spec import load_spec
    from rcit_bench.evaluation import encode_images, encode_texts, similarity_matrix

    spec = load_spec(spec_path)
    entry = next(e for e in spec.entries if e.method == method)
    cfg, dkw, _ = _entry_setup(spec, entry)
    dm = runner.make_datamodule(dkw)
    runner._seed(0)
    model = runner.build_model(entry, cfg, dm)
    model.eval()
    out: dict[str, Any] = {"method": method}
    images = list(dm.image_loader("test"))  # clean, materialised: encoding timed alone
    n_img = sum(len(b["image_index"]) for b in images)
    t = time.perf_counter()
    img = encode_images(model, images)
    out["enc_img_s"] = time.perf_counter() - t
    t = time.perf_counter()
    txt = encode_texts(model, dm.caption_loader("test"))
    out["enc_txt_s"] = time.perf_counter() - t
    n_cap = len(txt["caption_index"])
    out.update(n_img=n_img, n_cap=n_cap)
    cross = any(v.ndim == 3 for k, v in img.items() if k != "image_index")
    k = n_img if not cross else min(n_img, score_images)
    sub = {key: v[:k] for key, v in img.items()}
    t = time.perf_counter()
    similarity_matrix(model, sub, txt)
    dt = time.perf_counter() - t
    out.update(score_s=dt * n_img / k, score_measured=[k, n_cap], score_measured_s=dt, cross_attention=cross)
    text_cells = [c for c in spec.cells(entry) if c.kind == "text"]
    if text_cells:
        c = text_cells[0]
        t = time.perf_counter()
        encode_texts(model, dm.caption_loader("test", perturbation=c.perturbation, level=c.level))
        out["enc_txt_perturbed_s"] = time.perf_counter() - t
        out["text_cell_measured"] = c.id
    if pg and any(c.kind == "pointing_game" for c in spec.cells(entry)):
        from rcit_bench.localization import pointing_game

        t = time.perf_counter()
        pointing_game(model, dm, split="test", seed=0)
        out["pg_s"] = time.perf_counter() - t
    if reuse_k:
        out["reuse"] = reuse_experiment(spec, entry, model, dm, reuse_k)
    out["threads"] = torch.get_num_threads()
    return out


def reuse_experiment(spec: Any, entry: Any, model: Any, dm: Any, k: int) -> dict[str, Any]:
    """Evaluate the first `k` image-corruption cells twice: through one runner CellEvaluator (caption reps encoded
    once and reused, as the runner does) and through a fresh CellEvaluator per cell (caption reps recomputed for
    every cell). The corrupted images are built beforehand and given to both, so only the text work differs."""
    from rcit_bench import evaluation
    from rcit_bench.evaluation import CellEvaluator

    calls = {"n": 0}
    encode_texts = evaluation.encode_texts

    def counting(*args: Any, **kw: Any) -> Any:  # counts caption encodings of the whole test split
        calls["n"] += 1
        return encode_texts(*args, **kw)

    evaluation.encode_texts = counting
    cells = [c for c in spec.cells(entry) if c.kind in ("imagenet_c", "rcit")][:k]
    images = {c.id: list(dm.image_loader("test", corruption=c.corruption, severity=c.severity, rate=c.rate))
              for c in cells}
    try:
        t = time.perf_counter()
        shared = CellEvaluator(model, dm, 0)
        reused = [shared(c, images=images[c.id]) for c in cells]
        t_reuse, reuse_calls = time.perf_counter() - t, calls["n"]
        t = time.perf_counter()
        fresh = [CellEvaluator(model, dm, 0)(c, images=images[c.id]) for c in cells]
        t_fresh, fresh_calls = time.perf_counter() - t, calls["n"] - reuse_calls
    finally:
        evaluation.encode_texts = encode_texts
    same = all(a.metrics == b.metrics for a, b in zip(reused, fresh))
    return {"k": len(cells), "cells": [c.id for c in cells], "reuse_s": t_reuse, "recompute_s": t_fresh,
            "text_encodings_reuse": reuse_calls, "text_encodings_recompute": fresh_calls,
            "same_metrics": same}


def corrupt_worker(spec_path: str, n_images: int) -> dict[str, Any]:
    """Seconds to build each distinct corruption of the spec's grid on `n_images` test images (one severity /
    rate per corruption: the middle listed severity, the main rate) and the clean test images."""
    from rcit_bench.bench import runner
    from rcit_bench.bench.spec import load_spec

    spec = load_spec(spec_path)
    entry = spec.entries[0]
    _, dkw, _ = _entry_setup(spec, entry, limit_test=n_images)
    dm = runner.make_datamodule(dkw)
    list(dm.image_loader("test"))  # warm-up (decoding cache, thread pools)
    t = time.perf_counter()
    n = sum(len(b["image_index"]) for b in dm.image_loader("test"))
    out: dict[str, Any] = {"n_images": n, "clean_s": time.perf_counter() - t, "per_corruption": {}}
    ev = spec.evaluation
    todo: list[tuple[str, dict[str, Any]]] = []
    ic = ev.get("imagenet_c")
    if ic:
        sev = sorted(ic["severities"])[len(ic["severities"]) // 2]
        todo += [(f"{c} s{sev}", {"corruption": c, "severity": sev}) for c in ic["corruptions"]]
    rc = ev.get("rcit_protocol")
    if rc:
        rate = rc["main_pixel_noise_rate"]
        todo += [(f"{c} r{rate:g}", {"corruption": c, "rate": float(rate)}) for c in rc["corruptions"]]
    for name, kw in todo:
        t = time.perf_counter()
        list(dm.image_loader("test", **kw))
        out["per_corruption"][name] = time.perf_counter() - t
    return out


def flops_worker(config: str, method: str, vocab_size: int, caption_len: int) -> dict[str, Any]:
    """FLOPs (torch.utils.flop_counter: matmuls and convolutions) of the paper config of `method`.

    Running a ResNet-152 step on 2 CPU cores takes minutes, so the image backbone is counted on the meta device
    (shapes only, forward and backward; FLOPs do not depend on values) and the rest of the training step
    (text encoder, heads, reasoning, similarity, losses, forward and backward) for real with the backbone's
    outputs replaced by random tensors of the same shapes, at batch 2, 4, 6, fitted exactly by a + b B + c B^2
    (encoders are linear in B, in-batch pair scoring quadratic). Also: one image / caption encoding, one pair."""
    import copy
    import types

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rcit_bench.bench import runner
    from rcit_bench.bench.spec import validate_spec

    entry_d: dict[str, Any] = {"id": method, "method": method, "config": config,
                               "overrides": {"model": {"image_encoder": {"pretrained": False}}}}
    if method == "rcit":
        entry_d.update(regime="paired", corruption_mix=[{"name": "speckle", "rate": 0.6}])
    spec = validate_spec({"name": "flops", "dataset": {"kind": "synthetic"}, "entries": [entry_d],
                          "evaluation": {"clean": True}})
    entry = spec.entries[0]
    cfg = runner.method_config(spec, entry)
    size = int((cfg.get("data") or {}).get("image_size", 256))
    torch.manual_seed(0)
    model = runner.build_model(entry, cfg, types.SimpleNamespace(vocab_size=vocab_size))

    def count(fn: Any) -> int:
        with FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())

    # 1. the image encoder on the meta device: FLOPs per image, forward only and forward + backward
    meta = copy.deepcopy(model.image_encoder).to("meta")
    x = torch.empty(2, 3, size, size, device="meta")
    with torch.no_grad():
        enc_fwd = count(lambda: meta(x)) / 2
        shapes = {k: tuple(v.shape[1:]) for k, v in meta(x).items()}

    def fwd_bwd() -> None:
        out = meta(x)
        sum(v.sum() for v in out.values()).backward()

    enc_train = count(fwd_bwd) / 2
    # 2. the rest of the step for real, the backbone replaced by same-shaped random outputs
    model.image_encoder.forward = lambda images: {  # type: ignore[method-assign]
        k: torch.randn(images.shape[0], *shp, requires_grad=torch.is_grad_enabled()) for k, shp in shapes.items()}
    small = 8  # the replaced encoder ignores pixel values; small images keep the (unused) inputs cheap

    def batch(b: int) -> dict[str, Any]:
        return {"images": torch.rand(b, 3, small, small), "corrupted_images": torch.rand(b, 3, small, small),
                "tokens": torch.randint(4, vocab_size, (b, caption_len)),
                "lengths": torch.full((b,), caption_len, dtype=torch.long),
                "image_index": torch.arange(b), "caption_index": torch.arange(b)}

    model.train()
    pts = []
    for b in (2, 4, 6):
        data = batch(b)

        def step() -> None:
            loss, _ = model.compute_loss(data)
            loss.backward()

        pts.append((b, count(step)))
        model.zero_grad(set_to_none=True)
    (b1, f1), (b2, f2), (b3, f3) = pts
    c = ((f3 - f2) / (b3 - b2) - (f2 - f1) / (b2 - b1)) / (b3 - b1)
    bb = (f2 - f1) / (b2 - b1) - c * (b1 + b2)
    a = f1 - bb * b1 - c * b1 * b1
    images_per_pair = 2 if method == "rcit" else 1  # RCIT encodes the clean and the corrupted copy
    bb += images_per_pair * enc_train
    model.eval()
    with torch.inference_mode():
        data = batch(32)  # >= 32 rows: stable_matmul pads smaller operands, which would inflate the count
        img_rest = count(lambda: model.encode_image(data["images"])) / 32
        txt_f = count(lambda: model.encode_text(data["tokens"], data["lengths"])) / 32
        img = model.encode_image(data["images"])
        tb = batch(64)
        txt = model.encode_text(tb["tokens"], tb["lengths"])
        pair_f = count(lambda: model.similarity(img, txt)) / (32 * 64)
    return {"method": method, "config": config, "train_fit": [a, bb, c], "rest_points": pts,
            "img_flops": enc_fwd + img_rest, "img_train_flops": enc_train, "txt_flops": txt_f, "pair_flops": pair_f,
            "image_size": size}


def spawn(*worker_args: str) -> dict[str, Any]:
    """Run a worker in a fresh interpreter (own memory, nothing cached from another method)."""
    return run_worker([sys.executable, os.path.abspath(__file__), "--worker", *worker_args])


# ------------------------------------------------------------------------------------------------ the model
def predict(spec: Any, units: dict[str, dict], steps: dict[str, float], corrupt: dict[str, Any]) -> dict[str, Any]:
    """Predicted seconds of the spec by part, from the measured unit costs (see the module docstring)."""
    per_entry = []
    n_test = next(iter(units.values()))["n_img"]
    corr_times = list(corrupt["per_corruption"].values())
    corr_mean = (sum(corr_times) / len(corr_times)) * n_test / corrupt["n_images"] if corr_times else 0.0
    clean_load = corrupt["clean_s"] * n_test / corrupt["n_images"]
    for e in spec.entries:
        u = units[e.method]
        _, dkw, _ = _entry_setup(spec, e)
        epochs, per_epoch, batch = training_plan(spec, e)
        n_val = int(dkw.get("n_val", 0))
        r = n_val / u["n_img"]
        val = epochs * (r * u["enc_img_s"] + r * u["enc_txt_s"] + r * r * u["score_s"])
        cc = cell_counts(spec, e)
        txt_cell = u.get("enc_txt_perturbed_s", u["enc_txt_s"])
        ev_img = cc["image"] * (u["enc_img_s"] + u["score_s"])
        ev_txt = u["enc_txt_s"] + cc["text"] * (txt_cell + u["score_s"])
        ev_pg = cc["pointing_game"] * u.get("pg_s", 0.0)
        per_entry.append({
            "entry": e.id, "method": e.method, "epochs": epochs, "steps": epochs * per_epoch, "batch": batch,
            "train_s": epochs * per_epoch * steps[e.method], "val_s": val, "eval_img_s": ev_img,
            "eval_txt_s": ev_txt, "eval_pg_s": ev_pg, "cells": sum(cc.values()), "counts": cc})
    # corrupted test images: built once per (seed, image cell) and shared by the entries (cell-major)
    image_cells = {c.id for e in spec.entries for c in spec.cells(e) if c.kind in ("imagenet_c", "rcit")}
    corruption_s = len(image_cells) * corr_mean + clean_load
    seeds = len(spec.seeds)
    parts = {
        "training (steps)": seeds * sum(p["train_s"] for p in per_entry),
        "validation each epoch": seeds * sum(p["val_s"] for p in per_entry),
        "corrupting test images (once per cell, shared)": seeds * corruption_s,
        "image encoding + scoring (per entry x image cell)": seeds * sum(p["eval_img_s"] for p in per_entry),
        "caption encoding + text cells": seeds * sum(p["eval_txt_s"] for p in per_entry),
        "pointing game": seeds * sum(p["eval_pg_s"] for p in per_entry),
    }
    return {"per_entry": per_entry, "parts": parts, "total_s": sum(parts.values()), "seeds": seeds,
            "image_cells": len(image_cells), "corrupt_mean_s": corr_mean, "n_test": n_test}


def print_prediction(spec: Any, pred: dict[str, Any], units: dict[str, dict], steps: dict[str, float]) -> None:
    n = pred["n_test"]
    print(f"\n## Predicted wall time of `{spec.name}` ({spec.path}) on this machine\n")
    print(f"{len(spec.entries)} entries x {pred['seeds']} seed(s); {pred['image_cells']} image-corruption cells "
          f"(+ clean) per entry; N = {n} test images, {CAPTIONS_PER_IMAGE}N = {CAPTIONS_PER_IMAGE * n} captions.\n")
    print("| entry | method | epochs x steps | s/step (measured) | training | validation | eval: image cells | "
          "eval: captions + text cells | pointing game | cells |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in pred["per_entry"]:
        print(f"| {p['entry']} | {p['method']} | {p['epochs']} x {p['steps'] // max(1, p['epochs'])} | "
              f"{steps[p['method']]:.2f} | {_fmt(p['train_s'])} | {_fmt(p['val_s'])} | {_fmt(p['eval_img_s'])} | "
              f"{_fmt(p['eval_txt_s'])} | {_fmt(p['eval_pg_s'])} | {p['cells']} |")
    print("\n| part | predicted | share |")
    print("|---|---|---|")
    tot = pred["total_s"]
    for k, v in sorted(pred["parts"].items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {_fmt(v)} | {100 * v / tot:.0f}% |")
    print(f"| **total** | **{_fmt(tot)}** ({tot / 3600:.2f} h) | 100% |")
    dom = max(pred["parts"], key=pred["parts"].get)
    by_method: dict[str, float] = {}
    for p in pred["per_entry"]:
        by_method[p["method"]] = by_method.get(p["method"], 0.0) + p["eval_img_s"] + p["eval_txt_s"] + p["eval_pg_s"]
    print(f"\nDominant part: **{dom}** ({100 * pred['parts'][dom] / tot:.0f}%). Evaluation by method (per seed): "
          + ", ".join(f"{m} {_fmt(v)}" for m, v in sorted(by_method.items(), key=lambda kv: -kv[1])) + ".")


def print_formula() -> None:
    print("""
## How it grows

    T = S * [ sum_e (E_e * B_e * t_step,m(e) + E_e * t_val,m(e))                          training + validation
            + C_img * t_corrupt(N)                                                      shared per cell
            + sum_e ( C_img * (t_img,m(N) + t_score,m(N, 5N))                             per entry x cell
                    + (1 + C_txt) * t_txt,m(5N) + C_txt * t_score,m(N, 5N) + C_pg * t_pg ) ]

    S seeds; e entries (method m); E epochs, B steps per epoch; C_img image-corruption cells (+1 clean),
    C_txt text-perturbation cells, C_pg pointing-game cells (matchmap only); N test images, 5N captions.
    t_corrupt, t_img ~ N (corruption and image encoding are linear in images); t_txt ~ captions;
    t_score ~ N x captions x D for the dual encoders (one GEMM, negligible here) but ~ N x captions x R x L x D for
    the cross-attention methods (matchmap MISA, VSR++ SCAN): quadratic in N at 5 captions per image, so 5K x 25K
    costs ~25x 1K x 5K. Everything is linear in S; evaluation is linear in C_img; training does not depend on
    the grid. t_val ~ n_val x 5 n_val pairs for cross attention.""")


def print_units(units: dict[str, dict], steps: dict[str, float], corrupt: dict[str, Any]) -> None:
    print("\n## Unit costs measured on this machine (untrained weights, the spec's configs)\n")
    print("| method | s / training step | encode N test images (s) | encode 5N captions (s) | "
          "score N x 5N (s) | scoring measured on | pointing-game cell (s) |")
    print("|---|---|---|---|---|---|---|")
    for m, u in units.items():
        k, c = u["score_measured"]
        how = f"{k} x {c}" + ("" if k == u["n_img"] else f", scaled x{u['n_img'] / k:g} (linear in pairs)")
        pg = f"{u['pg_s']:.1f}" if "pg_s" in u else "-"
        print(f"| {m} | {steps[m]:.3f} | {u['enc_img_s']:.2f} | {u['enc_txt_s']:.2f} | {u['score_s']:.2f} | "
              f"{how} | {pg} |")
    n = corrupt["n_images"]
    times = corrupt["per_corruption"]
    if times:
        worst = sorted(times.items(), key=lambda kv: -kv[1])[:3]
        print(f"\nCorrupting the test images ({n} images; one severity/rate per corruption, as a stand-in for "
              f"all its severities): mean {sum(times.values()) / len(times):.2f} s per cell, clean load "
              f"{corrupt['clean_s']:.2f} s; slowest: " + ", ".join(f"{k} {v:.2f} s" for k, v in worst) + ".")


def print_reuse(units: dict[str, dict]) -> None:
    rows = [(m, u["reuse"]) for m, u in units.items() if "reuse" in u]
    if not rows:
        return
    print("\n## Text-representation reuse: measured\n")
    print("K image-corruption cells evaluated through one runner `CellEvaluator` (captions encoded once) versus a "
          "fresh evaluator per cell (captions re-encoded every cell); corrupted images built beforehand for both.\n")
    print("| method | K cells | captions encoded once (s) | re-encoded per cell (s) | saved (s) | saved | "
          "text encodings | identical metrics |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r in rows:
        saved = r["recompute_s"] - r["reuse_s"]
        print(f"| {m} | {r['k']} | {r['reuse_s']:.2f} | {r['recompute_s']:.2f} | {saved:.2f} | "
              f"{100 * saved / r['recompute_s']:.0f}% | {r['text_encodings_reuse']} vs "
              f"{r['text_encodings_recompute']} | {r['same_metrics']} |")


# ------------------------------------------------------------------------------------------------ GPU estimate
def gpu_estimate(spec_paths: list[str], flops: dict[str, dict], peak_tflops: float, util: float) -> None:
    from rcit_bench.bench.spec import load_spec

    rate = peak_tflops * 1e12 * util
    print("\n## ESTIMATE (not a measurement): GPU-hours of the paper specs\n")
    print(f"From FLOP counts (torch.utils.flop_counter, matmuls + convolutions, counted on CPU) of one training step "
          f"and one evaluation cell of each paper config, at an ASSUMED sustained {rate / 1e12:.0f} TFLOP/s "
          f"({100 * util:.0f}% of {peak_tflops:g} TFLOP/s bf16 peak; A100 = 312). Data loading, corruption on the "
          f"CPU, elementwise ops and the optimizer are not counted, so real runs take longer unless the data "
          f"pipeline keeps up. Karpathy splits: " + ", ".join(f"{k} {v['train']}/{v['val']}/{v['test']}"
                                                               for k, v in PAPER_SPLITS.items()) + " images.\n")
    print("| spec | entries x seeds | cells per entry | training PFLOP | validation PFLOP | eval PFLOP | "
          "GPU-hours (estimate) | per entry-seed job (estimate) |")
    print("|---|---|---|---|---|---|---|---|")
    for sp in spec_paths:
        spec = load_spec(sp)
        split = PAPER_SPLITS[spec.dataset_kind]
        n, nv = split["test"], split["val"]
        tr = va = ev = 0.0
        cells_per = set()
        for e in spec.entries:
            f = flops[e.method]
            a, b, c = f["train_fit"]
            epochs, per_epoch, batch = training_plan(spec, e, n_train=split["train"])
            tr += epochs * per_epoch * (a + b * batch + c * batch * batch)
            va += epochs * (nv * f["img_flops"] + 5 * nv * f["txt_flops"] + nv * 5 * nv * f["pair_flops"])
            cc = cell_counts(spec, e)
            cells_per.add(sum(cc.values()))
            img_cell = n * f["img_flops"] + n * 5 * n * f["pair_flops"]
            txt_cell = 5 * n * f["txt_flops"] + n * 5 * n * f["pair_flops"]
            ev += (cc["image"] + cc["pointing_game"]) * img_cell + 5 * n * f["txt_flops"] + cc["text"] * txt_cell
        seeds = len(spec.seeds)
        tot = seeds * (tr + va + ev)
        hours = tot / rate / 3600
        jobs = len(spec.entries) * seeds
        print(f"| {spec.name} | {len(spec.entries)} x {seeds} | {'/'.join(str(x) for x in sorted(cells_per))} | "
              f"{seeds * tr / 1e15:,.0f} | {seeds * va / 1e15:,.0f} | {seeds * ev / 1e15:,.0f} | "
              f"**~{hours:,.0f}** | ~{hours / jobs:,.1f} h |")
    print("\n| method (paper config) | GFLOP / training step at batch 128 | GFLOP / image encoded | "
          "MFLOP / caption encoded | kFLOP / scored pair |")
    print("|---|---|---|---|---|")
    for m, f in flops.items():
        a, b, c = f["train_fit"]
        print(f"| {m} ({f['config']}, {f['image_size']} px) | {(a + 128 * b + 128 * 128 * c) / 1e9:,.0f} | "
              f"{f['img_flops'] / 1e9:.1f} | {f['txt_flops'] / 1e6:.1f} | {f['pair_flops'] / 1e3:.1f} |")


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    keep_freed_memory()  # as the rcit-bench command runs (see its docstring)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="benchmarks/quick.yaml", help="spec to predict on this machine")
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps per method")
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--score-images", type=int, default=200,
                    help="cross-attention scoring is measured on this many images x all captions, scaled in pairs")
    ap.add_argument("--corrupt-images", type=int, default=1000, help="test images corrupted per timed corruption")
    ap.add_argument("--reuse-k", type=int, default=3, help="cells in the text-reuse experiment (0: skip)")
    ap.add_argument("--reuse-methods", default="vsepp", help="methods the text-reuse experiment runs on")
    ap.add_argument("--no-pointing-game", action="store_true", help="do not time a pointing-game cell")
    ap.add_argument("--paper-specs", default="benchmarks/flickr30k.yaml,benchmarks/coco.yaml",
                    help="specs for the GPU-hour estimate ('' to skip)")
    ap.add_argument("--peak-tflops", type=float, default=312.0, help="assumed bf16 peak (A100: 312)")
    ap.add_argument("--utilization", type=float, default=0.4, help="assumed share of the peak sustained")
    ap.add_argument("--vocab-size", type=int, default=10000, help="assumed vocabulary (caption decoder FLOPs)")
    ap.add_argument("--caption-len", type=int, default=14, help="assumed caption length in tokens")
    ap.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    ap.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "unit":
            res = unit_worker(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4] == "1")
        elif kind == "corrupt":
            res = corrupt_worker(rest[0], int(rest[1]))
        else:
            res = flops_worker(rest[0], rest[1], int(rest[2]), int(rest[3]))
        print(json.dumps(res))
        return

    from rcit_bench.bench.spec import load_spec

    import train_throughput as tt

    print(machine_header("cpu"))
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other jobs share this machine; figures include their interference)")
    spec = load_spec(args.spec)
    methods = list(dict.fromkeys(e.method for e in spec.entries))
    reuse = {m.strip() for m in args.reuse_methods.split(",") if m.strip()}
    log = lambda msg: print(f"# {msg}", file=sys.stderr, flush=True)  # noqa: E731
    all_out: dict[str, Any] = {"spec": str(args.spec)}
    steps: dict[str, float] = {}
    units: dict[str, dict] = {}
    if spec.dataset_kind == "synthetic":
        targs = argparse.Namespace(steps=args.train_steps, warmup=args.train_warmup, device="cpu", precision=None,
                                   paper=False, no_flops=True)
        for m in methods:
            log(f"training steps: {m}")
            steps[m] = tt.spawn(m, targs)["ms_per_step"] / 1e3
        for m in methods:
            log(f"unit costs: {m}")
            units[m] = spawn("unit", str(args.spec), m, str(args.score_images),
                             str(args.reuse_k if m in reuse else 0), "0" if args.no_pointing_game else "1")
        log("corruptions")
        corrupt = spawn("corrupt", str(args.spec), str(args.corrupt_images))
        all_out.update(steps=steps, units=units, corrupt=corrupt)
        print_units(units, steps, corrupt)
        pred = predict(spec, units, steps, corrupt)
        all_out["prediction"] = pred
        print_prediction(spec, pred, units, steps)
        print_formula()
        print_reuse(units)
    else:
        print(f"# {args.spec}: dataset {spec.dataset_kind} is not generated here; use --paper-specs for it.")
    paper = [p for p in args.paper_specs.split(",") if p.strip()]
    if paper:
        flops: dict[str, dict] = {}
        for sp in paper:
            for e in load_spec(sp).entries:
                if e.method not in flops:
                    log(f"FLOP count: {e.method} ({e.config})")
                    flops[e.method] = spawn("flops", e.config, e.method, str(args.vocab_size), str(args.caption_len))
        all_out["flops"] = flops
        gpu_estimate(paper, flops, args.peak_tflops, args.utilization)
        print(f"\nAssumed captions of {args.caption_len} tokens and a {args.vocab_size}-word vocabulary (VSR++'s "
              "caption decoder output layer); the paper configs of flickr30k and coco have the same models.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
