"""Hugging Face formats: a local `imagefolder` with metadata.jsonl, Parquet files as `datasets` writes them,
and a dataset on the Hub (when online).

All three return the same :class:`CaptionSplit` as the Karpathy loader. Captions come from the first column
found among ``captions``, ``caption``, ``sentences``, ``raw``, ``text``, ``sentence`` (a list of strings, one
string, or a list of ``{"raw": ...}`` objects as in the Karpathy JSON). The split comes from a ``split`` column
when there is one, otherwise from the directory (imagefolder) or file name (Parquet: ``train-00000-of-00001``).
Image ids come from an integer id column (``imgid``, ``image_id``, ``cocoid``, ``img_id``, ``id``) when there is
one, otherwise from the row position in the source, which is stable for given files.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from rcit_bench.errors import UserError
from rcit_bench.data.captions import BytesImageSource, CaptionSplit, PathImageSource, simple_tokenize
from rcit_bench.data.datasets import DataSource, register_dataset
from rcit_bench.data.karpathy import SPLITS, safe_relative_path
from rcit_bench.utils import check_choice

__all__ = ["load_hf_imagefolder", "load_hf_parquet", "load_hf_hub", "CAPTION_COLUMNS", "ID_COLUMNS"]

CAPTION_COLUMNS = ("captions", "caption", "sentences", "raw", "text", "sentence")
ID_COLUMNS = ("imgid", "image_id", "cocoid", "img_id", "id")
# names a source may use for each split ('restval' joins train, as in the Karpathy COCO split)
SPLIT_ALIASES = {"train": ("train", "restval"), "val": ("val", "validation", "valid", "dev"), "test": ("test",)}


def _caption_column(columns: Sequence[str], where: str) -> str:
    for c in CAPTION_COLUMNS:
        if c in columns:
            return c
    raise UserError(
        f"{where}: no caption column found. Expected one of {', '.join(CAPTION_COLUMNS)}, but the columns are "
        f"{', '.join(map(str, columns))}."
    )


def _parse_captions(value: Any, where: str) -> list[str]:
    """Captions of one row: a string, a list of strings, or a list of {'raw': str} objects."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict) and "raw" in value:
        value = value["raw"] if isinstance(value["raw"], list) else [value["raw"]]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: captions must be a string or a list of strings, but got {type(value).__name__}.")
    out = []
    for j, cap in enumerate(value):
        if isinstance(cap, dict):
            cap = cap.get("raw")
        if not isinstance(cap, str):
            raise UserError(f"{where}: caption #{j} must be a string, but got {type(cap).__name__} {cap!r:.60}.")
        if not simple_tokenize(cap):
            raise UserError(f"{where}: caption #{j} is empty ({cap!r}).")
        out.append(cap.strip())
    if not out:
        raise UserError(f"{where}: the image has no captions.")
    return out


def _row_id(row: dict, fallback: int) -> int:
    for c in ID_COLUMNS:
        v = row.get(c)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
    return fallback


def _split_matches(value: str, split: str) -> bool:
    return str(value).lower() in SPLIT_ALIASES[split]


def _assemble(name: str, split: str, captions: list[list[str]], ids: list[int], source: Any, meta: dict) -> CaptionSplit:
    if not ids:
        raise UserError(f"{name}: no images in split {split!r} (split names accepted: {SPLIT_ALIASES[split]}).")
    if len(set(ids)) != len(ids):
        raise UserError(f"{name}: image ids of split {split!r} are not unique.")
    flat, c2i = [], []
    for i, caps in enumerate(captions):
        flat.extend(caps)
        c2i.extend([i] * len(caps))
    return CaptionSplit(image_ids=ids, captions=flat, tokens=[simple_tokenize(c) for c in flat], caption_to_image=c2i,
                        source=source, name=f"{name}/{split}", meta=meta)


# ------------------------------------------------------------------------------------------- imagefolder


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}: line {n} is not valid JSON: {exc}") from exc
                if not isinstance(row, dict):
                    raise UserError(f"{path}: line {n} must be a JSON object, got {type(row).__name__}.")
                rows.append(row)
    return rows


