"""Weather family (ImageNet-C): snow, frost, fog and (held-out) spatter, severity 1..5.

Their random layers are generated on the 224 px reference grid (``H / scale`` x ``W / scale``, short side
224) and resized to the image in 'image' scaling, at the image's own size in 'published' scaling (see the
package docstring).

* Frost is ImageNet-C's: a random crop of one of the frost photographs, blended as ``c0 x + c1 frost``. The
  photographs are read from the installed `imagecorruptions` package's data (``imagecorruptions/frost/``,
  the optional ``imagenet-c`` extra), located with importlib without importing the package (its import pulls
  in OpenCV), decoded with PIL (RGB; the PNGs' alpha is dropped, as cv2.imread does) and cached per process.
  As the reference: the photo index is drawn from the first five (the reference's ``randint(5)``: frost6 is
  never used; frost2.png and frost3.png of imagecorruptions 1.1.2 hold the same pixels, so one texture is
  drawn twice as often, as there), the photo is rescaled (bicubic, as cv2.INTER_CUBIC, rounded to 8 bits) by 1.1 times the
  factor that makes it cover the layer grid (1.1 when it already does), and the crop's top-left corner is
  drawn in [0, size - grid) per axis. The layer grid is the 224 px reference grid resized to the image
  ('image' scaling) or the image itself ('published', where this is the reference's frost exactly up to
  the random numbers and the codecs' rounding). `frost_source()` says which frost is in use.
* Fallback when `imagecorruptions` is not installed (a warning is logged once per process): six procedural
  frost textures (plasma fractal + motion-blurred ice streaks, bluish white), made once per process from
  fixed seeds and cached; each image takes a random one and a random crop. Its damage is much milder than
  the photographs' (PSNR to the clean image 16.5-19.5 dB over severities 5..1 on four 224 px photographs,
  against 9-12 dB for ImageNet-C frost), so fallback frost scores are not comparable with ImageNet-C frost.
* Snow and motion blur use imagecorruptions' one-sided half-Gaussian line kernel; the snow layer is rounded
  to 8 bits, as the reference.
* Spatter (water, severities 1-3): Canny edges are approximated by the morphological gradient of the liquid
  region; then, as in the reference, the distance to them truncated at 20 (exact Euclidean, batched, where the
  reference's cv2 uses a 5x5-mask approximation), a 3x3 box blur to 8 bits, cv2's histogram equalisation,
  the emboss kernel and a 3x3 box blur. The mud branch (severities 4-5) follows the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rcit_bench.utils import stable_hash

from .ops import (
    _box_blur3,
    _clipped_zoom,
    _filter2d,
    _gaussian_blur,
    _motion_blur_batch,
    _plasma_fractal,
    _randn,
    _ref_layer,
    _ref_size,
)
from .registry import register_corruption

__all__ = ["frost_source"]

log = logging.getLogger(__name__)

# published ImageNet-C constants (severity 1..5) for 224 px images
_SNOW = (  # mean, std, zoom, threshold, blur radius, blur sigma, blend
    (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
    (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
    (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
    (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
)


@register_corruption("snow", family="weather", suite="imagenet_c", colour=True)
def _snow(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    mean, std, zoom, thr, radius, sigma, blend = _SNOW[s]
    rh, rw = _ref_size(x)
    dev = x.device
    layer = _randn(gens, (1, rh, rw), dev) * std + mean  # (B, 1, Href, Wref)
    layer = _clipped_zoom(layer, float(zoom))
    layer = torch.where(layer < thr, torch.zeros_like(layer), layer).clamp(0, 1)
    angles = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]) * 90 - 135
    layer = _motion_blur_batch(layer, radius, sigma, angles, (-135, -45))
    layer = (layer * 255).round() / 255  # the reference rounds the layer to 8 bits
    layer = _ref_layer(x, layer)  # (B, 1, H, W)
    gray = x[:, :1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:] * 0.114  # cv2 RGB2GRAY, (B, 1, H, W)
    out = torch.maximum(x, gray.mul_(1.5).add_(0.5))  # in place from here: one full-size buffer
    out.mul_(1 - blend).add_(x, alpha=blend)
    return out.add_(layer + layer.flip(-2, -1))


# ---- frost ----

_FROST = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))  # image weight, frost weight
_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
_FROST_DRAWN = 5  # the reference draws np.random.randint(5): only the first five photographs are ever used
_FROST_PHOTOS: dict[str, tuple[Tensor, ...]] = {}  # photo directory -> decoded photos (3, h, w) uint8 RGB
_FROST_FALLBACK_WARNED = False


def _frost_photo_dir() -> Path | None:
    """The directory of imagecorruptions' frost photographs, found without importing the package (its import
    pulls in OpenCV); None when the package (or one of its photographs) is not installed."""
    try:
        spec = importlib.util.find_spec("imagecorruptions")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        d = Path(loc) / "frost"
        if all((d / f).is_file() for f in _FROST_FILES[:_FROST_DRAWN]):
            return d
    return None


def _frost_photos() -> tuple[str, tuple[Tensor, ...]] | None:
    """(directory, the five drawn frost photographs as (3, h, w) uint8 RGB CPU tensors), decoded once per
    process; None when they cannot be found (then frost falls back to the procedural textures)."""
    d = _frost_photo_dir()
    if d is None:
        return None
    key = str(d)
    if key not in _FROST_PHOTOS:
        from PIL import Image

        photos = []
        for f in _FROST_FILES[:_FROST_DRAWN]:
            with Image.open(d / f) as im:  # RGBA PNGs: alpha dropped, as cv2.imread(IMREAD_COLOR)
                a = np.asarray(im.convert("RGB"))
            photos.append(torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous())
        _FROST_PHOTOS[key] = tuple(photos)
    return key, _FROST_PHOTOS[key]


def frost_source() -> str:
    """Which frost `corrupt` uses in this process: 'imagenet_c' (ImageNet-C's frost photographs, read from the
    installed `imagecorruptions` package) or 'procedural' (the fallback textures: not comparable with
    ImageNet-C frost). Record it with results that include frost."""
    return "procedural" if _frost_photos() is None else "imagenet_c"


def _frost_rescaled_size(photo_hw: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """The reference's rescale: 1.1 x the factor that makes the photo cover the grid (1 when it does)."""
    (fh, fw), (gh, gw) = photo_hw, grid
    factor = 1.0
    if fh < gh or fw < gw:  # the reference's four cases: the larger factor of the too-small sides
        factor = max(gh / fh if fh < gh else 0.0, gw / fw if fw < gw else 0.0)
    factor *= 1.1
    return math.ceil(fh * factor), math.ceil(fw * factor)


