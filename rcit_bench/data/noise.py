"""Correspondence noise: training pairs whose caption belongs to another image.

The image-text matching literature since NCR (Huang et al., NeurIPS 2021; then DECL, BiCro, CRCL) calls the
fraction of such pairs in the training split the *noise rate*. Here it is the **mismatch rate**, named apart
from the RCIT paper's *pixel noise rate* (the fraction of corrupted pixels of a test image, see
``rcit_bench.data.corruptions``).

NCR builds its noisy split by shuffling the captions of ``rate x N`` randomly chosen pairs among themselves, so a
few land back on their own image and the real mismatch rate is lower than the nominal one.
:func:`mismatch_captions` re-assigns exactly ``round(rate x N_cap)`` captions, each to an image other than its
own (drawn uniformly among the others), so the nominal rate is the real one. Only the training split is ever
made noisy; validation and test stay clean, as in NCR.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rcit_bench.errors import UserError
from rcit_bench.utils import stable_hash

__all__ = ["mismatch_captions", "check_mismatch_rate", "check_mismatch_seed", "mismatch_fraction"]

_SEED_MOD = 2**31 - 1


def check_mismatch_rate(rate: object, where: str = "mismatch_rate") -> float:
    """`rate` as a float in [0, 1) (1 would leave no true pair to learn from), else a UserError naming `where`."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
        raise UserError(f"`{where}` must be a fraction of training pairs in [0, 1) (e.g. 0.2 for 20% mismatched "
                        f"captions), but got {rate!r}.")
    return float(rate)


def check_mismatch_seed(seed: object, where: str = "mismatch_seed") -> int:
    """`seed` as an int >= 0, else a UserError naming `where`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"`{where}` must be an integer >= 0, but got {seed!r} (it chooses which training captions "
                        f"are mismatched).")
    return int(seed)


def mismatch_captions(caption_to_image: Tensor, rate: float, seed: int) -> Tensor:
    """A new caption-to-image index in which exactly ``round(rate * N_cap)`` captions point to another image.

    Args:
        caption_to_image: (N_cap,) int image index of each caption (the clean correspondence).
        rate: the mismatch rate in [0, 1); 0 returns an unchanged copy.
        seed: which captions move and where, deterministically (same seed, same index on any machine).
    Returns a new (N_cap,) int64 tensor; no re-assigned caption lands on its own image, so the actual
    mismatch fraction equals the nominal one up to the rounding of ``rate * N_cap``.
    """
    rate = check_mismatch_rate(rate, "rate")
    c2i = torch.as_tensor(caption_to_image)
    if c2i.ndim != 1 or c2i.dtype.is_floating_point:
        raise UserError(f"`caption_to_image` must be a 1-D integer tensor of image indices, but got shape "
                        f"{tuple(c2i.shape)} and dtype {c2i.dtype}.")
    c2i = c2i.long().clone()
    n_cap = int(c2i.numel())
    n_move = int(round(rate * n_cap))
    if n_move == 0:
        return c2i
    images = torch.unique(c2i)
    if images.numel() < 2:
        raise UserError(f"`mismatch_rate` {rate!r} needs at least two images to move captions between, but the split "
                        f"has {images.numel()}; use a larger split or rate 0.")
    g = torch.Generator().manual_seed(stable_hash(int(seed), "mismatch", n_cap) % _SEED_MOD)
    chosen = torch.randperm(n_cap, generator=g)[:n_move]
    # positions of the chosen captions' images among the images of the split; adding an offset in
    # [1, n_img - 1] modulo n_img picks any other image with equal probability and never the own one
    pos = torch.searchsorted(images, c2i[chosen])
    offset = torch.randint(1, images.numel(), (n_move,), generator=g)
    c2i[chosen] = images[(pos + offset) % images.numel()]
    return c2i


def mismatch_fraction(clean: Tensor, noisy: Tensor) -> float:
    """The actual fraction of captions whose image differs between two caption-to-image indices."""
    clean, noisy = torch.as_tensor(clean), torch.as_tensor(noisy)
    if clean.shape != noisy.shape:
        raise ValueError(f"caption-to-image indices differ in shape: {tuple(clean.shape)} vs {tuple(noisy.shape)}.")
    return float((clean != noisy).double().mean()) if clean.numel() else 0.0
