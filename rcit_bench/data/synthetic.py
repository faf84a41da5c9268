"""Embedded synthetic captioned scenes, so the whole suite runs on CPU with no download.

Each image holds 1-3 coloured shapes (shape, colour, size, grid position) on a muted textured background;
five captions per image are drawn from several templates and synonyms, including spatial relations, so
retrieval is learnable but not trivial (colour, size and position all matter). The generator writes exactly the
Karpathy layout (``dataset_synthetic.json`` + ``images/*.png``), so the same loader as Flickr30k/COCO reads it,
plus ground truth in ``annotations_synthetic.json``: object boxes [x0, y0, x1, y1] in pixels, attributes,
relations, and for each caption the (token position, object index) pairs of words that name an object.

Everything is deterministic from the seed: each image draws from its own generator seeded with (seed, imgid),
so the output does not depend on the number of worker processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from rcit_bench.data.datasets import DataSource, register_dataset
from rcit_bench.utils import atomic_write_text

__all__ = [
    "generate_synthetic",
    "ensure_synthetic",
    "synthetic_params",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "JSON_NAME",
    "ANNOTATIONS_NAME",
    "STAMP_NAME",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
JSON_NAME = "dataset_synthetic.json"
ANNOTATIONS_NAME = "annotations_synthetic.json"
STAMP_NAME = "synthetic_params.json"
CAPTIONS_PER_IMAGE = 5
_POOL_MIN_IMAGES = 200  # below this, starting worker processes costs more than it saves
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: anti-aliased edges at low cost

# canonical name -> caption synonyms (single words so tokens align with objects)
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus"),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 45, 175),
    "orange": (245, 130, 25),
    "pink": (250, 125, 190),
    "cyan": (35, 205, 215),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
_COLOUR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLOURS} | {
    "purple": ("purple", "violet"),
    "cyan": ("cyan", "turquoise"),
}
SIZES: dict[str, tuple[float, tuple[str, ...]]] = {  # fraction of the image side, synonyms
    "small": (0.19, ("small", "little", "tiny")),
    "large": (0.31, ("large", "big")),
}
# 3 x 3 grid cells (row, col) -> position phrase words
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
_NUMBERS = {1: "one", 2: "two", 3: "three"}


def synthetic_params(
    n_train: int = 10000, n_val: int = 1000, n_test: int = 1000, image_size: int = 64, seed: int = 0
) -> dict[str, Any]:
    """The parameters that identify a generated dataset (stored in the stamp file)."""
    for arg, value, low in (("n_train", n_train, 1), ("n_val", n_val, 1), ("n_test", n_test, 1), ("image_size", image_size, 16)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"Argument `{arg}` must be an integer >= {low}, but got {value!r}.")
    return {
        "n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size, "seed": int(seed),
        "captions_per_image": CAPTIONS_PER_IMAGE, "generator_version": GENERATOR_VERSION,
    }


# ----------------------------------------------------------------------------------------------- scenes


def _sample_scene(rng: np.random.Generator, size: int) -> list[dict[str, Any]]:
    """1-3 objects with distinct (shape, colour) and distinct grid cells, so every caption is unambiguous."""
    n_obj = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    cells = [list(POSITIONS)[k] for k in rng.choice(9, size=n_obj, replace=False)]
    shapes, colours = list(SHAPES), list(COLOURS)
    seen: set[tuple[str, str]] = set()
    objects = []
    cell_px = size / 3
    for cell in cells:
        while True:
            shape, colour = shapes[rng.integers(len(shapes))], colours[rng.integers(len(colours))]
            if (shape, colour) not in seen:
                seen.add((shape, colour))
                break
        size_name = "small" if rng.random() < 0.5 else "large"
        diam = SIZES[size_name][0] * size * rng.uniform(0.92, 1.08)
        r, c = cell
        cx = (c + 0.5) * cell_px + rng.uniform(-0.12, 0.12) * cell_px
        cy = (r + 0.5) * cell_px + rng.uniform(-0.12, 0.12) * cell_px
        half = diam / 2
        angle = float(rng.uniform(-12, 12))
        if shape == "circle":
            xs, ys = [cx - half, cx + half], [cy - half, cy + half]
        else:
            xs, ys = zip(*_polygon(shape, cx, cy, half, angle))
        box = [max(0.0, min(xs)), max(0.0, min(ys)), min(float(size), max(xs)), min(float(size), max(ys))]
        objects.append({
            "shape": shape, "colour": colour, "size": size_name, "position": POSITIONS[cell],
            "cell": [r, c], "box": [round(float(v), 2) for v in box], "center": [cx, cy], "radius": half,
            "rgb": [int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in COLOURS[colour]],
            "angle": angle,
        })
    return objects


def _relation(a: dict, b: dict) -> str:
    """Canonical spatial relation of object a with respect to object b, from their grid cells."""
    (ra, ca), (rb, cb) = a["cell"], b["cell"]
    if ca != cb:
        return "left of" if ca < cb else "right of"
    return "above" if ra < rb else "below"


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Muted gradient + low-frequency blotches + pixel noise, (side, side, 3) uint8: not a flat colour."""
    base = rng.uniform(0.3, 0.65)
    c0 = np.clip(base + rng.uniform(-0.07, 0.07, size=3), 0, 1)
    c1 = np.clip(c0 + rng.uniform(-0.18, 0.18) + rng.uniform(-0.04, 0.04, size=3), 0, 1)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.arange(side, dtype=np.float32) / max(side - 1, 1)) - 0.5
    t = np.clip(np.cos(theta) * ramp[None, :] + np.sin(theta) * ramp[:, None] + 0.5, 0, 1)  # (side, side)
    img = c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t[..., None]
    coarse = Image.fromarray(rng.normal(0, 0.06, size=(5, 5)).astype(np.float32))  # mode F
    img += np.asarray(coarse.resize((side, side), Image.Resampling.BILINEAR))[..., None]  # smooth blotches
    img += rng.standard_normal(size=(side, side, 3), dtype=np.float32) * 0.035
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        pts = [(np.cos(a), np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * np.cos(a), (1.0 if k % 2 == 0 else 0.45) * np.sin(a))
               for k, a in enumerate(np.deg2rad(np.arange(10) * 36 - 90))]
    elif shape == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    else:  # pragma: no cover - internal invariant
        raise AssertionError(shape)
    a = np.deg2rad(angle)
    ca, sa = np.cos(a), np.sin(a)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _render(rng: np.random.Generator, objects: list[dict], size: int) -> Image.Image:
    # texture at the final resolution, upsampled by pixel repetition so reduce() gives it back unchanged
    bg = _background(rng, size).repeat(_SUPERSAMPLE, 0).repeat(_SUPERSAMPLE, 1)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        cx, cy = (v * _SUPERSAMPLE for v in obj["center"])
        r = obj["radius"] * _SUPERSAMPLE
        fill = tuple(obj["rgb"])
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(obj["shape"], cx, cy, r, obj["angle"]), fill=fill)
    return img.reduce(_SUPERSAMPLE)


