"""The `rcit-bench corrupt` preview: a labelled mosaic of corruptions x levels of one image, as PNG or JPEG.

Why a module of its own: `corruption_grid` gives bare tiles (a tensor, for code and tests); a person looking at
the preview needs to read which row is which corruption and which column which severity or noise rate, and a
file small enough to open and share (a JPEG of the default preview is a fraction of the PNG). The command line
parses its flags here too, so that `cmd_corrupt` stays a few calls.

Layout: a label column on the left (the corruption's name, its family below or beside it) and, above each
section, a header band ('clean', 's1'..'s5' for the severity-mode rows; 'clean', 'rate 0.6', ... for the
rate-mode rows, which get a section of their own because their columns mean something else). A cell grows past
its tile when a label does not fit (tiny tiles); the tiles' pixels are `corruption_grid`'s, rounded to 8 bits as
`torchvision.utils.save_image` does. Text uses Pillow's bundled default font (scalable from Pillow 10.1; the
fixed bitmap font before), so nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from rcit_bench.errors import UserError
from rcit_bench.utils import did_you_mean

from . import GRID_RATES, check_grid_budget, corruption_grid
from .registry import corruption_info, list_corruptions

__all__ = [
    "OUTPUT_FORMATS",
    "JPEG_QUALITY",
    "JPEG_MAX_SIDE",
    "PreviewPlan",
    "parse_only",
    "parse_severities",
    "parse_rates",
    "plan_preview",
    "output_format",
    "preview_size",
    "check_output",
    "preview_mosaic",
    "save_preview",
]

#: --out suffix (lower case) -> Pillow format
OUTPUT_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
JPEG_QUALITY = 90  # labels and noise stay crisp; the default preview is still ~4x smaller than the PNG
JPEG_MAX_SIDE = 65500  # libjpeg's limit on either side
SEVERITIES = (1, 2, 3, 4, 5)
_INK, _FAMILY_INK, _PAPER = (0, 0, 0), (90, 90, 90), 255


@dataclass(frozen=True)
class PreviewPlan:
    """What the mosaic shows: severity-mode rows at `severities`, then rate-mode rows at `rates`."""

    severity_names: tuple[str, ...]
    severities: tuple[int, ...]
    rate_names: tuple[str, ...]
    rates: tuple[float, ...]

    def sections(self) -> list[tuple[str, tuple[str, ...], list[str], list[dict]]]:
        """(title, row names, column labels, level kwargs) of each non-empty section."""
        out = []
        if self.severity_names:
            out.append(("severity", self.severity_names, ["clean"] + [f"s{s}" for s in self.severities],
                        [{"severity": s} for s in self.severities]))
        if self.rate_names:
            out.append(("noise rate", self.rate_names, ["clean"] + [f"rate {r:g}" for r in self.rates],
                        [{"rate": r} for r in self.rates]))
        return out

    @property
    def tiles(self) -> int:
        """Tiles in all (the clean one of each row included): what the budget counts."""
        return (len(self.severity_names) * (1 + len(self.severities))
                + len(self.rate_names) * (1 + len(self.rates)))


# ----------------------------------------------------------------------------------------------------------
# the command line's flags


def _items(flag: str, text: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise UserError(f"{flag} needs a comma-separated list, but got {text!r}.")
    return items


def parse_only(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """--only (repeatable, each comma separated) -> the names in the order given, once each; None: all."""
    if values is None:
        return None
    names = [n for v in values for n in _items("--only", v) if n]
    known = list_corruptions()
    for n in names:
        if n not in known:
            raise UserError(f"--only got unknown corruption {n!r}; the corruptions are "
                            f"{', '.join(known)}.{did_you_mean(n, known)}")
    return tuple(dict.fromkeys(names))


def parse_severities(text: str | None) -> tuple[int, ...] | None:
    """--severities '1,3,5' -> (1, 3, 5), sorted, once each; None: all five."""
    if text is None:
        return None
    out = set()
    for item in _items("--severities", text):
        if item not in {str(s) for s in SEVERITIES}:
            raise UserError(f"--severities must be comma-separated severities from 1 to 5 (e.g. 1,3,5), but got "
                            f"{text!r}: {item!r} is not one.")
        out.add(int(item))
    return tuple(sorted(out))


def parse_rates(text: str | None) -> tuple[float, ...] | None:
    """--rates '0.2,0.6' -> (0.2, 0.6), sorted, once each; None: not given."""
    if text is None:
        return None
    out = set()
    for item in _items("--rates", text):
        try:
            rate = float(item)
        except ValueError:
            rate = math.nan
        if not 0.0 < rate <= 1.0:  # NaN fails too
            why = " (rate 0 is the clean column, always shown)" if rate == 0 else ""
            raise UserError(f"--rates must be comma-separated noise rates (fractions of pixels) in (0, 1] (e.g. "
                            f"0.2,0.6), but got {text!r}: {item!r} is not one{why}.")
        out.add(rate)
    return tuple(sorted(out))


def plan_preview(only: Sequence[str] | None = None, severities: Sequence[int] | None = None,
                 rates: Sequence[float] | None = None) -> PreviewPlan:
    """The rows and columns of the mosaic. Default: every severity-mode corruption at every severity (the
    preview as it always was); `rates` adds the rate-mode corruptions at those rates. `only` picks the rows
    (any mode; a rate-mode one without `rates` is shown at GRID_RATES). A flag that applies to none of the
    rows `only` picked is a UserError rather than silently ignored."""
    if only is None:
        sev_names = tuple(n for n in list_corruptions() if corruption_info(n).mode == "severity")
        rate_names = tuple(n for n in list_corruptions() if corruption_info(n).mode == "rate") if rates else ()
    else:
        sev_names = tuple(n for n in only if corruption_info(n).mode == "severity")
        rate_names = tuple(n for n in only if corruption_info(n).mode == "rate")
        if severities is not None and not sev_names:
            raise UserError(f"--severities applies to the severity-mode corruptions, but --only picked none of them "
                            f"({', '.join(only)}); drop --severities, or use --rates.")
        if rates is not None and not rate_names:
            rate_all = [n for n in list_corruptions() if corruption_info(n).mode == "rate"]
            raise UserError(f"--rates applies to the noise-rate corruptions ({', '.join(rate_all)}), but --only "
                            f"picked none of them ({', '.join(only)}); drop --rates, or add one to --only.")
    return PreviewPlan(sev_names, tuple(severities or SEVERITIES), rate_names, tuple(rates or GRID_RATES))


# ----------------------------------------------------------------------------------------------------------
# output


def output_format(path: str | Path) -> str:
    """Pillow's format for --out, from its suffix; a UserError naming the accepted ones otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        got = f"suffix {suffix!r}" if suffix else "no suffix"
        raise UserError(f"--out {str(path)!r} has {got}; the preview is written as PNG or JPEG by the suffix: "
                        f"use one of {', '.join(OUTPUT_FORMATS)}.")
    return OUTPUT_FORMATS[suffix]