def load_hf_imagefolder(root: str | os.PathLike, split: str) -> CaptionSplit:
    """Load a local Hugging Face `imagefolder` with captions in metadata.jsonl.

    Accepted layouts (both are read by ``datasets.load_dataset("imagefolder", data_dir=root)``):
    ``root/metadata.jsonl`` whose rows hold ``file_name`` (relative to root) and a ``split`` column (or file names
    under a split directory, ``train/x.png``), or one ``root/<split>/metadata.jsonl`` per split directory
    (``train``, ``validation``/``val``, ``test``) with file names relative to that directory.
    """
    check_choice("split", split, SPLITS)
    root = Path(root)
    layout = ("Expected <root>/metadata.jsonl with rows {\"file_name\": ..., \"captions\": [...], \"split\": ...} "
              "or <root>/<split>/metadata.jsonl per split directory, the images beside it.")
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder root not found: {root}. {layout}")
    metas = [root / "metadata.jsonl"] if (root / "metadata.jsonl").is_file() else sorted(root.glob("*/metadata.jsonl"))
    if not metas:
        raise FileNotFoundError(f"No metadata.jsonl found in {root} or its split directories. {layout}")
    captions: list[list[str]] = []
    ids: list[int] = []
    paths: list[Path] = []
    position = 0
    for meta in metas:
        rows = _read_jsonl(meta)
        base = meta.parent
        dir_split = base.name if base != root else None
        cap_col = _caption_column(list(rows[0]) if rows else [], str(meta)) if rows else None
        for r, row in enumerate(rows):
            where = f"{meta} row {r}"
            fallback = position
            position += 1
            if "file_name" not in row or not isinstance(row["file_name"], str):
                raise UserError(f"{where}: missing the string field 'file_name' (fields present: {sorted(row)}).")
            fname = safe_relative_path(row["file_name"], f"'file_name' of {where}")
            if "split" in row:
                row_split = str(row["split"])
            elif dir_split is not None:
                row_split = dir_split
            elif "/" in fname.replace("\\", "/"):
                row_split = fname.replace("\\", "/").split("/")[0]
            else:
                raise UserError(f"{where}: cannot tell the split: add a 'split' column or use split directories.")
            if not _split_matches(row_split, split):
                continue
            if cap_col not in row:
                raise UserError(f"{where}: missing the caption field {cap_col!r}.")
            caps = _parse_captions(row[cap_col], where)
            path = base / fname
            if not path.is_file():
                raise FileNotFoundError(f"Image file not found: {path} (from {where}). {layout}")
            captions.append(caps)
            ids.append(_row_id(row, fallback))
            paths.append(path)
    return _assemble(root.name or "imagefolder", split, captions, ids, PathImageSource(paths), {"root": str(root)})


# ----------------------------------------------------------------------------------------------- parquet


def _parquet_files(path_or_glob: str | os.PathLike) -> list[Path]:
    p = Path(path_or_glob)
    if p.is_dir():
        files = sorted(p.rglob("*.parquet"))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in globlib.glob(str(path_or_glob), recursive=True))
    if not files:
        raise FileNotFoundError(
            f"No Parquet files found at {path_or_glob}. Expected a .parquet file, a directory of them, or a glob such "
            f"as 'data/*.parquet' (files as written by datasets.Dataset.to_parquet, with an 'image' column of "
            f"{{bytes, path}} and a caption list column)."
        )
    return files


def _image_column(schema_names: Sequence[str], rows_sample: dict, where: str) -> str:
    if "image" in schema_names:
        return "image"
    for c in schema_names:
        v = rows_sample.get(c)
        if isinstance(v, dict) and "bytes" in v:
            return c
    raise UserError(f"{where}: no image column found (expected 'image' holding {{bytes, path}}); columns: {list(schema_names)}.")


def _rows_to_split(
    rows_iter: Sequence[tuple[str, Path | None, list[dict]]], split: str, name: str, use_file_split: bool
) -> CaptionSplit:
    """Shared by Parquet and Hub: rows with an image {bytes, path} column, captions and maybe a split column."""
    captions: list[list[str]] = []
    ids: list[int] = []
    data: list[bytes] = []
    names: list[str] = []
    position = 0
    for where_file, base, rows in rows_iter:
        if not rows:
            continue
        cols = list(rows[0])
        cap_col = _caption_column(cols, where_file)
        img_col = _image_column(cols, rows[0], where_file)
        for r, row in enumerate(rows):
            fallback = position
            position += 1
            where = f"{where_file} row {r}"
            if "split" in row and not use_file_split:
                if not _split_matches(row["split"], split):
                    continue
            caps = _parse_captions(row.get(cap_col), where)
            img = row.get(img_col)
            if not isinstance(img, dict):
                raise UserError(f"{where}: column {img_col!r} must hold {{bytes, path}}, but got {type(img).__name__}.")
            blob, ipath = img.get("bytes"), img.get("path")
            if blob is None:
                if not ipath:
                    raise UserError(f"{where}: image has neither bytes nor a path.")
                # Parquet paths are relative to the file; Hub rows point into the local HF cache
                full = Path(ipath) if base is None else base / safe_relative_path(ipath, f"image path of {where}")
                if not full.is_file():
                    raise FileNotFoundError(f"Image file not found: {full} (from {where}).")
                blob = full.read_bytes()
            captions.append(caps)
            ids.append(_row_id(row, fallback))
            data.append(bytes(blob))
            names.append(f"{ipath or 'image'} ({where})")
    return _assemble(name, split, captions, ids, BytesImageSource(data, names), {})


