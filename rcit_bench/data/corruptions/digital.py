"""Digital family (ImageNet-C): brightness, contrast, elastic transform, pixelate, JPEG compression and
(held-out) saturate, severity 1..5.

Deviations and choices: brightness and saturate change HSV value/saturation with hue fixed; this is computed
with the exact closed form of the RGB->HSV->RGB round trip (RGB is affine in V and in S for a fixed hue),
batched. Contrast uses per-channel means, as the reference. Pixelate is PIL's BOX down and NEAREST up, as the
reference; in 'image' scaling the pixelated size is a fraction of the 224 px reference size, so on small
images (e.g. 64 px) pixelate at low severity is the identity (the image already has fewer pixels than the
pixelated 224 px one); 'published' scaling takes the fraction of the image's own size, as imagecorruptions.
Elastic keeps imagecorruptions 1.1's relative constants. JPEG runs through libjpeg on CPU (per image: it is a
codec), for identical pixels on every device: torchvision.io.encode_jpeg (its bytes equal those of the
reference's Pillow) and decode_jpeg; the codec is most of the reference's own time, so this one is not much
faster than the reference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import _gaussian_blur, _randn, _ref_size, _resize, _scale
from .registry import register_corruption

# published ImageNet-C constants (severity 1..5), images in [0, 1]
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value


@register_corruption("brightness", family="digital", suite="imagenet_c", colour=True, random=False)
def _brightness(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    """HSV V += c (clipped), hue and saturation fixed: RGB scales by V'/V (black -> grey V')."""
    v = x.amax(dim=1, keepdim=True)
    v2 = (v + _BRIGHTNESS[s]).clamp(max=1.0)
    return torch.where(v > 0, x * (v2 / v.clamp_min(1e-12)), v2.expand_as(x))



_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor around the per-channel mean


@register_corruption("contrast", family="digital", suite="imagenet_c", random=False)
def _contrast(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    c = _CONTRAST[s]
    means = x.mean(dim=(2, 3), keepdim=True)  # per channel, as the reference (np.mean over axes 0, 1 of HWC)
    return (x - means) * c + means



_ELASTIC = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)  # alpha (imagecorruptions 1.1)


@register_corruption("elastic_transform", family="digital", suite="imagenet_c")
def _elastic_transform(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    """imagecorruptions 1.1 elastic: blurred uniform displacement (sigma 1% of size) times alpha, bilinear.
    Its size is the short side of the layer grid: 224 ('image' scaling), the image's own ('published')."""
    alpha = _ELASTIC[s]
    rh, rw = _ref_size(x)
    dev = x.device
    side = min(rh, rw)  # = REFERENCE_SIZE in 'image' scaling
    max_d = side * 0.005
    u = _randn(gens, (2, rh, rw), dev, uniform=True) * (2 * max_d) - max_d
    disp = _gaussian_blur(u, side * 0.01) * alpha  # (B, 2, Href, Wref) in reference px
    b, c, h, w = x.shape
    disp = _resize(disp, (h, w)) * _scale(x)  # in image px
    ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    gy = (ys + disp[:, 1]) / max(h - 1, 1) * 2 - 1
    gx = (xs + disp[:, 0]) / max(w - 1, 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)



_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)  # size factor


def _box_rows(x: Tensor, n: int) -> Tensor:
    """PIL's BOX downscale of the rows of x (P, S, W) to n: output i averages the rows whose centres lie in
    [i s, (i + 1) s), s = S / n. Runs of consecutive rows: one embedding_bag (mean) over all P * S rows, 2-3x
    faster than gathering and summing the runs' rows one offset at a time."""
    p, size, w = x.shape
    starts = torch.ceil(torch.arange(n, dtype=torch.float64) * (size / n) - 0.5).long().clamp_(0, size)
    offsets = (torch.arange(p)[:, None] * size + starts[None]).reshape(-1).to(x.device)
    rows = torch.arange(p * size, device=x.device)
    return F.embedding_bag(rows, x.reshape(p * size, w), offsets, mode="mean").view(p, n, w)



# means of inputs in [0, 1] (rounded sums of values <= 1 stay <= their count): no clamp
@register_corruption("pixelate", family="digital", suite="imagenet_c", random=False, in_range=True)
def _pixelate(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    """As the reference (PIL): BOX down to c of the 224 px reference size ('published' scaling: of the image's
    own size), NEAREST (centre-aligned) back up; the identity when that is not smaller."""
    c = _PIXELATE[s]
    b, ch, h, w = x.shape
    rh, rw = _ref_size(x)
    th, tw = min(h, max(1, int(rh * c))), min(w, max(1, int(rw * c)))
    if (th, tw) == (h, w):
        return x.clone()
    small = _box_rows(x.reshape(b * ch, h, w), th)  # rows, then columns (transposed: rows are the fast direction)
    small = _box_rows(small.transpose(1, 2).contiguous(), tw).transpose(1, 2).contiguous()  # (P, th, tw)
    # nearest-exact = PIL NEAREST; a contiguous (small) input makes it ~1.5x faster than a transposed one
    return F.interpolate(small.view(b, ch, th, tw), size=(h, w), mode="nearest-exact")



_JPEG = (25, 18, 15, 10, 7)  # quality


# values k / 255: no clamp
@register_corruption("jpeg_compression", family="digital", suite="imagenet_c", random=False, in_range=True)
def _jpeg_compression(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    """libjpeg encode (torchvision.io.encode_jpeg: the same bytes as the reference's Pillow) and decode, on CPU,
    one image after the other. Two codec threads were measured and dropped: on two cores they competed with
    torch's OpenMP workers (slower than one thread), and torch ops in them slowed every later op."""
    from torchvision.io import decode_jpeg, encode_jpeg

    # x in [0, 1]: truncation = rounding. Transposed to HWC as float (fast in torch), cast to uint8 by numpy
    # (~6x faster than torch's cast here): 0.8 ms for 16 images of 224 px, against 3.6 ms the other way round
    f = torch.empty(x.shape[0], x.shape[2], x.shape[3], x.shape[1])  # a copy: the caller's x is never written
    hwc = f.copy_(x.permute(0, 2, 3, 1)).mul_(255).add_(0.5).numpy().astype(np.uint8)
    # encode_jpeg takes CHW views of HWC memory without a copy; decode_jpeg returns CHW views of HWC memory
    decoded = [decode_jpeg(encode_jpeg(torch.from_numpy(im).permute(2, 0, 1), quality=_JPEG[s])) for im in hwc]
    out = torch.from_numpy(np.stack([t.permute(1, 2, 0).numpy() for t in decoded]))
    out = out.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255)
    return out.to(x.device)



_SATURATE = ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2))  # S -> S c0 + c1


@register_corruption("saturate", family="digital", suite="held_out", colour=True, random=False)
def _saturate(x: Tensor, s: int, gens: list[torch.Generator]) -> Tensor:
    """HSV S -> S c0 + c1 (clipped), hue and value fixed: V - RGB scales by S'/S (grey pixels: hue 0, red)."""
    c0, c1 = _SATURATE[s]
    v = x.amax(dim=1, keepdim=True)
    delta = v - x.amin(dim=1, keepdim=True)
    sat = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    sat2 = (sat * c0 + c1).clamp(0, 1)
    chroma = torch.where(delta > 0, (v - x) * (sat2 / sat.clamp_min(1e-12)), torch.zeros_like(x))
    grey = torch.cat([torch.zeros_like(v), v * sat2, v * sat2], dim=1)  # hue 0 (skimage's choice for grey)
    return v - torch.where(delta > 0, chroma, grey)

