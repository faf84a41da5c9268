"""Shared operations of the corruption families: scale and reference-grid helpers, per-image RNG plumbing,
filters (reflect-101 Gaussian, 2-D correlation, box), resizes, clipped zoom, motion-blur line kernels, the
diamond-square plasma fractal and the vectorised Poisson sampler.

Everything here is private to `rcit_bench.data.corruptions` (names start with ``_``) but stable enough for a
user's own corruption module to use: a corruption ``fn(x, level, gens)`` gets images ``x`` (B, C, H, W)
float, its level (severity index 0..4 or rate) and one CPU ``torch.Generator`` per image (draw with
`_randn`, `_bits16` or `_draw` so that image b's numbers come from gens[b] only).
"""

from __future__ import annotations

import contextvars
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rcit_bench.utils import stable_hash

REFERENCE_SIZE = 224  # the published constants are for 224 px images
MIN_SIZE = 8
#: Budget of the reference grid (`_ref_size`) in `corruption_grid` and the `rcit-bench corrupt` preview: its
#: long side in px. In 'image' scaling the grid's short side is 224, so this caps the aspect ratio at
#: 2048 / 224 ~ 9.1:1. Why: fog builds its plasma fractal, and the procedural frost its texture bank, as a
#: square power of two >= the grid's long side (work and memory grow with the square of the long side: a
#: 10000 x 10 image would need a 262144^2 fractal, terabytes). At 2048 px a 224 x 2048 image peaks at ~0.7 GB
#: with ImageNet-C's frost photographs and ~3.2 GB with the procedural frost (4x that at 4096 px).
MAX_REFERENCE_SIDE = 2048
#: how spatial constants meet the image size: 'image' (scaled by min(H, W) / 224), 'published' (as published)
SCALINGS: tuple[str, ...] = ("image", "published")
# the scaling of the `corrupt` call in progress; a ContextVar (not a module global) so that threads calling
# `corrupt` concurrently each read their own. Read by _scale only, on the thread that called `corrupt` (JPEG
# runs its codec on that thread too; a thread started inside a call would read the default, 'image').
_SCALING: contextvars.ContextVar[str] = contextvars.ContextVar("rcit_bench_corruption_scaling", default="image")

_LUMA = (0.2125, 0.7154, 0.0721)  # skimage.color.rgb2gray


def _scale(x: Tensor) -> float:
    """Factor of the spatial constants: min(H, W) / 224 in 'image' scaling, 1 in 'published' (see SCALINGS)."""
    if _SCALING.get() == "published":
        return 1.0
    return min(x.shape[-2:]) / REFERENCE_SIZE


def _ref_size(x: Tensor) -> tuple[int, int]:
    """(H, W) of the grid the random layers are built on: the 224 px reference grid for x (short side 224)
    in 'image' scaling, x's own size in 'published' scaling."""
    h, w = x.shape[-2:]
    s = _scale(x)
    return max(1, round(h / s)), max(1, round(w / s))


def _draw(gens: list[torch.Generator], fn: Callable[[torch.Generator], Tensor], device: torch.device) -> Tensor:
    """Stack one draw per image (from its own CPU generator) and move to device: (B, ...)."""
    return torch.stack([fn(g) for g in gens]).to(device)


def _randn(gens: list[torch.Generator], shape: tuple[int, ...], device: torch.device, uniform: bool = False) -> Tensor:
    """(B, *shape) standard normal (or uniform [0, 1)) numbers, image b from gens[b], drawn in place on CPU."""
    out = torch.empty((len(gens),) + tuple(shape))
    for b, g in enumerate(gens):
        (torch.rand if uniform else torch.randn)(shape, generator=g, out=out[b])
    return out.to(device)