def load_hf_parquet(path_or_glob: str | os.PathLike, split: str) -> CaptionSplit:
    """Load Parquet files written by `datasets` (``image`` = {bytes, path} struct, a caption list column).

    The split is taken from a ``split`` column if there is one, otherwise from file names starting with the split
    name (``train-00000-of-00001.parquet``, ``validation-...``, ``test-...``). Images are kept encoded in memory.
    """
    import pyarrow.parquet as pq

    check_choice("split", split, SPLITS)
    files = _parquet_files(path_or_glob)
    tables = []
    for f in files:
        try:
            tables.append((f, pq.read_table(f)))
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError
            raise UserError(f"Could not read Parquet file {f}: {exc}") from exc
    has_split_col = all("split" in t.column_names for _, t in tables)
    if not has_split_col:
        def file_split(f: Path) -> str:
            return f.name.split("-")[0].split(".")[0].lower()
        chosen = [(f, t) for f, t in tables if file_split(f) in SPLIT_ALIASES[split]]
        if not chosen:
            raise UserError(
                f"No 'split' column and no Parquet file named for split {split!r} (names starting with "
                f"{'/'.join(SPLIT_ALIASES[split])}-) among: {', '.join(f.name for f in files)}."
            )
        tables = chosen
    rows = [(str(f), f.parent, t.to_pylist()) for f, t in tables]
    name = Path(str(path_or_glob)).stem or "parquet"
    return _rows_to_split(rows, split, name, use_file_split=not has_split_col)


# ------------------------------------------------------------------------------------------------- hub


def load_hf_hub(name: str, split: str, **load_kwargs: Any) -> CaptionSplit:
    """Load a Hub dataset (or a local dataset directory) with ``datasets.load_dataset(name)``.

    Picks the dataset split named like `split` ('val' also matches 'validation'), or filters a ``split`` column
    (e.g. ``nlphuji/flickr30k`` ships one 'test' split with a 'split' column). Needs network (or the HF cache):
    offline, it raises an error saying how to proceed.
    """
    import datasets

    check_choice("split", split, SPLITS)
    try:
        dsd = datasets.load_dataset(name, **load_kwargs)
    except Exception as exc:  # offline: ConnectionError / DatasetNotFoundError / OfflineModeIsEnabled / ...
        raise RuntimeError(
            f"Could not load the Hugging Face dataset {name!r} ({type(exc).__name__}: {exc}). This needs network "
            f"access or a copy in the HF cache. Offline, download it elsewhere and save it with "
            f"`ds.to_parquet(...)`, then use dataset='hf_parquet' with that path; or use dataset='synthetic'."
        ) from exc
    if not isinstance(dsd, datasets.DatasetDict):
        dsd = datasets.DatasetDict({"train": dsd})
    keys = [k for k in dsd if k.lower() in SPLIT_ALIASES[split]]
    if keys:
        ds, use_file_split = dsd[keys[0]], True
    else:
        with_col = [k for k in dsd if "split" in dsd[k].column_names]
        if not with_col:
            raise UserError(
                f"Dataset {name!r} has splits {list(dsd)} and no 'split' column, so split {split!r} cannot be found."
            )
        ds, use_file_split = datasets.concatenate_datasets([dsd[k] for k in with_col]), False
    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))  # keep {bytes, path}: picklable, no re-encode
    rows = ds.to_list()
    return _rows_to_split([(f"{name}", None, rows)], split, name.replace("/", "_"), use_file_split=use_file_split)


# ------------------------------------------------------------------------------------------------ datasets


@register_dataset("hf_imagefolder")
def _load_imagefolder(source: DataSource, split: str) -> CaptionSplit:
    """A local Hugging Face imagefolder (`root`) with captions in metadata.jsonl."""
    return load_hf_imagefolder(source.root, split)


@register_dataset("hf_parquet")
def _load_parquet(source: DataSource, split: str) -> CaptionSplit:
    """Parquet files as `datasets` writes them (`root`: a file, a directory or a glob)."""
    return load_hf_parquet(source.root, split)


@register_dataset("hf_hub", root_is_path=False)
def _load_hub(source: DataSource, split: str) -> CaptionSplit:
    """A dataset on the Hugging Face Hub (`root`: its name) or a local dataset directory."""
    return load_hf_hub(str(source.root), split)
