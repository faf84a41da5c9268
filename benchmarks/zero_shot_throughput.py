"""Zero-shot throughput of `hf_dual_encoder`: images/s through corruption + preprocessing + image tower, captions/s
through tokenizer + text tower, on the path a 'pretrained' entry takes in the runner.

Why: a zero-shot entry costs nothing to train, so its whole cost is evaluation: every corruption cell re-encodes
the test images, the captions once per model. The models are random-weight CLIPs written offline
(rcit_bench.models.random_clip): the 2-layer toy the tests use and CLIP ViT-B/32's real shape (224 px, 12 + 12
layers); throughput does not depend on the weights. The tokenizer is a character-level CLIP BPE, so captions have
more tokens than with CLIP's real vocabulary (up to the same 77-token cap): captions/s is a lower bound.

Images are generated at the model's input size and corrupted with speckle at pixel noise rate 0.6 (the RCIT
protocol) as the datamodule does; each stage is timed apart (median of --repeats after one warm-up).

    python benchmarks/zero_shot_throughput.py [--archs tiny,vit-b-32] [--images 64] [--captions 320]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rcit_bench.utils import machine_header


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(arch: str, n_images: int = 64, n_captions: int = 320, batch: int = 64, repeats: int = 3,
            folder: Path | None = None) -> dict[str, Any]:
    """One row: seconds per stage for `n_images` images and `n_captions` captions, and the rates."""
    from rcit_bench.data.corruptions import corrupt
    from rcit_bench.data.datamodule import collate_text
    from rcit_bench.data.vocab import HFTokenizer
    from rcit_bench.models.hf_dual import HFDualEncoder
    from rcit_bench.models.random_clip import ARCHS, write_random_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_clip(Path(folder or tmp) / arch, arch)
        model = HFDualEncoder(pretrained=str(path)).eval()
        tok = HFTokenizer(str(path))
    size = ARCHS[arch]["image_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_images, 3, size, size, generator=g)
    words = ["a", "red", "square", "above", "the", "blue", "circle", "left", "of", "green", "small", "large"]
    captions = [" ".join(words[(k * 7 + j * 3) % len(words)] for j in range(8 + k % 6)) for k in range(n_captions)]
    ids = list(range(n_images))

    def corrupt_all() -> list[torch.Tensor]:
        return [corrupt(images[i:i + batch], "speckle", rate=0.6, seed=0, image_ids=ids[i:i + batch])
                for i in range(0, n_images, batch)]

    noisy = corrupt_all()
    pre = [model.preprocess(x) for x in noisy]

    @torch.inference_mode()
    def tower() -> None:
        for x in pre:
            model.model.get_image_features(pixel_values=x)

    @torch.inference_mode()
    def texts() -> None:
        for i in range(0, n_captions, batch):
            t, n = collate_text([tok.encode(c) for c in captions[i:i + batch]], tok.pad_id)
            model.encode_text(t, n)

    s_corrupt = _median_s(corrupt_all, repeats)
    s_pre = _median_s(lambda: [model.preprocess(x) for x in noisy], repeats)
    s_tower = _median_s(tower, repeats)
    s_text = _median_s(texts, repeats)
    total = s_corrupt + s_pre + s_tower
    return {"arch": arch, "image_px": size, "images": n_images, "corrupt_s": s_corrupt, "preprocess_s": s_pre,
            "tower_s": s_tower, "images_per_s": n_images / total, "captions": n_captions,
            "captions_per_s": n_captions / s_text, "threads": torch.get_num_threads()}


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = ["model", "image px", "images", "corruption ms/img", "preprocess ms/img", "image tower ms/img",
            "images/s (all three)", "captions", "captions/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = r["images"]
        lines.append(f"| {r['arch']} | {r['image_px']} | {n} | {1e3 * r['corrupt_s'] / n:.2f} | "
                     f"{1e3 * r['preprocess_s'] / n:.2f} | {1e3 * r['tower_s'] / n:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['captions']} | {r['captions_per_s']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="tiny,vit-b-32")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--captions", type=int, default=320)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rows = [measure(a, args.images, args.captions, args.batch, args.repeats) for a in args.archs.split(",")]
    print(machine_header("cpu"))
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