def _bits16(gens: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """(B, *shape) uniform int16, image b from gens[b]: 64-bit draws split in four (4x cheaper than rand)."""
    n = math.prod(shape)
    out = torch.empty(len(gens), (n + 3) // 4, dtype=torch.int64)
    for b, g in enumerate(gens):
        out[b].random_(-(2**63), 2**63 - 1, generator=g)
    return out.view(torch.int16)[:, :n].reshape((len(gens),) + tuple(shape)).to(device)


def _to_gray(x: Tensor) -> Tensor:
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _reflect_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices of a reflect-101 padding of length n by pad on each side, valid for any pad (n >= 2)."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def _pad_reflect(x: Tensor, ph: int, pw: int) -> Tensor:
    """Reflect-101 padding (cv2's default border) of the last two dims, for any pad size."""
    h, w = x.shape[-2:]
    if ph < h and pw < w:  # the fast native kernel handles this case
        return F.pad(x, (pw, pw, ph, ph), mode="reflect") if (ph or pw) else x
    if ph:
        x = x.index_select(-2, _reflect_index(h, ph, x.device))
    if pw:
        x = x.index_select(-1, _reflect_index(w, pw, x.device))
    return x


def _gaussian_kernel1d(sigma: float, device: torch.device, truncate: float = 4.0) -> Tensor:
    radius = max(1, int(truncate * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return k / k.sum()


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian filter (scikit-image truncate=4), reflect-101 borders. x: (B, C, H, W)."""
    if sigma <= 0:
        return x
    b, c, h, w = x.shape
    k = _gaussian_kernel1d(sigma, x.device).to(x.dtype)
    r = k.numel() // 2
    # depthwise conv over B*C channels: much faster on CPU than B*C single-channel images
    y = _pad_reflect(x, r, r).reshape(1, b * c, h + 2 * r, w + 2 * r)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(b * c, 1, -1, 1), groups=b * c)
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(b * c, 1, 1, -1), groups=b * c)
    return y.reshape(b, c, h, w)


def _filter2d(x: Tensor, kernel: Tensor) -> Tensor:
    """Correlate every channel with one 2-D kernel (odd size), reflect-101 borders (cv2.filter2D)."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    y = _pad_reflect(x, kh // 2, kw // 2).reshape(b * c, 1, h + kh - 1, w + kw - 1)
    if kh * kw <= 625:  # depthwise conv over B*C channels (faster than FFT up to ~25x25 on CPU)
        k = kernel.to(x).view(1, 1, kh, kw).expand(b * c, 1, kh, kw)
        y = F.conv2d(y.view(1, b * c, h + kh - 1, w + kw - 1), k, groups=b * c)
    else:  # large kernels: FFT correlation is much cheaper than direct convolution
        hp, wp = y.shape[-2:]
        fy = torch.fft.rfft2(y, s=(hp, wp))
        fk = torch.fft.rfft2(kernel.to(x).flip(0, 1), s=(hp, wp))
        y = torch.fft.irfft2(fy * fk, s=(hp, wp))[..., kh - 1:, kw - 1:]
    return y.reshape(b, c, h, w)


def _box_blur3(x: Tensor) -> Tensor:
    return _filter2d(x, torch.full((3, 3), 1.0 / 9.0, device=x.device))


def _clipped_zoom(x: Tensor, factor: float) -> Tensor:
    """ImageNet-C clipped_zoom: crop the centre 1/factor, upsample by factor (bilinear), trim to the size."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    zh, zw = max(h, round(ch * factor)), max(w, round(cw * factor))
    up = F.interpolate(crop, size=(zh, zw), mode="bilinear", align_corners=False)
    th, tw = (zh - h) // 2, (zw - w) // 2
    return up[..., th:th + h, tw:tw + w]


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: pocketfft is several times slower on sizes with large prime factors."""
    while True:
        k = n
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return n
        n += 1


def _shift_sum(
    x: Tensor, weights: Tensor, dy: Tensor, dx: Tensor, bounds: tuple[int, int, int, int] | None = None
) -> Tensor:
    """sum_i weights[i] * x shifted by (dy[b, i], dx[b, i]) with replicated borders.

    x (B, C, H, W); weights (K,); dy, dx (B, K) int. out[y, x] += w_i * x[clamp(y - dy), clamp(x - dx)].
    bounds (dy_min, dy_max, dx_min, dx_max) must hold for every possible draw, not just this batch's, so that
    FFT sizes (hence rounding) never depend on the other images in the batch; default +-K.
    """
    b, c, h, w = x.shape
    if weights.numel() > 7:  # long kernels: one batched FFT convolution with a per-image sparse kernel
        k = weights.numel()
        dy0, dy1, dx0, dx1 = bounds if bounds is not None else (-k, k, -k, k)
        top, left = max(0, dy1), max(0, dx1)  # reads reach x[y - dy]: pad only where taps point
        hp, wp = _fast_len(h + top + max(0, -dy0)), _fast_len(w + left + max(0, -dx0))
        xp = F.pad(x, (left, wp - w - left, top, hp - h - top), mode="replicate")  # (B, C, Hp, Wp)
        lin = dy.remainder(hp) * wp + dx.remainder(wp)  # (B, K) circular positions of the taps
        kern = torch.zeros(b, hp * wp, device=x.device, dtype=x.dtype)
        kern.scatter_add_(1, lin, weights.to(x).expand(b, -1).contiguous())
        fk = torch.fft.rfft2(kern.view(b, 1, hp, wp))
        out = torch.fft.irfft2(torch.fft.rfft2(xp).mul_(fk), s=(hp, wp))
        return out[..., top:top + h, left:left + w].contiguous()
    flat = x.reshape(b, c, h * w)
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    out = torch.zeros_like(flat)
    for i in range(weights.numel()):
        rows = (ys.view(1, h) - dy[:, i : i + 1]).clamp(0, h - 1)  # (B, H)
        cols = (xs.view(1, w) - dx[:, i : i + 1]).clamp(0, w - 1)  # (B, W)
        idx = (rows.unsqueeze(2) * w + cols.unsqueeze(1)).view(b, 1, h * w).expand(b, c, h * w)
        out.add_(flat.gather(2, idx), alpha=float(weights[i]))
    return out.view(b, c, h, w)


def _line_taps(width: int, angles_deg: Tensor) -> tuple[Tensor, Tensor]:
    """(dy, dx) (B, width) int offsets of imagecorruptions' motion-blur line taps at per-image angles."""
    t = torch.arange(width, dtype=torch.float64)
    ang = torch.deg2rad(angles_deg.double().cpu()).view(-1, 1)  # (B, 1)
    py, px = width * torch.sin(ang), width * torch.cos(ang)
    hyp = torch.sqrt(py**2 + px**2)
    dy = -torch.ceil(t.view(1, -1) * py / hyp - 0.5)  # (B, width)
    dx = -torch.ceil(t.view(1, -1) * px / hyp - 0.5)
    return dy.long(), dx.long()


_TAP_BOUNDS: dict[tuple[int, float, float], tuple[int, int, int, int]] = {}


def _tap_bounds(width: int, lo_deg: float, hi_deg: float) -> tuple[int, int, int, int]:
    """Bounds of the taps over every angle in [lo, hi] (dense grid, +-1 margin), cached."""
    key = (width, float(lo_deg), float(hi_deg))
    if key not in _TAP_BOUNDS:
        dy, dx = _line_taps(width, torch.linspace(lo_deg, hi_deg, 3601, dtype=torch.float64))
        _TAP_BOUNDS[key] = (int(dy.min()) - 1, int(dy.max()) + 1, int(dx.min()) - 1, int(dx.max()) + 1)
    return _TAP_BOUNDS[key]


def _motion_blur_batch(
    x: Tensor, radius: float, sigma: float, angles_deg: Tensor, angle_range: tuple[float, float]
) -> Tensor:
    """imagecorruptions' motion blur: one-sided half-Gaussian line kernel at a per-image angle.

    angle_range: the interval the angles are drawn from (sets the padding, see _shift_sum)."""
    width = 2 * max(1, round(radius)) + 1
    t = torch.arange(width, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * max(sigma, 1e-3) ** 2))
    k = (k / k.sum()).float()
    dy, dx = _line_taps(width, angles_deg)
    dev = x.device
    return _shift_sum(x, k, dy.to(dev), dx.to(dev), _tap_bounds(width, *angle_range))


def _plasma_fractal(gens: list[torch.Generator], mapsize: int, wibbledecay: float, device: torch.device) -> Tensor:
    """ImageNet-C diamond-square plasma fractal, batched: (B, mapsize, mapsize) in [0, 1]."""
    b = len(gens)
    m = torch.zeros(b, mapsize, mapsize, dtype=torch.float64, device=device)
    step = mapsize
    wibble = 100.0

    def wibbled(a: Tensor) -> Tensor:
        u = _randn(gens, a.shape[1:], device, uniform=True).double()
        return a / 4 + wibble * (u * 2 * wibble - wibble)

    while step >= 2:
        half = step // 2
        corner = m[:, 0:mapsize:step, 0:mapsize:step]
        sq = corner + torch.roll(corner, -1, 1)
        sq = sq + torch.roll(sq, -1, 2)
        m[:, half:mapsize:step, half:mapsize:step] = wibbled(sq)
        dr = m[:, half:mapsize:step, half:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = dr + torch.roll(dr, 1, 1) + ul + torch.roll(ul, -1, 2)
        m[:, 0:mapsize:step, half:mapsize:step] = wibbled(lt)
        tt = dr + torch.roll(dr, 1, 2) + ul + torch.roll(ul, -1, 1)
        m[:, half:mapsize:step, 0:mapsize:step] = wibbled(tt)
        step //= 2
        wibble /= wibbledecay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return (m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)).float()


def _ref_layer(x: Tensor, layer: Tensor) -> Tensor:
    """Resize a layer (B, C, Href, Wref) built on the 224 px reference grid to x's size."""
    return _resize(layer, tuple(x.shape[-2:]))



# ----------------------------------------------------------------------------------------------------------
# Poisson sampler (shot noise)


_POISSON_STEP = 16  # lambda grid: 1/16
_POISSON_GUIDE = 256  # guide-table buckets per grid row
_POISSON_HARD = 1 << 16  # added to a guide entry whose bucket holds more than one CDF step (tails)
# elements per chunk: temporaries of a few MB; measured on 2 cores, 2^18 runs ~2.5x faster than 32k-element
# chunks (which ran every op inline on one thread) and as fast as larger ones
_POISSON_CHUNK = 1 << 18
_POISSON_TABLES: dict[int, tuple[Tensor, Tensor]] = {}


def _poisson_tables(c: int) -> tuple[Tensor, Tensor]:
    """CDF (J * K,) of Poisson(j / 16) for j = 0..16 c, k < K, and a guide table (J * 256, 2) int32. Cached.

    Guide row (j, m) packs a = the first k with CDF(j, k) > m / 256 (the answer for a uniform u at the bottom
    of bucket m) and the bits of CDF(j, a): u >= CDF(j, a) means the answer is a + 1, exactly, whenever the
    bucket holds at most one step of the CDF. Buckets holding more (the tails: ~1% of them) carry
    a + _POISSON_HARD and are searched. One gather then gives both numbers."""
    if c not in _POISSON_TABLES:
        from scipy.stats import poisson

        k_max = math.ceil(c + 12 * math.sqrt(c) + 12)  # P(X >= k_max) < 1e-20 for lambda <= c
        lam = np.arange(c * _POISSON_STEP + 1) / _POISSON_STEP
        cdf = torch.from_numpy(poisson.cdf(np.arange(k_max)[None], lam[:, None]).astype(np.float32))
        cdf[:, -1] = 1.0  # inversion always stops
        m = torch.arange(_POISSON_GUIDE + 1, dtype=torch.float32) / _POISSON_GUIDE
        first = torch.searchsorted(cdf, m.expand(cdf.shape[0], -1).contiguous(), right=True).clamp_(max=k_max - 1)
        a, a_top = first[:, :-1], first[:, 1:]  # answers at the bottom and the top of each bucket
        guide = torch.stack([torch.where(a_top <= a + 1, a, a + _POISSON_HARD).int(),
                             cdf.gather(1, a).view(torch.int32)], dim=-1)
        _POISSON_TABLES[c] = (cdf.reshape(-1).contiguous(), guide.reshape(-1, 2).contiguous())
    return _POISSON_TABLES[c]


def _poisson(lam: Tensor, c: int, gens: list[torch.Generator]) -> Tensor:
    """Poisson(lam) for lam (B, ...) in [0, c] on CPU, vectorised (torch.poisson is a scalar loop): flat float.

    lam = j / 16 + r: Poisson(j / 16) by table inversion (guide table, then at most one step, or a binary
    search in the tails) plus an independent Poisson(r), r < 1/16, by inversion (terms beyond 4 have
    probability < 1e-8, below the float32 uniform's resolution). Exact up to float32 rounding of the tables;
    processed in chunks of _POISSON_CHUNK values."""
    cdf, guide = _poisson_tables(c)
    u1 = _randn(gens, lam.shape[1:], torch.device("cpu"), uniform=True).view(-1)
    u2 = _randn(gens, lam.shape[1:], torch.device("cpu"), uniform=True).view(-1)
    lam = lam.reshape(-1)
    out = torch.empty_like(lam)
    step = _POISSON_CHUNK
    for i in range(0, lam.numel(), step):
        _poisson_chunk(lam[i:i + step], u1[i:i + step], u2[i:i + step], cdf, guide, c, out[i:i + step])
    return out


def _poisson_chunk(lam: Tensor, u1: Tensor, u2: Tensor, cdf: Tensor, guide: Tensor, c: int, out: Tensor) -> None:
    k = cdf.numel() // (c * _POISSON_STEP + 1)
    j = lam.mul(_POISSON_STEP).floor_()
    r = torch.sub(lam, j, alpha=1.0 / _POISSON_STEP)  # exact: the grid step is a power of 2
    j = j.int()
    g = guide.index_select(0, (u1 * _POISSON_GUIDE).int().add_(j, alpha=_POISSON_GUIDE))
    a = g[:, 0]
    res = a + (u1 >= g[:, 1].view(torch.float32))
    hard = (a >= _POISSON_HARD).nonzero().squeeze(1)
    if hard.numel():  # binary search in [a, k - 1]; the last CDF entry is 1 > u1
        lo, ui, ri = a[hard] - _POISSON_HARD, u1[hard], j[hard] * k
        hi = torch.full_like(lo, k - 1)
        while bool((lo < hi).any()):
            mid = (lo + hi).div_(2, rounding_mode="floor")
            above = torch.index_select(cdf, 0, ri + mid) > ui
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid + 1)
        res.index_copy_(0, hard, lo)
    torch.exp(r.neg(), out=out)  # P(R = 0) = exp(-r) < u2 for the few with R >= 1
    idx = (u2 >= out).nonzero().squeeze(1)
    p, ri, ui = out[idx], r[idx], u2[idx]
    acc, extra = p.clone(), torch.ones_like(p)
    for i in range(1, 5):
        p.mul_(ri).div_(i)
        extra += ui >= acc.add_(p)
    out.copy_(res).index_add_(0, idx, extra)



# ----------------------------------------------------------------------------------------------------------
# per-image generators


def _generators(seed: int, name: str, level: int | float, image_ids: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with stable_hash(seed, name, level, image id): image b's random
    numbers depend on nothing else (not the batch, its order or the device)."""
    return [torch.Generator().manual_seed(stable_hash(seed, name, level, i)) for i in image_ids]