def check_output(path: str | Path, plan: PreviewPlan, h: int, w: int) -> str:
    """The format for --out, after checking the h x w image's mosaic fits it (JPEG: JPEG_MAX_SIDE a side), so
    a preview that cannot be written is refused before any corruption runs."""
    fmt = output_format(path)
    width, height = preview_size(plan, h, w)
    if fmt == "JPEG" and max(width, height) > JPEG_MAX_SIDE:
        raise UserError(f"--out {str(path)!r}: the mosaic would be {width}x{height} px (width x height), over "
                        f"JPEG's {JPEG_MAX_SIDE} px a side; write a .png, or pass a smaller --size or fewer "
                        f"rows/columns (--only, --severities, --rates).")
    return fmt


def save_preview(mosaic: Image.Image, path: str | Path) -> int:
    """Write the mosaic in the format of the path's suffix (JPEG at JPEG_QUALITY, optimised PNG); its bytes."""
    fmt = output_format(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "JPEG":
        mosaic.convert("RGB").save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        mosaic.save(path, "PNG", optimize=True)
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------------------
# the mosaic


def _font(h: int, w: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ~1/12 of the tile's short side (11..48 px); the fixed bitmap font where the
    installed Pillow (< 10.1) cannot scale it."""
    size = max(11, min(48, round(min(h, w) / 12)))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_w(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - min(left, 0)))


@dataclass(frozen=True)
class _Layout:
    font: object
    line: int  # line height
    margin: int
    label_w: int  # the label column
    header_h: int  # a section's header band
    cell_w: int  # one tile's cell (>= the tile)
    cell_h: int
    two_lines: bool  # family below the name (else beside it)
    cols: int
    width: int
    height: int


def _row_label(name: str, two_lines: bool) -> list[tuple[str, tuple[int, int, int]]]:
    family = corruption_info(name).family
    return [(name, _INK), (family, _FAMILY_INK)] if two_lines else [(f"{name} ({family})", _INK)]


def _layout(plan: PreviewPlan, h: int, w: int, padding: int) -> _Layout:
    font = _font(h, w)
    line = int(math.ceil(font.getbbox("Hgjy|")[3])) + 1
    margin = max(2, line // 3)
    sections = plan.sections()
    if not sections:
        raise UserError("The preview has no rows: pick at least one corruption with --only.")
    names = [n for _, rows, _, _ in sections for n in rows]
    two_lines = h >= 2 * line + margin
    label_w = 2 * margin + max(
        [_text_w(font, t) for n in names for t, _ in _row_label(n, two_lines)] + [_text_w(font, s[0]) for s in sections]
    )
    cell_w = max(w, 2 * margin + max(_text_w(font, c) for _, _, cols, _ in sections for c in cols))
    cell_h = max(h, 2 * line + margin if two_lines else line + margin)
    header_h = line + 2 * margin
    cols = max(len(c) for _, _, c, _ in sections)
    width = label_w + cols * cell_w + (cols - 1) * padding
    height = sum(header_h + len(rows) * cell_h + (len(rows) - 1) * padding for _, rows, _, _ in sections)
    height += (len(sections) - 1) * margin
    return _Layout(font, line, margin, label_w, header_h, cell_w, cell_h, two_lines, cols, width, height)


def preview_size(plan: PreviewPlan, h: int, w: int, *, padding: int = 2) -> tuple[int, int]:
    """(width, height) in px of the mosaic of an h x w image, computed without corrupting anything."""
    lay = _layout(plan, h, w, padding)
    return lay.width, lay.height


def _to_uint8(grid: Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded as torchvision's save_image rounds."""
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def preview_mosaic(image: Tensor, plan: PreviewPlan | None = None, *, seed: int = 0, scaling: str = "image",
                   padding: int = 2, labels: bool = True) -> Image.Image:
    """The labelled mosaic (an RGB PIL image) of `image` (C, H, W) in [0, 1] under `plan` (default: the full
    severity grid). labels=False leaves the label bands blank (same layout): to compare. The whole mosaic's
    budget (`check_grid_budget` with its tile count) is checked before any corruption runs."""
    plan = plan or plan_preview()
    c, h, w = image.shape
    lay = _layout(plan, h, w, padding)
    check_grid_budget(h, w, scaling=scaling, tiles=plan.tiles)
    canvas = np.full((lay.height, lay.width, 3), _PAPER, dtype=np.uint8)
    texts: list[tuple[int, int, str, tuple[int, int, int], str]] = []  # x, y, text, colour, anchor
    dy, dx = (lay.cell_h - h) // 2, (lay.cell_w - w) // 2  # a tile centred in its cell
    top = 0
    for title, rows, col_labels, levels in plan.sections():
        mid = top + lay.header_h // 2
        texts.append((lay.margin, mid, title, _FAMILY_INK, "lm"))
        for k, label in enumerate(col_labels):
            texts.append((lay.label_w + k * (lay.cell_w + padding) + lay.cell_w // 2, mid, label, _INK, "mm"))
        top += lay.header_h
        sev = [kw["severity"] for kw in levels if "severity" in kw]
        rates = [kw["rate"] for kw in levels if "rate" in kw]
        tiles = _to_uint8(corruption_grid(image, severities=sev, names=rows, rates=rates, seed=seed, padding=0,
                                          scaling=scaling))
        for r, name in enumerate(rows):
            y = top + r * (lay.cell_h + padding)
            for k in range(len(col_labels)):
                x = lay.label_w + k * (lay.cell_w + padding)
                canvas[y + dy:y + dy + h, x + dx:x + dx + w] = tiles[r * h:(r + 1) * h, k * w:(k + 1) * w]
            lines = _row_label(name, lay.two_lines)
            ty = y + (lay.cell_h - len(lines) * lay.line) // 2
            for i, (text, colour) in enumerate(lines):
                texts.append((lay.margin, ty + i * lay.line, text, colour, "la"))
        top += len(rows) * lay.cell_h + (len(rows) - 1) * padding + lay.margin
    mosaic = Image.fromarray(canvas, "RGB")
    if labels:
        draw = ImageDraw.Draw(mosaic)
        for x, y, text, colour, anchor in texts:
            try:
                draw.text((x, y), text, fill=colour, font=lay.font, anchor=anchor)
            except (TypeError, ValueError):  # the bitmap font of an old Pillow takes no anchor
                draw.text((x, y), text, fill=colour, font=lay.font)
    return mosaic