# --------------------------------------------------------------------------------------------- captions


class _Caption:
    """Builds a caption word by word, recording which token positions name which object."""

    def __init__(self) -> None:
        self.words: list[str] = []  # includes ',' which is punctuation in `raw` only
        self.refs: list[tuple[int, int]] = []  # (index in self.words, object index)

    def add(self, text: str) -> "_Caption":
        self.words.extend(text.split())
        return self

    def np(self, obj: dict, k: int, rng: np.random.Generator, article: bool = True, size_p: float = 0.5) -> "_Caption":
        """Noun phrase '[a] [size] colour shape' with the adjectives and noun linked to object k."""
        if article:
            self.words.append("a")
        if rng.random() < size_p:
            syn = SIZES[obj["size"]][1]
            self.refs.append((len(self.words), k))
            self.words.append(syn[rng.integers(len(syn))])
        for word in (_COLOUR_WORDS[obj["colour"]], SHAPES[obj["shape"]]):
            self.refs.append((len(self.words), k))
            self.words.append(word[rng.integers(len(word))])
        return self

    def finish(self) -> tuple[str, list[str], list[list[int]]]:
        words = [("an" if w == "a" and i + 1 < len(self.words) and self.words[i + 1][0] in "aeiou" else w)
                 for i, w in enumerate(self.words)]
        self.words = words
        tokens, pos_map = [], {}
        for i, w in enumerate(self.words):
            if w != ",":
                pos_map[i] = len(tokens)
                tokens.append(w)
        raw = " ".join(self.words).replace(" ,", ",")
        raw = raw[0].upper() + raw[1:] + "."
        return raw, tokens, [[pos_map[i], k] for i, k in self.refs]


def _pos_phrase(obj: dict, rng: np.random.Generator) -> str:
    pos = obj["position"]
    if pos == "center":
        return ("in the center", "in the middle")[rng.integers(2)]
    if pos in ("left", "right"):
        return (f"on the {pos}", f"at the {pos}")[rng.integers(2)]
    if " " in pos:
        return (f"at the {pos}", f"in the {pos} corner")[rng.integers(2)]
    return f"at the {pos}"


