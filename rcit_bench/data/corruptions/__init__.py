"""Image corruptions: the 19 ImageNet-C corruptions (severity 1..5) and the RCIT noise-rate corruptions.

ImageNet-C: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (reference code: github.com/hendrycks/robustness, and the `imagecorruptions`
package). RCIT: Kim, Shin & Shim, "Deep Learning for Corrupted Image-Text Matching" (noise *rate* = the
fraction of corrupted pixels).

Why a re-implementation: the reference code is NumPy/OpenCV/Wand per image, slow (glass blur takes tens of
seconds per image), crashes on current NumPy/scikit-image for some corruptions, ignores the seed for impulse
noise and fails below 32 px. Here every corruption is batched torch on the images' device, works for any
size >= 8 px, RGB or grayscale, and is deterministic per image.

Layout: every corruption is a function registered with `register_corruption` (module ``registry``) in its
family's module: ``noise``, ``blur``, ``weather``, ``digital`` (severity mode) and ``pixel_noise_rate`` (the
RCIT rate-mode ones); each documents its own constants and deviations. Shared filters, resizes and the RNG
plumbing are in ``ops``. The name tuples below (IMAGENET_C_CORRUPTIONS, ...) are derived from the registry
when the package is imported (the built-in corruptions); `list_corruptions` and `corruption_info` also see
corruptions registered later, e.g. from a user's module.

Conventions (documented deviations from the 224 px reference code):

* Scale. The published constants are for 224 px images and are not scale-free. Let
  ``scale = min(H, W) / 224``. Spatial constants (Gaussian/glass/motion blur sigma and radius, defocus disk
  radius, glass-blur swap distance, pixelate block size, elastic displacement) are multiplied by ``scale``,
  and the random layers of snow, frost, fog, spatter and elastic are generated on the 224 px reference grid
  (``H / scale`` x ``W / scale``) and resized to the image. So corrupting an image of any size looks like
  resizing it to 224 px (short side), corrupting with the published constants and resizing back. A
  consequence: on small images (e.g. 64 px) pixelate at low severity is the identity, because the image
  already has fewer pixels than the pixelated 224 px one. This is ``scaling="image"``, the default.
* ``scaling="published"`` instead applies the 224 px constants as published on any image size, as the
  `imagecorruptions` package does: scale 1 (blur sigmas and radii, glass-blur swap distance and the distance
  cap of spatter in the image's own pixels), the pixelate factor taken of the image's own size, and the random
  layers generated at the image's own size (no resize). Elastic keeps imagecorruptions' relative constants
  (displacement noise 0.5% and blur sigma 1% of the image's short side, alpha unscaled). On a 224 px short
  side both modes give identical pixels; on smaller images the published constants corrupt relatively more
  (at 64 px a 1 px blur is 3.5x wider relative to the image), while the pointwise corruptions (noise,
  brightness, contrast, saturate, JPEG, zoom blur, rate mode) give the same pixels in both modes. Use it to
  compare with numbers obtained with `imagecorruptions` on small images. The mode is held in a ContextVar
  that `corrupt` sets and resets around each call, so concurrent calls from other threads (or async tasks)
  never see each other's mode.
* Determinism. Every random number for image ``b`` comes from its own CPU ``torch.Generator`` seeded with
  ``stable_hash(seed, name, level, image_id[b])`` (level = severity or rate), so the pixels do not depend on
  batch size, order or composition, nor on the device (numbers are drawn on CPU and moved). When
  ``image_ids`` is None, an id is derived from a blake2b of each image's 16-bit-rounded pixels. Corruptions
  registered with ``random=False`` get no generators.
* Frost is ImageNet-C's frost: a random crop of one of the reference's frost photographs, read from the
  installed `imagecorruptions` package (optional extra ``imagenet-c``; found without importing it) and cached
  per process. Without that package frost falls back to six procedural textures (plasma fractal +
  motion-blurred ice streaks, bluish white; a warning is logged once), whose scores are not comparable with
  ImageNet-C frost; `frost_source()` says which one is in use ('imagenet_c' or 'procedural'). Details in
  the ``weather`` module.
* Noise: impulse noise draws 16 random bits per value (its rate is exact to 1/65536); shot noise samples
  Poisson(x c) with a vectorised table inversion (torch.poisson is a scalar loop), exact up to float32.
* Glass blur: the reference swaps pixels one at a time in a Python loop. Here each pass performs the same
  number of swaps (one per interior pixel, offset drawn in [-delta, delta)) in (2 delta + 1)^2 sub-passes on a
  lattice of stride 2 delta + 1, whose swaps are disjoint, so each sub-pass is one gathered index permutation.
* Spatter (water, severities 1-3): Canny edges are approximated by the morphological gradient of the liquid
  region; then, as in the reference, the distance to them truncated at 20 (exact Euclidean, batched, where the
  reference's cv2 uses a 5x5-mask approximation), a 3x3 box blur to 8 bits, cv2's histogram equalisation,
  the emboss kernel and a 3x3 box blur. The mud branch (severities 4-5) follows the reference.
* Pixelate is PIL's BOX down and NEAREST up, as the reference; contrast uses per-channel means, as the
  reference; zoom blur uses the reference's np.arange zoom factors (12 at severity 1).
* Brightness and saturate change HSV value/saturation with hue fixed; this is computed with the exact
  closed form of the RGB->HSV->RGB round trip (RGB is affine in V and in S for a fixed hue), batched.
* JPEG runs through libjpeg on CPU (per image: it is a codec), for identical pixels on every device:
  torchvision.io.encode_jpeg (its bytes equal those of the reference's Pillow) and decode_jpeg.
  The codec is most of the reference's own time, so this one is not much faster than the reference.
* Grayscale (B, 1, H, W): channel-wise corruptions run on the single channel; colour corruptions (registered
  with ``colour=True``: brightness, saturate, snow, frost, spatter) expand to RGB and convert back with the
  ITU-R 709 luma of skimage's rgb2gray.

RCIT rate mode (names 'speckle' and 'salt_pepper', argument ``rate``): exactly ``round(rate * H * W)``
pixels per image are picked uniformly (the same pixels in every channel); salt_pepper sets them to 0 or 1
(50/50, all channels), speckle applies ``x + x * N(0, 0.6)`` to them. s = 0.6 is ImageNet-C's severity-5
speckle constant: the RCIT paper does not state its sigma, and the harshest published value matches its
intent of a much stronger corruption than ImageNet-C (the rate supplies the rest).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor

from rcit_bench.errors import UserError
from rcit_bench.utils import did_you_mean

# the built-in families, imported explicitly: a missing one is an ImportError, never skipped. This order is
# the registration order, which orders the names within a suite (the tuples below equal the published order:
# checked against literals in the tests), so keep it.
from . import noise, blur, weather, digital, pixel_noise_rate  # noqa: F401  # isort: skip
from . import ops as _ops
from .ops import _SCALING, MAX_REFERENCE_SIDE, MIN_SIZE, REFERENCE_SIZE, SCALINGS, _generators, _to_gray
from .pixel_noise_rate import SPECKLE_RATE_SIGMA
from .registry import (
    CorruptionInfo,
    check_level,
    corruption_info,
    list_corruptions,
    register_corruption,
)
from .weather import frost_source

__all__ = [
    "IMAGENET_C_CORRUPTIONS",
    "HELD_OUT_CORRUPTIONS",
    "RATE_CORRUPTIONS",
    "SEVERITY_CORRUPTIONS",
    "CORRUPTION_FAMILIES",
    "SPECKLE_RATE_SIGMA",
    "SCALINGS",
    "REFERENCE_SIZE",
    "MIN_SIZE",
    "MAX_REFERENCE_SIDE",
    "GRID_MAX_SIDE",
    "GRID_MAX_PIXELS",
    "GRID_MAX_TOTAL_PIXELS",
    "GRID_RATES",
    "reference_grid_size",
    "short_side_size",
    "check_grid_budget",
    "CorruptionInfo",
    "corrupt",
    "list_corruptions",
    "corruption_grid",
    "corruption_info",
    "register_corruption",
    "check_level",
    "frost_source",
]


def _names(suite: str | None = None, mode: str | None = None) -> tuple[str, ...]:
    """Registered names (live, list_corruptions order) of a suite and/or a mode."""
    infos = [corruption_info(n) for n in list_corruptions()]
    return tuple(i.name for i in infos if (suite is None or i.suite == suite) and (mode is None or i.mode == mode))


# ---- derived from the registry (the built-in corruptions, at import) ----
IMAGENET_C_CORRUPTIONS: tuple[str, ...] = _names(suite="imagenet_c")  # the 15 ImageNet-C corruptions
HELD_OUT_CORRUPTIONS: tuple[str, ...] = _names(suite="held_out")  # its 4 held-out (validation) corruptions
RATE_CORRUPTIONS: tuple[str, ...] = _names(mode="rate")  # the RCIT noise-rate corruptions
SEVERITY_CORRUPTIONS: tuple[str, ...] = _names(mode="severity")  # IMAGENET_C + HELD_OUT
#: name -> family, grouped by family (in the order the families first appear), list_corruptions order within
_FAMILY_ORDER = list(dict.fromkeys(corruption_info(n).family for n in list_corruptions()))
CORRUPTION_FAMILIES: dict[str, str] = {
    n: corruption_info(n).family
    for n in sorted(list_corruptions(), key=lambda n: _FAMILY_ORDER.index(corruption_info(n).family))
}


#: Budget of `corruption_grid` (the `rcit-bench corrupt` preview) for the image itself: at most this long side
#: (px) and this many pixels (4 Mpx, e.g. 2048 x 2048; a full-HD frame fits). The grid holds 19 x 6 = 114 tiles,
#: so 4 Mpx already make a ~0.48 Gpx grid, ~5.7 GB as float32: the most a preview should cost.
GRID_MAX_SIDE = 4096
GRID_MAX_PIXELS = 4 * 1024 * 1024
#: ... and for the grid as a whole (tiles x image pixels): that full built-in grid, 114 tiles at 4 Mpx. Fewer
#: rows or columns never make an image refused; more (rate-mode rows, a user's corruptions) can.
GRID_MAX_TOTAL_PIXELS = 114 * GRID_MAX_PIXELS
#: the noise rates of a rate-mode row when none are given: the RCIT protocol's default
#: (`evaluation.rcit_protocol.rates` of a spec)
GRID_RATES: tuple[float, ...] = (0.6,)

# ----------------------------------------------------------------------------------------------------------
# public API


def corrupt(
    images: Tensor,
    name: str,
    severity: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    image_ids: Sequence[int] | Tensor | None = None,
    *,
    scaling: str = "image",
) -> Tensor:
    """Corrupt a batch deterministically per image.

    images: (B, 3, H, W) or (B, 1, H, W) float in [0, 1], H, W >= 8, any device. Exactly one of ``severity``
    (1..5, severity-mode names: ImageNet-C's) or ``rate`` (fraction of pixels in [0, 1], rate-mode names: RCIT's
    'speckle', 'salt_pepper'); see `check_level`. Any registered name works, a user's included.
    image_ids: B ints identifying the images (default: a hash of each image's pixels); the random numbers of
    image b depend only on (seed, name, level, image_ids[b]).
    scaling: 'image' (default: spatial constants scaled by min(H, W) / 224, random layers on the 224 px grid)
    or 'published' (the 224 px constants on any size, as `imagecorruptions`); see the module docstring.
    Returns the same shape, dtype and device, clipped to [0, 1].
    """
    info = corruption_info(name)
    level = check_level(name, severity, rate)
    _check_scaling(scaling)
    _check_images(images)
    token = _SCALING.set(scaling)
    try:
        return _corrupt(images, info, level, int(seed), image_ids)
    finally:
        _SCALING.reset(token)


def _corrupt(images: Tensor, info: CorruptionInfo, level: int | float, seed: int,
             image_ids: Sequence[int] | Tensor | None) -> Tensor:
    """`corrupt` after its checks, with the scaling set."""
    ids = _image_ids(images, image_ids)
    gens = _generators(seed, info.name, level, ids) if info.random else []
    if images.shape[0] == 0:
        return images.clone()
    x = images.float()
    arg = float(level) if info.mode == "rate" else int(level) - 1  # the rate, or the severity's index 0..4
    if info.colour and x.shape[1] == 1:
        out = _to_gray(info.fn(x.expand(-1, 3, -1, -1), arg, gens))
    else:
        out = info.fn(x, arg, gens)
    if not info.in_range:
        out = out.clamp_(0.0, 1.0)
    return out.to(images.dtype)


def corruption_grid(
    image: Tensor, severities: Sequence[int] = (1, 2, 3, 4, 5), *, names: Sequence[str] | None = None,
    rates: Sequence[float] = GRID_RATES, seed: int = 0, padding: int = 2, scaling: str = "image",
) -> Tensor:
    """Tile corruptions (rows) x (clean + levels) (columns) of one image.

    image: (C, H, W) in [0, 1]. names: default every severity-mode corruption (list_corruptions order; 19 built
    in), else any registered names in the order given. A severity-mode row has a column per severity, a
    rate-mode row one per rate (fraction of pixels), so a row may be shorter than the grid (white there).
    Returns (C, R*H + (R-1)*padding, K*W + (K-1)*padding) with R = the number of rows, K = 1 + the most levels
    of a row; gutters are white. scaling: as in `corrupt`. Used by the `rcit-bench corrupt` preview
    (`preview.preview_mosaic` labels it). An image over the budget (`check_grid_budget`: too elongated, too
    large, or too many tiles of it) is refused with a UserError before any corruption runs.
    """
    if image.dim() != 3:
        raise ValueError(f"Argument `image` must be a (C, H, W) tensor, but got shape {tuple(image.shape)}.")
    _check_scaling(scaling)
    names = _names(mode="severity") if names is None else tuple(names)
    if not names:
        raise ValueError("Argument `names` must name at least one corruption, but got none.")
    levels = {n: ([{"severity": s} for s in severities] if corruption_info(n).mode == "severity"
                  else [{"rate": r} for r in rates]) for n in names}
    c, h, w = image.shape
    rows = len(names)
    cols = 1 + max(len(v) for v in levels.values())
    check_grid_budget(h, w, scaling=scaling, tiles=rows * cols)
    for name in dict.fromkeys(names):  # every level checked before the first corruption runs
        for kw in levels[name]:
            check_level(name, **kw)
    grid = image.new_ones(c, rows * h + (rows - 1) * padding, cols * w + (cols - 1) * padding)
    batch = image.unsqueeze(0)  # (1, C, H, W)
    for r, name in enumerate(names):
        tiles = [image] + [corrupt(batch, name, **kw, seed=seed, image_ids=[0], scaling=scaling)[0]
                           for kw in levels[name]]
        for k, tile in enumerate(tiles):
            y, x0 = r * (h + padding), k * (w + padding)
            grid[:, y:y + h, x0:x0 + w] = tile
    return grid


def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(H, W) of an h x w image resized so that its short side is `size` px, aspect ratio kept (0: unchanged):
    how `rcit-bench corrupt --size` resizes."""
    if not size:
        return int(h), int(w)
    if h <= w:
        return int(size), max(1, round(w * size / h))
    return max(1, round(h * size / w)), int(size)


def reference_grid_size(h: int, w: int, scaling: str = "image") -> tuple[int, int]:
    """(H, W) of the grid the random layers of snow, frost, fog, spatter and elastic_transform are generated
    on, for an h x w image: short side 224 in 'image' scaling (``(h / scale, w / scale)``, scale =
    min(h, w) / 224), the image's own size in 'published' scaling. The same numbers as the corruptions use."""
    _check_scaling(scaling)
    if scaling == "published":
        return int(h), int(w)
    s = min(h, w) / _ops.REFERENCE_SIZE
    return max(1, round(h / s)), max(1, round(w / s))


def check_grid_budget(h: int, w: int, scaling: str = "image", tiles: int | None = None) -> None:
    """Refuse (UserError naming the image size) an h x w image that `corruption_grid` cannot preview within
    its budget, before any corruption runs: a reference grid longer than MAX_REFERENCE_SIDE (an image more
    elongated than ~9.1:1 in 'image' scaling), an image over GRID_MAX_SIDE px or GRID_MAX_PIXELS, or, given
    the number of h x w tiles the grid holds, a grid over GRID_MAX_TOTAL_PIXELS."""
    rh, rw = reference_grid_size(h, w, scaling)
    if max(rh, rw) > MAX_REFERENCE_SIDE:
        raise UserError(
            f"Argument `image` of {w}x{h} px (width x height) is too elongated for the corruption grid: the random "
            f"layers of snow, frost, fog, spatter and elastic_transform would be built on a {rw}x{rh} px grid, over "
            f"the budget of {MAX_REFERENCE_SIDE} px on its long side (in 'image' scaling an aspect ratio of at most "
            f"{MAX_REFERENCE_SIDE / _ops.REFERENCE_SIZE:.1f}:1); crop the image."
        )
    if max(h, w) > GRID_MAX_SIDE or h * w > GRID_MAX_PIXELS:
        raise UserError(
            f"Argument `image` of {w}x{h} px (width x height) is too large for the corruption grid (a tile per "
            f"corruption and severity): the budget is {GRID_MAX_SIDE} px on the long side and {GRID_MAX_PIXELS:,} px "
            f"in all; resize it first."
        )
    if tiles is not None and tiles * h * w > GRID_MAX_TOTAL_PIXELS:
        raise UserError(
            f"Argument `image` of {w}x{h} px (width x height) is too large for a corruption grid of {tiles} tiles: "
            f"{tiles * h * w:,} px in all, over the budget of {GRID_MAX_TOTAL_PIXELS:,} px (the full built-in grid "
            f"of 114 tiles at {GRID_MAX_PIXELS:,} px); resize it or pick fewer corruptions or levels."
        )


# ----------------------------------------------------------------------------------------------------------
# argument checks


def _check_scaling(scaling: str) -> None:
    if not isinstance(scaling, str) or scaling not in SCALINGS:
        listed = ", ".join(f"'{n}'" for n in SCALINGS)
        raise ValueError(
            f"Argument `scaling` must be one of {listed}, but got {scaling!r}; 'image' scales the spatial "
            f"constants to the image size, 'published' applies the 224 px ones as published."
            f"{did_you_mean(str(scaling), SCALINGS)}"
        )


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise ValueError(f"Argument `images` must be a torch.Tensor, but got {type(images).__name__}.")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"Argument `images` must have shape (B, 3, H, W) or (B, 1, H, W), but got {tuple(images.shape)}."
        )
    if not images.is_floating_point():
        raise ValueError(f"Argument `images` must be a float tensor in [0, 1], but got dtype {images.dtype}.")
    h, w = images.shape[-2:]
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"Argument `images` must be at least {MIN_SIZE}x{MIN_SIZE} px, but got {h}x{w}.")
    if images.numel():
        lo, hi = (v.item() for v in torch.aminmax(images))  # one pass; NaN fails both comparisons
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"Argument `images` must be in [0, 1], but got values in [{lo:.4g}, {hi:.4g}].")


def _image_ids(images: Tensor, image_ids: Sequence[int] | Tensor | None) -> list[int]:
    b = images.shape[0]
    if image_ids is None:
        # blake2b of each image's 16-bit-rounded pixels (sha256 of 32-bit values cost as much as a corruption)
        q = (images.detach().float().reshape(b, -1) * 65535).round_().to(torch.int32).to(torch.uint16).cpu().numpy()
        return [int.from_bytes(hashlib.blake2b(q[i].tobytes(), digest_size=8).digest(), "little") for i in range(b)]
    ids = image_ids.tolist() if isinstance(image_ids, Tensor) else list(image_ids)
    if len(ids) != b:
        raise ValueError(f"Argument `image_ids` must have one id per image ({b}), but got {len(ids)}.")
    return [int(i) for i in ids]

