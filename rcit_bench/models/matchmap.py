"""Matchmap: Ghouse, Verma, Das, "Associative localization" of words in images, after DAVEnet
(Harwath, Recasens, Suris, Chuang, Torralba, Glass, "Jointly Discovering Visual Objects and Spoken
Words from Raw Sensory Input", ECCV 2018; reference code: github.com/dharwath/DAVEnet-pytorch).

The image keeps its last feature map as a grid of C = h * w cells (the shared image encoder's
``local`` output), the caption keeps one feature per token (the shared text encoder's ``words``).
The matchmap ``M[c, t] = <cell c, word t>`` gives the similarity (MISA: mean over words of the max
over cells; SISA: mean of all; SIMA: mean over cells of the max over words) and, upsampled to the
image, one localization heatmap per word.

Loss: ``'triplet'`` (default) = the suite's max-violation triplet on the in-batch similarity matrix;
``'sampled'`` = DAVEnet's loss (one random impostor image and one impostor caption per anchor, margin
``sampled_margin`` = 1, mean over the batch); ``'both'`` sums them. The triplet trains better here (see
the config notes); DAVEnet's sampled loss is kept for paper fidelity. The impostors are drawn from a generator
seeded by a fixed salt and the global step (:meth:`MatchMap.impostor_generator`), not from the global RNG, so
every DDP rank draws the same impostors over the gathered batch, as one process does (under gradient accumulation
the micro-batches of one optimizer step reuse one draw).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rcit_bench.models.base import RetrievalModule
from rcit_bench.models.layers import HEAD_NORM_EPS, lengths_to_mask
from rcit_bench.models.registry import register_method
from rcit_bench.models.similarity import (
    MATCHMAP_BYTES_FACTOR,
    chunked_scores,
    default_bytes_per_pair,
    matchmap,
    matchmap_scores,
)
from rcit_bench.utils import check_choice

__all__ = ["MatchMap", "SIM_MODES", "LOSSES", "sampled_margin_loss", "word_heatmaps"]

SIM_MODES = ("misa", "sisa", "sima")
LOSSES = ("triplet", "sampled", "both")
#: salt of the sampled loss's impostor generator (its seed is salt + global step)
IMPOSTOR_SEED_SALT = 0x6D617463686D6170 % (2 ** 62)

TINY = {
    "image_encoder": {"name": "small_cnn", "input_size": 32, "channels": [8, 16, 32]},
    "text_encoder": {"name": "bigru", "word_dim": 16},
    "vocab_size": 40,
    "embed_dim": 32,
    "lr": 3e-3,
    "lr_decay_epochs": None,
}


def sampled_margin_loss(sims: Tensor, margin: float = 1.0, same_image: Tensor | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
    """DAVEnet's sampled margin ranking loss on an in-batch (B, B) similarity, positives on the diagonal.

    For each anchor i one impostor image j != i and one impostor caption k != i are drawn uniformly:
    ``[margin + S[j, i] - S[i, i]]+ + [margin + S[i, k] - S[i, i]]+``, averaged over the batch.
    same_image (B, B) bool, optional: pairs that share an image are never drawn as impostors.
    """
    b = sims.shape[0]
    if b < 2:
        return sims.sum() * 0.0
    forbid = torch.eye(b, dtype=torch.bool, device=sims.device)
    if same_image is not None:
        forbid = forbid | same_image.to(sims.device)
    draw = torch.rand(b, b, device="cpu", generator=generator).to(sims.device)
    draw = draw.masked_fill(forbid, -1.0)
    imp_img = draw.argmax(dim=1)  # (B,) impostor image for caption i
    imp_txt = torch.rand(b, b, device="cpu", generator=generator).to(sims.device).masked_fill(forbid, -1.0).argmax(1)
    pos = sims.diagonal()
    idx = torch.arange(b, device=sims.device)
    cost_img = (margin + sims[imp_img, idx] - pos).clamp(min=0)
    cost_txt = (margin + sims[idx, imp_txt] - pos).clamp(min=0)
    return (cost_img + cost_txt).mean()


def word_heatmaps(cells: Tensor, words: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Matchmaps of paired (image, caption) features, upsampled: cells (P, C, D), words (P, L, D) -> (P, L, H, W).

    Cells are row-major over the ``grid`` (h, w); bilinear upsampling (align_corners=False) maps each
    cell to the image region it covers.
    """
    h, w = grid
    mm = torch.vmap(matchmap)(cells, words)  # (P, C, L)
    maps = mm.transpose(1, 2).reshape(cells.shape[0], words.shape[1], h, w)  # (P, L, h, w)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@register_method("matchmap", tiny_config=TINY)