@functools.lru_cache(maxsize=32)
def _frost_rescaled(key: str, index: int, size: tuple[int, int]) -> Tensor:
    """Photo `index` of directory `key` resized to size (bicubic, as cv2.INTER_CUBIC; 8 bits): (3, h, w)
    uint8. Cached: a few sizes per run (one per layer grid that the photo does not cover)."""
    photo = _FROST_PHOTOS[key][index]
    if tuple(photo.shape[-2:]) == tuple(size):
        return photo
    up = F.interpolate(photo[None].float(), size=size, mode="bicubic", align_corners=False)[0]
    return up.round_().clamp_(0, 255).to(torch.uint8)


def _frost_photo_layer(x: Tensor, gens: list[torch.Generator], key: str, photos: tuple[Tensor, ...]) -> Tensor:
    """(B, 3, Href, Wref) in [0, 1]: per image a random photo, rescaled as the reference, and a random crop."""
    rh, rw = _ref_size(x)
    crops = []
    for g in gens:
        i = int(torch.randint(_FROST_DRAWN, (), generator=g))
        size = _frost_rescaled_size(tuple(photos[i].shape[-2:]), (rh, rw))
        top = int(torch.randint(max(1, size[0] - rh), (), generator=g))
        left = int(torch.randint(max(1, size[1] - rw), (), generator=g))
        crops.append(_frost_rescaled(key, i, size)[:, top:top + rh, left:left + rw])
    return torch.stack(crops).float().div_(255)


# ---- the procedural fallback frost ----


def _frost_texture(gens: list[torch.Generator], size: tuple[int, int], device: torch.device) -> Tensor:
    """Procedural frost (replaces ImageNet-C's frost photographs): (B, 3, h, w) in [0, 1], bluish white."""
    h, w = size
    m = 1 << max(8, math.ceil(math.log2(max(h, w))))
    haze = _plasma_fractal(gens, m, 1.5, device)[:, None, :h, :w]  # (B, 1, h, w) cloudy base
    b = len(gens)
    # ice needles: 3 layers of sparse seeds per image, each smeared along its own random direction
    seeds = (_randn(gens, (3, h, w), device, uniform=True) < 0.012).float().view(b * 3, 1, h, w)
    ang = torch.stack([torch.rand(3, generator=g, dtype=torch.float64) for g in gens]).view(-1) * 360 - 180
    needles = _motion_blur_batch(seeds, 9, 6, ang, (-180, 180)) * 4
    needles = needles.view(b, 3, h, w).amax(1, keepdim=True)  # (B, 1, h, w)
    grain = _gaussian_blur(_randn(gens, (1, h, w), device, uniform=True), 0.8)
    frost = (0.45 * haze + 0.55 * needles.clamp(0, 1)) * (0.75 + 0.5 * grain)
    tint = torch.tensor([0.88, 0.94, 1.0], device=device).view(1, 3, 1, 1)
    return (frost * tint).clamp(0, 1)


