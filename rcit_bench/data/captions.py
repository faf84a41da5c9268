"""The one in-memory form of a captioned split that every loader returns, plus image decoding.

Every loader (synthetic, Karpathy JSON, Hugging Face) produces a :class:`CaptionSplit`, so the DataModule,
evaluation and the runner never care where the data came from. Captions carry an explicit
``caption_to_image`` index: images may have any number of captions (COCO has 5 to 7).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from rcit_bench.errors import UserError

__all__ = [
    "CaptionSplit",
    "UnreadableImageError",
    "PathImageSource",
    "BytesImageSource",
    "decode_image",
    "decode_image_uint8",
    "simple_tokenize",
]

_TOKEN_RE = re.compile(r"[a-z0-9]+")


class UnreadableImageError(UserError):
    """An image file exists but cannot be decoded (truncated, not an image, ...)."""


def simple_tokenize(text: str) -> list[str]:
    """Lower-case word tokens without punctuation, like the `tokens` of the Karpathy JSON files.

    Used for captions that come without tokens (Hugging Face formats) and for perturbed captions, so that
    clean and perturbed text go through the same vocabulary lookup.
    """
    return _TOKEN_RE.findall(text.lower())


def _open_rgb(src: str | os.PathLike | bytes, name: str) -> Image.Image:
    """Decode with PIL and convert anything (grayscale, palette, RGBA, CMYK) to RGB."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise UnreadableImageError(f"Could not decode image {name}: {type(exc).__name__}: {exc}") from exc


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and center-crop to size x size (keeps the aspect ratio)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image_uint8(src: str | os.PathLike | bytes, size: int | None = None, name: str | None = None) -> torch.Tensor:
    """Decode a file path or encoded bytes to a uint8 tensor (3, H, W); optional square resize + center crop."""
    img = _open_rgb(src, name or (str(src) if not isinstance(src, (bytes, bytearray)) else "<bytes>"))
    if size is not None:
        img = _resize_center_crop(img, int(size))
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def decode_image(src: str | os.PathLike | bytes, size: int | None = None, name: str | None = None) -> torch.Tensor:
    """Decode to float32 (3, H, W) in [0, 1], the image format of the whole data pipeline."""
    return decode_image_uint8(src, size, name).float().div_(255.0)


@dataclass
class PathImageSource:
    """Images stored as files; picklable so DataLoader workers can decode in parallel."""

    paths: list[Path]

    def __call__(self, i: int, size: int | None = None) -> torch.Tensor:
        return decode_image_uint8(self.paths[i], size, name=str(self.paths[i]))

    def subset(self, idx: Sequence[int]) -> "PathImageSource":
        return PathImageSource([self.paths[i] for i in idx])

    def describe(self, i: int) -> str:
        return str(self.paths[i])


@dataclass
class BytesImageSource:
    """Images held as encoded bytes (Parquet / Hub rows); `names` are only for error messages."""

    data: list[bytes]
    names: list[str]

    def __call__(self, i: int, size: int | None = None) -> torch.Tensor:
        return decode_image_uint8(self.data[i], size, name=self.names[i])

    def subset(self, idx: Sequence[int]) -> "BytesImageSource":
        return BytesImageSource([self.data[i] for i in idx], [self.names[i] for i in idx])

    def describe(self, i: int) -> str:
        return self.names[i]


@dataclass
class CaptionSplit:
    """One split of a captioned image dataset.

    Attributes:
        image_ids: stable integer id per image (cocoid / imgid); seeds per-image corruptions.
        captions: raw caption strings, grouped by image in the source order.
        tokens: lower-case word tokens per caption.
        caption_to_image: LongTensor (N_cap,) image index (0..len-1) of each caption.
        source: picklable callable ``source(i, size=None) -> uint8 (3, H, W)``.
        annotations: optional per-image dicts (synthetic ground truth: boxes, word-object alignment).
        name: human-readable name for messages, e.g. "flickr30k/test".
    """

    image_ids: list[int]
    captions: list[str]
    tokens: list[list[str]]
    caption_to_image: torch.Tensor
    source: Callable[..., torch.Tensor]
    annotations: list[dict[str, Any]] | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.caption_to_image = torch.as_tensor(self.caption_to_image, dtype=torch.long)
        assert len(self.captions) == len(self.tokens) == self.caption_to_image.numel()
        if self.annotations is not None:
            assert len(self.annotations) == len(self.image_ids)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def load_image(self, i: int, size: int | None = None) -> torch.Tensor:
        """Image `i` as float32 (3, H, W) in [0, 1] (optionally resized + center-cropped to size x size)."""
        return self.load_image_uint8(i, size).float().div_(255.0)

    def load_image_uint8(self, i: int, size: int | None = None) -> torch.Tensor:
        """Image `i` as uint8 (3, H, W): the compact form used by in-memory caches."""
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range for split {self.name!r} with {len(self)} images")
        return self.source(i, size)

    def image_captions(self, i: int) -> list[int]:
        """Caption indices of image `i`."""
        return torch.nonzero(self.caption_to_image == i).flatten().tolist()

    def head(self, n: int | None) -> "CaptionSplit":
        """The first `n` images and all their captions (for tiny runs); `None` or n >= len returns self."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise UserError(f"Argument `limit` must be a positive number of images, but got {n}.")
        keep = torch.nonzero(self.caption_to_image < n).flatten().tolist()
        return CaptionSplit(
            image_ids=self.image_ids[:n],
            captions=[self.captions[k] for k in keep],
            tokens=[self.tokens[k] for k in keep],
            caption_to_image=self.caption_to_image[keep],
            source=self.source.subset(range(n)) if hasattr(self.source, "subset") else self.source,
            annotations=self.annotations[:n] if self.annotations is not None else None,
            name=self.name,
            meta=dict(self.meta),
        )

    def __repr__(self) -> str:
        return f"CaptionSplit(name={self.name!r}, images={len(self)}, captions={self.num_captions})"