def _rel_phrase(rel: str, adjacent: bool, rng: np.random.Generator) -> str:
    if adjacent and rng.random() < 0.25:
        return "next to"
    return {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}[rel]


def _captions(objects: list[dict], rng: np.random.Generator, n: int) -> list[tuple[str, list[str], list[list[int]]]]:
    """`n` captions from distinct templates (chosen at random), with random synonyms and object order."""
    count = len(objects)

    def order() -> list[int]:
        return [int(k) for k in rng.permutation(count)]

    def t_list() -> _Caption:
        c = _Caption()
        for j, k in enumerate(order()):
            if j:
                c.add("and")
            c.np(objects[k], k, rng)
        return c

    def t_position() -> _Caption:
        c = _Caption().add("there is")
        for j, k in enumerate(order()):
            if j:
                c.add("and")
            c.np(objects[k], k, rng).add(_pos_phrase(objects[k], rng))
        return c

    def t_count() -> _Caption:
        noun = ("shape" if count == 1 else "shapes") if rng.random() < 0.5 else ("object" if count == 1 else "objects")
        c = _Caption().add(f"{_NUMBERS[count]} {noun} , ")
        for j, k in enumerate(order()):
            if j:
                c.add("and")
            c.np(objects[k], k, rng, size_p=0.7)
        return c

    def t_relation() -> _Caption:
        ks = order()
        if count == 1:
            return _Caption().add("a single").np(objects[ks[0]], ks[0], rng, article=False).add(_pos_phrase(objects[ks[0]], rng))
        a, b = ks[0], ks[1]
        (ra, ca), (rb, cb) = objects[a]["cell"], objects[b]["cell"]
        c = _Caption().np(objects[a], a, rng)
        c.add(_rel_phrase(_relation(objects[a], objects[b]), abs(ra - rb) + abs(ca - cb) == 1, rng))
        c.np(objects[b], b, rng)
        if count == 3:
            c.add(", and").np(objects[ks[2]], ks[2], rng).add(_pos_phrase(objects[ks[2]], rng))
        return c

    def t_where_first() -> _Caption:
        c = _Caption()
        for j, k in enumerate(order()):
            if j:
                c.add(",")
            c.add(_pos_phrase(objects[k], rng)).np(objects[k], k, rng)
        return c

    def t_is_relation() -> _Caption:
        ks = order()
        if count == 1:
            return _Caption().np(objects[ks[0]], ks[0], rng, size_p=1.0).add(("on a textured background", "on a muted background")[rng.integers(2)])
        a, b = ks[0], ks[1]
        c = _Caption().add("the").np(objects[a], a, rng, article=False).add(
            "is " + _rel_phrase(_relation(objects[a], objects[b]), False, rng) + " the"
        ).np(objects[b], b, rng, article=False)
        return c

    templates = [t_list, t_position, t_count, t_relation, t_where_first, t_is_relation]
    picks = rng.choice(len(templates), size=n, replace=n > len(templates))
    return [templates[int(p)]().finish() for p in picks]


# ------------------------------------------------------------------------------------------ generation


def _make_one(job: tuple[str, int, int, int, str]) -> tuple[dict, dict]:
    """Render, save and caption one image (runs in a worker; RNG depends only on (seed, imgid))."""
    split, imgid, seed, size, out_dir = job
    rng = np.random.default_rng([seed, imgid])
    objects = _sample_scene(rng, size)
    img = _render(rng, objects, size)
    filename = f"{imgid:06d}.png"
    img.save(os.path.join(out_dir, filename), compress_level=1)
    caps = _captions(objects, rng, CAPTIONS_PER_IMAGE)
    sentids = [imgid * CAPTIONS_PER_IMAGE + j for j in range(len(caps))]
    entry = {
        "split": split, "filename": filename, "imgid": imgid, "sentids": sentids,
        "sentences": [{"raw": raw, "tokens": toks, "imgid": imgid, "sentid": sid}
                      for (raw, toks, _), sid in zip(caps, sentids)],
    }
    rels = [[a, _relation(objects[a], objects[b]), b] for a in range(len(objects)) for b in range(len(objects)) if a != b]
    ann = {
        "imgid": imgid, "filename": filename, "split": split,
        "objects": [{k: o[k] for k in ("shape", "colour", "size", "position", "box", "rgb")} for o in objects],
        "relations": rels,
        "captions": [{"sentid": sid, "word_objects": refs} for (_, _, refs), sid in zip(caps, sentids)],
    }
    return entry, ann


def _jobs(params: dict, out_dir: str) -> Iterator[tuple[str, int, int, int, str]]:
    imgid = 0
    for split in ("train", "val", "test"):
        for _ in range(params[f"n_{split}"]):
            yield split, imgid, params["seed"], params["image_size"], out_dir
            imgid += 1