_FROST_BANK: dict[int, Tensor] = {}
_FROST_TEXTURES = 6  # as ImageNet-C's six frost photographs


def _frost_bank(size: int) -> Tensor:
    """(6, 3, size, size) procedural frost textures on CPU, made once per size (fixed seeds), then cached."""
    bank = _FROST_BANK.get(size)
    if bank is None:
        gens = [torch.Generator().manual_seed(stable_hash("frost texture", i)) for i in range(_FROST_TEXTURES)]
        bank = _FROST_BANK[size] = _frost_texture(gens, (size, size), torch.device("cpu"))
    return bank


def _frost_procedural(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    """The fallback frost: a random crop of one of six procedural frost textures (cached), blended."""
    a, bw = _FROST[s]
    rh, rw = _ref_size(x)
    size = 1 << max(9, math.ceil(math.log2(max(rh, rw))))  # a fixed size: crops never depend on the batch
    bank = _frost_bank(size)
    crops = []
    for g in gens:
        i, top, left = (int(torch.randint(n, (), generator=g)) for n in (_FROST_TEXTURES, size - rh + 1,
                                                                         size - rw + 1))
        crops.append(bank[i, :, top:top + rh, left:left + rw])
    tex = _ref_layer(x, torch.stack(crops).to(x.device))  # a fresh tensor: safe to update in place
    return tex.mul_(bw).add_(x, alpha=a)


@register_corruption("frost", family="weather", suite="imagenet_c", colour=True, source=frost_source)
def _frost(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    """ImageNet-C frost: c0 x + c1 frost, frost a random crop of a frost photograph (see the module docstring);
    the procedural fallback when the photographs are not installed."""
    global _FROST_FALLBACK_WARNED
    found = _frost_photos()
    if found is None:
        if not _FROST_FALLBACK_WARNED:
            _FROST_FALLBACK_WARNED = True
            log.warning("Frost: the ImageNet-C frost photographs were not found (install the `imagecorruptions` "
                        "package, extra `imagenet-c`); using procedural frost textures instead, whose scores are "
                        "not comparable with ImageNet-C frost.")
        return _frost_procedural(x, s, gens)
    a, bw = _FROST[s]
    tex = _ref_layer(x, _frost_photo_layer(x, gens, *found).to(x.device))  # fresh: safe to update in place
    return tex.mul_(bw).add_(x, alpha=a)


_FOG = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # strength, wibble decay


@register_corruption("fog", family="weather", suite="imagenet_c")
def _fog(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    strength, decay = _FOG[s]
    rh, rw = _ref_size(x)
    m = 1 << max(8, math.ceil(math.log2(max(rh, rw))))
    layer = _plasma_fractal(gens, m, decay, x.device)[:, None, :rh, :rw]
    layer = _ref_layer(x, layer)
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    return torch.add(x, layer, alpha=strength).mul_(max_val / (max_val + strength))


# ---- spatter ----


_SPATTER = (  # mean, std, sigma, threshold, intensity / mud sigma, mud?
    (0.65, 0.3, 4, 0.69, 0.6, 0),
    (0.65, 0.3, 3, 0.68, 0.6, 0),
    (0.65, 0.3, 2, 0.68, 0.5, 0),
    (0.65, 0.3, 1, 0.65, 1.5, 1),
    (0.67, 0.4, 1, 0.65, 1.5, 1),
)


def _any3x3(m: Tensor) -> Tensor:
    """Binary dilation of a bool (B, H, W) by a 3x3 square (outside the image counts as False), separable."""
    r = m.clone()
    r[..., 1:] |= m[..., :-1]
    r[..., :-1] |= m[..., 1:]
    out = r.clone()
    out[..., 1:, :] |= r[..., :-1, :]
    out[..., :-1, :] |= r[..., 1:, :]
    return out


def _window_max(v: Tensor, n: int, ahead: bool) -> Tensor:
    """Max of v over a window of at least n values along the last dim: [x - m + 1, x] (ahead: [x, x + m - 1]),
    m = the next power of two >= n, in log2(m) whole-tensor steps (torch's cummax is a scalar scan per row)."""
    step = 1
    while step < n:
        out = v.clone()
        if ahead:
            torch.maximum(v[..., :-step], v[..., step:], out=out[..., :-step])
        else:
            torch.maximum(v[..., step:], v[..., :-step], out=out[..., step:])
        v, step = out, 2 * step
    return v


def _edge_distance(edge: Tensor, cap: int) -> Tensor:
    """min(Euclidean distance to the nearest True of edge (B, H, W), cap), exact, batched.

    Separable: squared horizontal distance to the nearest edge in each row, then the minimum of
    dy^2 + that over the rows within cap (farther edges are truncated anyway), one whole-batch op pair per dy.
    int16 where it fits: all squared values are <= 2 (cap + 1)^2."""
    b, h, w = edge.shape
    big = cap + 1
    far = 2 * big + w  # "no edge on this side": farther than the cap
    dt = torch.int16 if far + 2 * w < 2**15 else torch.int32
    col = torch.arange(w, device=edge.device, dtype=dt).expand(b, h, w)
    on = edge.to(dt)  # products with it: torch.where is several times slower on CPU
    left = _window_max((col + far) * on - far, big, ahead=False)  # last edge within cap at or left of x
    right = _window_max((far + w - col) * on - (far + w), big, ahead=True).neg_()  # first at or right of x
    g = torch.minimum(col - left, right - col).clamp_(max=big).to(torch.int16)
    g2 = F.pad(g.mul_(g), (0, 0, cap, cap), value=big * big)  # (B, H + 2 cap, W)
    d2 = g2[:, cap:cap + h].clone()
    tmp = torch.empty_like(d2)
    for dy in range(1, cap + 1):
        for start in (cap - dy, cap + dy):
            torch.minimum(d2, torch.add(g2[:, start:start + h], dy * dy, out=tmp), out=d2)
    return d2.float().sqrt_().clamp_(max=float(cap))


def _equalize_hist(v: Tensor, top: int) -> Tensor:
    """cv2.equalizeHist per image for integer levels 0..top stored as float (B, 1, H, W); returns levels 0..255."""
    b = v.shape[0]
    n = v[0].numel()
    lv = v.reshape(b, -1).long()
    hist = torch.bincount((lv + torch.arange(b, device=v.device).view(-1, 1) * (top + 1)).view(-1),
                          minlength=b * (top + 1)).view(b, top + 1)
    cdf = hist.cumsum(1)
    lo = (hist > 0).int().argmax(1, keepdim=True)  # lowest level present
    h0 = hist.gather(1, lo)
    scale = (255.0 / (n - h0).clamp_min(1).float())  # float32, as cv2
    lut = ((cdf - h0).float() * scale).round_()  # saturate_cast: round half to even
    lut = torch.where(h0 == n, lo.float().expand_as(lut), lut)  # one level only: cv2 leaves it as is
    return lut.gather(1, lv).view_as(v)



@register_corruption("spatter", family="weather", suite="held_out", colour=True)
def _spatter(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    mean, std, sigma, thr, inten, mud = _SPATTER[s]
    rh, rw = _ref_size(x)
    dev = x.device
    liquid = _randn(gens, (1, rh, rw), dev) * std + mean
    liquid = _gaussian_blur(liquid, sigma)
    liquid = liquid.mul_(liquid >= thr)  # zero below the threshold (B, 1, Href, Wref); faster than torch.where
    if mud:
        wet = _gaussian_blur((liquid > thr).float(), inten)
        wet = wet.mul_(wet >= 0.8)
        wet = _ref_layer(x, wet)
        color = torch.tensor([63 / 255, 42 / 255, 20 / 255], device=dev).view(1, 3, 1, 1)
        return x * (1 - wet) + color * wet
    # water: distance to the liquid's edges, truncated at 20 px (stands in for Canny + distanceTransform)
    liquid = (liquid * 255).clamp_(0, 255).floor_()  # the reference's uint8 liquid layer
    wet = liquid[:, 0] > 0
    edge = _any3x3(wet) & _any3x3(~wet)  # (B, h, w) morphological gradient: wet and dry pixels within 3x3
    dist = _edge_distance(edge, 20).unsqueeze(1)  # cv2.THRESH_TRUNC at 20
    dist = _box_blur3(dist).floor_()  # cv2.blur(...).astype(uint8): levels 0..20
    dist = _equalize_hist(dist, 20)
    emboss = torch.tensor([[-2.0, -1, 0], [-1, 1, 1], [0, 1, 2]], device=dev)
    dist = _box_blur3(_filter2d(dist, emboss).clamp_(0, 255).round_()).round_()  # uint8 filter2D, uint8 blur
    m = liquid * dist
    m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) * inten
    m = _ref_layer(x, m)
    color = torch.tensor([175 / 255, 238 / 255, 238 / 255], device=dev).view(1, 3, 1, 1)  # pale turquoise (RGB)
    return x + m * color
