"""Noise family (ImageNet-C): gaussian, shot, impulse and (held-out) speckle noise, severity 1..5.

Deviations from the reference: impulse noise draws 16 random bits per value (its rate is exact to 1/65536,
and it follows the seed, which the reference's skimage call ignores); shot noise samples Poisson(x c) with a
vectorised table inversion (torch.poisson is a scalar loop), exact up to float32 (see ops._poisson).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import _bits16, _poisson, _randn
from .registry import register_corruption

# published ImageNet-C constants (severity 1..5), images in [0, 1]
_GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)  # sigma


@register_corruption("gaussian_noise", family="noise", suite="imagenet_c")
def _gaussian_noise(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    return _randn(gens, x.shape[1:], x.device).mul_(_GAUSSIAN_NOISE[s]).add_(x)  # in place: no extra buffer


_SHOT_NOISE = (60, 25, 12, 5, 3)  # photons per unit intensity


@register_corruption("shot_noise", family="noise", suite="imagenet_c")
def _shot_noise(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    c = _SHOT_NOISE[s]
    lam = (x * c).cpu()
    return _poisson(lam, c, gens).view(x.shape).to(x.device).div_(c)


_IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)  # fraction of values hit (salt and pepper)


# values x, 0 or 1: no clamp
@register_corruption("impulse_noise", family="noise", suite="imagenet_c", in_range=True)
def _impulse_noise(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    """Bernoulli(a) per value from 16 random bits (a to 1/65536), half salt, half pepper."""
    half = round(_IMPULSE_NOISE[s] * 32768)  # hits per 65536, rounded to an even count
    v = _bits16(gens, x.shape[1:], x.device)  # uniform in [-32768, 32767]
    salt = (v < -32768 + half).to(x.dtype)  # the lower half of the hits ...
    kept = (v >= -32768 + 2 * half).to(x.dtype)  # ... the upper half is pepper (0); x (kept) + salt, exactly
    return torch.addcmul(salt, x, kept)  # = two masked_fills' values, faster on CPU


_SPECKLE_NOISE = (0.15, 0.20, 0.35, 0.45, 0.60)  # sigma of the multiplicative noise


@register_corruption("speckle_noise", family="noise", suite="held_out")
def _speckle_noise(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    n = _randn(gens, x.shape[1:], x.device).mul_(_SPECKLE_NOISE[s]).add_(1.0)
    return n.mul_(x)  # x + x * N(0, s)