def generate_synthetic(
    root: str | os.PathLike,
    *,
    n_train: int = 10000,
    n_val: int = 1000,
    n_test: int = 1000,
    image_size: int = 64,
    seed: int = 0,
    num_workers: int | None = None,
) -> Path:
    """Generate the synthetic dataset into `root` (replacing any previous one) and return `root`.

    Writes into a temporary directory first and moves the result into place, writing the stamp file last,
    so an interrupted run never leaves something that :func:`ensure_synthetic` takes as complete.
    `num_workers` processes render in parallel (default: min(2, cpu count)); the output is identical for any.
    """
    params = synthetic_params(n_train, n_val, n_test, image_size, seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = root / f".generating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (tmp / "images").mkdir(parents=True)
    try:
        workers = min(2, os.cpu_count() or 1) if num_workers is None else max(1, int(num_workers))
        total = n_train + n_val + n_test
        jobs = _jobs(params, str(tmp / "images"))
        if workers > 1 and total >= _POOL_MIN_IMAGES:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers) as pool:
                results = list(pool.imap(_make_one, jobs, chunksize=64))
        else:
            results = [_make_one(job) for job in jobs]
        entries = [e for e, _ in results]
        anns = [a for _, a in results]
        dataset = {"dataset": "synthetic", "images": entries}
        annotations = {
            "dataset": "synthetic", "image_size": image_size, "box_format": "[x0, y0, x1, y1] in pixels",
            "word_objects": "per caption: [token position, object index] for shape nouns and their colour/size words",
            "images": anns,
        }
        (tmp / JSON_NAME).write_text(json.dumps(dataset), encoding="utf-8")
        (tmp / ANNOTATIONS_NAME).write_text(json.dumps(annotations), encoding="utf-8")

        # swap into place: stamp removed first and written last
        (root / STAMP_NAME).unlink(missing_ok=True)
        if (root / "images").exists():
            old = root / f".old-images-{uuid.uuid4().hex[:8]}"
            os.replace(root / "images", old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp / "images", root / "images")
        os.replace(tmp / JSON_NAME, root / JSON_NAME)
        os.replace(tmp / ANNOTATIONS_NAME, root / ANNOTATIONS_NAME)
        atomic_write_text(root / STAMP_NAME, json.dumps(params, indent=2, sort_keys=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated synthetic dataset (%d images) in %s in %.1f s", n_train + n_val + n_test, root,
             time.perf_counter() - start)
    return root


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Inter-process lock so two runs sharing a root do not generate at the same time."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_complete(root: Path, params: dict) -> bool:
    stamp = root / STAMP_NAME
    if not (stamp.is_file() and (root / JSON_NAME).is_file() and (root / "images").is_dir()):
        return False
    try:
        return json.loads(stamp.read_text(encoding="utf-8")) == params
    except (OSError, json.JSONDecodeError):
        return False


def ensure_synthetic(
    root: str | os.PathLike,
    *,
    n_train: int = 10000,
    n_val: int = 1000,
    n_test: int = 1000,
    image_size: int = 64,
    seed: int = 0,
    num_workers: int | None = None,
) -> Path:
    """Return `root` holding the synthetic dataset with these parameters, generating it only when needed.

    Regenerates when the stamp is missing (never generated, or interrupted) or its parameters differ.
    """
    params = synthetic_params(n_train, n_val, n_test, image_size, seed)
    root = Path(root)
    if _is_complete(root, params):
        return root
    with _lock(root):
        if not _is_complete(root, params):  # another process may have finished while we waited
            generate_synthetic(root, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed,
                               num_workers=num_workers)
    return root


# ------------------------------------------------------------------------------------------------ dataset


def _prepare(source: DataSource) -> None:
    o = source.options
    ensure_synthetic(source.root, image_size=source.image_size, seed=o.get("synthetic_seed", 0),
                     n_train=o.get("n_train", 10000), n_val=o.get("n_val", 1000), n_test=o.get("n_test", 1000))


@register_dataset("synthetic", default_root="data/synthetic", protocols=("pointing_game",), prepare=_prepare,
                  cache_images=True, get_data="It is generated there on first use")
def _load(source: DataSource, split: str) -> Any:
    """The embedded synthetic set (shapes in scenes, captions from a grammar, object boxes), generated in `root`."""
    from rcit_bench.data.karpathy import load_karpathy  # the Karpathy layout; imported here: it imports torch

    root = Path(source.root)
    return load_karpathy(root / JSON_NAME, root / "images", split)