class MatchMap(RetrievalModule):
    """Grid cells x words matchmap; MISA/SISA/SIMA similarity; triplet or DAVEnet sampled loss; heatmaps."""

    image_rep_keys = ("local",)
    localizes = True
    text_rep_keys = ("words", "lengths")

    def __init__(self, sim_mode: str = "misa", loss: str = "triplet", sampled_margin: float = 1.0,
                 normalize: bool = True, text_encoder: str | dict[str, Any] = "bigru", **kwargs: Any) -> None:
        check_choice("sim_mode", sim_mode, SIM_MODES)
        check_choice("loss", loss, LOSSES)
        super().__init__(text_encoder=text_encoder, **kwargs)

    # ------------------------------------------------------------------------------------ encoding
    def encode_image(self, images: Tensor) -> dict[str, Tensor]:
        """images (B, 3, H, W) -> {'local': (B, C, D)} grid cells (l2-normalised when ``normalize``)."""
        cells = self.image_encoder(images)["local"]
        return {"local": F.normalize(cells, dim=-1, eps=HEAD_NORM_EPS) if self.hparams.normalize else cells}

    def encode_text(self, tokens: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """tokens (B, L) -> {'words': (B, L, D), 'lengths': (B,)}; padded words stay zero."""
        out = self.text_encoder(tokens, lengths)
        words = F.normalize(out["words"], dim=-1, eps=HEAD_NORM_EPS) if self.hparams.normalize else out["words"]
        return {"words": words, "lengths": out["lengths"]}

    def similarity(self, image_reps: dict[str, Tensor], text_reps: dict[str, Tensor]) -> Tensor:
        """(N_img, N_txt) matchmap similarity, computed in blocks bounded by ``memory_budget_mb``."""
        cells, words = image_reps["local"], text_reps["words"]
        fn = functools.partial(matchmap_scores, mode=self.hparams.sim_mode)
        per_pair = default_bytes_per_pair(cells, words, MATCHMAP_BYTES_FACTOR)
        return chunked_scores(fn, cells, words, text_reps["lengths"],
                              memory_budget_mb=float(self.hparams.memory_budget_mb), bytes_per_pair=per_pair,
                              by_length=not torch.is_grad_enabled())  # evaluation: no work on padding

    # ------------------------------------------------------------------------------------ training
    def impostor_generator(self) -> torch.Generator:
        """CPU generator of this step's impostor draws, seeded from a fixed salt and ``global_step``: the same on
        every rank and in one process, and independent of whatever else consumed the global RNG."""
        return torch.Generator().manual_seed(IMPOSTOR_SEED_SALT + int(self.global_step))

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        kind = self.hparams.loss
        img = self.encode_image(batch["images"])
        txt = self.encode_text(batch["tokens"], batch["lengths"])
        idx = batch.get("image_index") if kind in ("sampled", "both") else None
        img, txt, extra = self.global_batch(img, txt, {"image_index": idx} if idx is not None else {})
        sims = self.similarity(img, txt)
        logs: dict[str, Tensor | float] = {}
        loss = sims.new_zeros(())
        if kind in ("triplet", "both"):
            trip = self.triplet(sims)
            loss = loss + trip
            logs["triplet"] = trip.detach()
        if kind in ("sampled", "both"):
            idx = extra.get("image_index")
            same = idx[:, None] == idx[None, :] if idx is not None else None
            samp = sampled_margin_loss(sims, float(self.hparams.sampled_margin), same,
                                       generator=self.impostor_generator())
            loss = loss + samp
            logs["sampled"] = samp.detach()
        return loss, logs

    # ------------------------------------------------------------------------------------ localization
    def localize_batch(self, images: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Word heatmaps for paired images and captions: images (P, 3, H, W), tokens (P, L) -> (P, L, H, W).

        Row t belongs to token t (``<start>`` is row 0 with the suite's vocabulary); rows past a
        caption's length are zero.
        """
        cells = self.encode_image(images)["local"]  # (P, C, D)
        words = self.encode_text(tokens, lengths)["words"]  # (P, L, D)
        c = cells.shape[1]
        side = math.isqrt(c)
        if side * side != c:
            raise ValueError(f"localize needs a square grid of cells, but the image encoder gave {c} cells.")
        heat = word_heatmaps(cells, words, (side, side), tuple(images.shape[-2:]))
        valid = lengths_to_mask(lengths.to(heat.device), tokens.shape[1])  # (P, L)
        return heat * valid[:, :, None, None].to(heat.dtype)

    @torch.no_grad()
    def localize(self, image: Tensor, tokens: Tensor) -> Tensor:
        """One image (3, H, W) and its token ids (L,) -> heatmaps (L, H, W) at the image's size."""
        was_training = self.training
        self.eval()
        try:
            lengths = torch.tensor([tokens.shape[0]], device=tokens.device)
            return self.localize_batch(image.unsqueeze(0), tokens.unsqueeze(0), lengths)[0]
        finally:
            self.train(was_training)
