"""Loader for the Karpathy split JSON files (Flickr30k, COCO, Flickr8k) and the embedded synthetic set.

Layout: ``<root>/dataset_<name>.json`` and image files under an image root. Flickr30k entries name files with
``filename``; COCO entries add ``filepath`` (``train2014`` / ``val2014``) and ``cocoid``, and mark 5,000 training
images as ``restval``, which by convention joins ``train``. Everything is validated at load time (fields, types,
paths inside the root, files present) so a bad dataset fails before training starts, not hours into it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from rcit_bench.errors import UserError
from rcit_bench.data.captions import CaptionSplit, PathImageSource, UnreadableImageError, _open_rgb, simple_tokenize
from rcit_bench.data.datasets import DataSource, dataset_info, register_dataset
from rcit_bench.utils import check_choice

__all__ = ["load_karpathy", "SPLITS", "safe_relative_path"]

SPLITS = ("train", "val", "test")
# Which JSON `split` values make up each requested split. COCO's restval is conventionally trained on.
_SPLIT_MEMBERS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
_KNOWN_JSON_SPLITS = ("train", "restval", "val", "test")


def _layout_hint(json_path: Path, image_root: Path) -> str:
    return (
        f"Expected layout: the Karpathy split file {json_path.name} (e.g. <root>/dataset_flickr30k.json) and the "
        f"image files under an image root (e.g. <root>/images/<filename>, or <root>/images/<filepath>/<filename> "
        f"for COCO); here json_path={json_path}, image_root={image_root}."
    )


def safe_relative_path(value: str, what: str) -> str:
    """Reject absolute paths and '..' so a dataset file can never point outside its root."""
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or value.startswith(("/", "\\")):
        raise UserError(f"{what} must be a path relative to the image root, but got the absolute path {value!r}.")
    parts = value.replace("\\", "/").split("/")
    if ".." in parts:
        raise UserError(f"{what} must stay inside the image root, but {value!r} contains '..'.")
    return value


def _entry_name(i: int, entry: Any) -> str:
    name = entry.get("filename") if isinstance(entry, dict) else None
    return f"image entry #{i}" + (f" ({name!r})" if isinstance(name, str) else "")


def _require(entry: dict, key: str, types: type | tuple[type, ...], where: str, json_path: Path) -> Any:
    if key not in entry:
        raise UserError(f"{json_path.name}: {where} is missing the field {key!r} (fields present: {sorted(entry)}).")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        tname = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise UserError(
            f"{json_path.name}: field {key!r} of {where} must be of type {tname}, but got "
            f"{type(value).__name__} {value!r:.80}."
        )
    return value


def _parse_sentence(sent: Any, j: int, where: str, json_path: Path) -> tuple[str, list[str]]:
    swhere = f"sentence #{j} of {where}"
    if not isinstance(sent, dict):
        raise UserError(f"{json_path.name}: {swhere} must be an object with 'raw' and 'tokens', got {sent!r:.80}.")
    raw = _require(sent, "raw", str, swhere, json_path)
    if not raw.strip():
        raise UserError(f"{json_path.name}: {swhere} has an empty caption ('raw' is {raw!r}).")
    tokens = sent.get("tokens")
    if tokens is None:
        tokens = simple_tokenize(raw)
    elif not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{json_path.name}: field 'tokens' of {swhere} must be a list of strings, got {tokens!r:.80}.")
    tokens = [t for t in tokens if t]
    if not tokens:
        tokens = simple_tokenize(raw)
    if not tokens:
        raise UserError(f"{json_path.name}: {swhere} has no word tokens (raw caption {raw!r}).")
    return raw.strip(), list(tokens)


def _load_annotations(json_path: Path) -> dict[int, dict] | None:
    """Ground truth beside ``dataset_X.json`` as ``annotations_X.json`` (written by the synthetic generator)."""
    stem = json_path.name
    if not (stem.startswith("dataset_") and stem.endswith(".json")):
        return None
    ann_path = json_path.with_name("annotations_" + stem[len("dataset_"):])
    if not ann_path.is_file():
        return None
    with open(ann_path, encoding="utf-8") as f:
        data = json.load(f)
    return {int(a["imgid"]): a for a in data.get("images", [])}


def load_karpathy(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str,
    *,
    skip_unreadable: bool = False,
) -> CaptionSplit:
    """Load one split ('train' | 'val' | 'test') of a Karpathy-format JSON as a :class:`CaptionSplit`.

    All captions of an image are kept (5 to 7 on COCO). `image_ids` are `cocoid` when present, else `imgid`.
    Every image of the split must exist (checked by a cheap stat). With ``skip_unreadable=True`` missing or
    undecodable images are dropped with their captions (each image is decoded once to check, which is slow on
    large sets) and counted in one warning; otherwise the first such file raises an error naming it.
    """
    check_choice("split", split, SPLITS)
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"Karpathy split file not found: {json_path}. {_layout_hint(json_path, image_root)}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"Image root directory not found: {image_root}. {_layout_hint(json_path, image_root)}")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{json_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "images" not in data:
        raise UserError(f"{json_path.name}: expected a JSON object with an 'images' list at the top level.")
    images = data["images"]
    if not isinstance(images, list):
        raise UserError(f"{json_path.name}: field 'images' must be a list, got {type(images).__name__}.")

    annotations = _load_annotations(json_path)
    members = _SPLIT_MEMBERS[split]
    image_ids: list[int] = []
    paths: list[Path] = []
    captions: list[str] = []
    tokens: list[list[str]] = []
    c2i: list[int] = []
    anns: list[dict] = []
    skipped: list[str] = []
    root_resolved = image_root.resolve()
    for i, entry in enumerate(images):
        where = _entry_name(i, entry)
        if not isinstance(entry, dict):
            raise UserError(f"{json_path.name}: {where} must be a JSON object, got {type(entry).__name__}.")
        entry_split = _require(entry, "split", str, where, json_path)
        if entry_split not in _KNOWN_JSON_SPLITS:
            raise UserError(
                f"{json_path.name}: field 'split' of {where} must be one of {', '.join(_KNOWN_JSON_SPLITS)}, "
                f"but got {entry_split!r}."
            )
        if entry_split not in members:
            continue
        filename = safe_relative_path(_require(entry, "filename", str, where, json_path), f"'filename' of {where}")
        if not filename:
            raise UserError(f"{json_path.name}: {where} has an empty 'filename'.")
        rel = filename
        if "filepath" in entry:
            filepath = safe_relative_path(_require(entry, "filepath", str, where, json_path), f"'filepath' of {where}")
            rel = f"{filepath}/{filename}" if filepath else filename
        if "cocoid" in entry:
            image_id = _require(entry, "cocoid", int, where, json_path)
        elif "imgid" in entry:
            image_id = _require(entry, "imgid", int, where, json_path)
        else:
            raise UserError(f"{json_path.name}: {where} is missing the field 'imgid' (or 'cocoid' for COCO).")
        sentences = _require(entry, "sentences", list, where, json_path)
        if not sentences:
            raise UserError(f"{json_path.name}: {where} has no captions ('sentences' is empty).")
        parsed = [_parse_sentence(s, j, where, json_path) for j, s in enumerate(sentences)]

        path = image_root / rel
        if not path.resolve().is_relative_to(root_resolved):  # symlink tricks
            raise UserError(f"{json_path.name}: image path {rel!r} of {where} resolves outside the image root.")
        if not path.is_file():
            if skip_unreadable:
                skipped.append(str(path))
                continue
            raise FileNotFoundError(
                f"Image file not found: {path} (from {where} of {json_path.name}). {_layout_hint(json_path, image_root)} "
                f"Pass skip_unreadable=True to drop missing or broken images."
            )
        if not skip_unreadable and path.stat().st_size == 0:  # same cost as is_file: one stat
            raise UnreadableImageError(f"Image file {path} (from {where} of {json_path.name}) is empty (0 bytes). "
                                       "Restore it, or pass skip_unreadable=True to drop broken images.")
        if skip_unreadable:
            try:
                _open_rgb(path, str(path))
            except UnreadableImageError:
                skipped.append(str(path))
                continue
        idx = len(image_ids)
        image_ids.append(int(image_id))
        paths.append(path)
        for raw, toks in parsed:
            captions.append(raw)
            tokens.append(toks)
            c2i.append(idx)
        if annotations is not None:
            anns.append(annotations.get(int(image_id), {}))

    if skipped:
        warnings.warn(
            f"Skipped {len(skipped)} missing or unreadable image(s) of split {split!r} in {json_path.name} "
            f"(first: {skipped[0]}).",
            stacklevel=2,
        )
    if not image_ids:
        raise UserError(f"{json_path.name} has no images in split {split!r} (JSON splits counted: {members}).")
    if len(set(image_ids)) != len(image_ids):
        raise UserError(f"{json_path.name}: image ids (cocoid/imgid) of split {split!r} are not unique.")
    return CaptionSplit(
        image_ids=image_ids,
        captions=captions,
        tokens=tokens,
        caption_to_image=c2i,
        source=PathImageSource(paths),
        annotations=anns if annotations is not None else None,
        name=f"{json_path.stem.removeprefix('dataset_')}/{split}",
        meta={"json_path": str(json_path), "image_root": str(image_root), "skipped": len(skipped)},
    )


# ------------------------------------------------------------------------------------------------ datasets

_KARPATHY_FILES = "Karpathy's split file dataset_{0}.json (caption_datasets.zip from " \
                  "https://cs.stanford.edu/people/karpathy/deepimagesent/) into <root>/"


def _load_named(source: DataSource, split: str) -> CaptionSplit:
    """<root>/dataset_<kind>.json and the images under <root>/images/ (or flickr30k-images/, or <root>)."""
    info = dataset_info(source.kind)
    root = Path(source.root)
    if not root.is_dir():
        raise info.missing(root)
    json_path = root / f"dataset_{source.kind}.json"
    if not json_path.is_file():
        raise info.missing(json_path)
    image_root = next((p for p in (root / "images", root / "flickr30k-images") if p.is_dir()), root)
    return load_karpathy(json_path, image_root, split, skip_unreadable=source.skip_unreadable)


register_dataset(
    "flickr30k", default_root="data/flickr30k",
    get_data="Get the Flickr30k images (https://shannon.cs.illinois.edu/DenotationGraph/, by request) into "
             "<root>/images/ and " + _KARPATHY_FILES.format("flickr30k"),
    description="Flickr30k with Karpathy's splits (1,000 test images)",
)(_load_named)
register_dataset(
    "coco", default_root="data/coco", protocols=("coco_1k",),
    get_data="Get the COCO 2014 train and val images (https://cocodataset.org) into <root>/images/train2014 and "
             "<root>/images/val2014, and " + _KARPATHY_FILES.format("coco"),
    description="MS-COCO with Karpathy's splits (5,000 test images; 5-fold 1K protocol too)",
)(_load_named)


@register_dataset("karpathy", needs_json=True, get_data="Pass json_path (a Karpathy JSON) and root (its image root)")
def _load_karpathy_json(source: DataSource, split: str) -> CaptionSplit:
    """Any Karpathy-format JSON (`json_path`) with its image root (`root`)."""
    return load_karpathy(source.json_path, source.root, split, skip_unreadable=source.skip_unreadable)
