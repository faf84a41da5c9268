"""Blur family (ImageNet-C): defocus, glass, motion and zoom blur, and (held-out) Gaussian blur, severity 1..5.

Spatial constants (sigmas, radii, the glass-blur swap distance) are multiplied by ``scale = min(H, W) / 224``
in 'image' scaling and used as published in 'published' scaling (see the package docstring).

Deviations from the reference: glass blur swaps pixels one at a time in a Python loop there. Here each pass
performs the same number of swaps (one per interior pixel, offset drawn in [-delta, delta)) in
(2 delta + 1)^2 sub-passes on a lattice of stride 2 delta + 1, whose swaps are disjoint, so each sub-pass is
one gathered index permutation. Zoom blur uses the reference's np.arange zoom factors (12 at severity 1).
Motion blur is imagecorruptions' one-sided half-Gaussian line kernel at a random angle in [-45, 45) degrees.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import (
    _clipped_zoom,
    _draw,
    _filter2d,
    _gaussian_blur,
    _motion_blur_batch,
    _pad_reflect,
    _scale,
)
from .registry import register_corruption

# published ImageNet-C constants (severity 1..5) for 224 px images
_DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # radius, alias blur


def _disk_kernel(radius: float, alias_blur: float, device: torch.device) -> Tensor:
    """ImageNet-C anti-aliased disk (radius may be fractional after scaling)."""
    half = max(8, math.ceil(radius)) if radius > 8 else min(8, math.ceil(radius) + 1)
    t = torch.arange(-half, half + 1, dtype=torch.float32, device=device)
    disk = ((t.view(-1, 1) ** 2 + t.view(1, -1) ** 2) <= radius**2).float()
    if disk.sum() == 0:
        disk[half, half] = 1.0
    disk = disk / disk.sum()
    ks = 3 if radius <= 8 else 5  # cv2.GaussianBlur ksize of the reference
    g = torch.arange(ks, dtype=torch.float32, device=device) - ks // 2
    g = torch.exp(-0.5 * (g / alias_blur) ** 2)
    g = g / g.sum()
    d = _pad_reflect(disk.view(1, 1, *disk.shape), ks // 2, ks // 2)
    d = F.conv2d(F.conv2d(d, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))[0, 0]
    return d / d.sum()


@register_corruption("defocus_blur", family="blur", suite="imagenet_c", random=False)
def _defocus_blur(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    radius, alias = _DEFOCUS_BLUR[s]
    return _filter2d(x, _disk_kernel(radius * _scale(x), alias, x.device))


_GLASS_BLUR = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # sigma, delta, iterations


@register_corruption("glass_blur", family="blur", suite="imagenet_c")
def _glass_blur(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    sigma, delta, iters = _GLASS_BLUR[s]
    sc = _scale(x)
    delta = max(1, round(delta * sc))
    b, c, h, w = x.shape
    x = _gaussian_blur(x, sigma * sc)
    stride = 2 * delta + 1
    n = h * w
    dev = x.device
    state = torch.arange(n, device=dev).expand(b, n).contiguous()  # which source pixel sits at each position
    yy, xx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    interior = (yy > delta) & (yy <= h - delta) & (xx > delta) & (xx <= w - delta)
    for _ in range(iters):
        off = _draw(gens, lambda g: torch.randint(-delta, delta, (2, h, w), generator=g), dev)  # (B, 2, H, W)
        for oy in reversed(range(stride)):
            for ox in reversed(range(stride)):
                sel = interior & (yy % stride == oy) & (xx % stride == ox)
                src = sel.flatten().nonzero().squeeze(1)  # (S,) positions starting a swap
                if src.numel() == 0:
                    continue
                dst = (yy.flatten()[src] + off[:, 0].flatten(1)[:, src]) * w + (
                    xx.flatten()[src] + off[:, 1].flatten(1)[:, src]
                )  # (B, S)
                src_b = src.expand(b, -1)
                at_src, at_dst = state.gather(1, src_b), state.gather(1, dst)  # swap only touched pixels
                state.scatter_(1, src_b, at_dst)
                state.scatter_(1, dst, at_src)
    x = x.reshape(b, c, n).gather(2, state.unsqueeze(1).expand(b, c, n)).view(b, c, h, w)
    return _gaussian_blur(x, sigma * sc)



_MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # radius, sigma


@register_corruption("motion_blur", family="blur", suite="imagenet_c")
def _motion_blur(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    radius, sigma = _MOTION_BLUR[s]
    angles = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]) * 90 - 45
    sc = _scale(x)
    return _motion_blur_batch(x, radius * sc, sigma * sc, angles, (-45, 45))



# np.arange(start, stop, step) zoom factors
_ZOOM_BLUR = ((1.0, 1.11, 0.01), (1.0, 1.16, 0.01), (1.0, 1.21, 0.02), (1.0, 1.26, 0.02), (1.0, 1.31, 0.03))


@register_corruption("zoom_blur", family="blur", suite="imagenet_c", random=False)
def _zoom_blur(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    start, stop, step = _ZOOM_BLUR[s]
    zooms = np.arange(start, stop, step).tolist()  # the reference's factors, float quirks included (12 at severity 1)
    out = x.clone()
    for z in zooms:  # one batched resize per zoom factor
        out += _clipped_zoom(x, z)
    return out / (len(zooms) + 1)



_GAUSSIAN_BLUR = (1, 2, 3, 4, 6)  # sigma


@register_corruption("gaussian_blur", family="blur", suite="held_out", random=False)
def _gaussian_blur_c(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    return _gaussian_blur(x, _GAUSSIAN_BLUR[s] * _scale(x))
