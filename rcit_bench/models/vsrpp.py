"""VSR++: Yuan, Liu, Wang, Lin, Zhang, Zhang, "VSR++: Improving Visual Semantic Reasoning for
Fine-Grained Image-Text Matching", ICPR 2020; built on VSRN (Li et al., ICCV 2019, reference code:
github.com/KunpengLi1994/VSRN) and SCAN (Lee et al., ECCV 2018, github.com/kuanghuei/SCAN).

VSR++ here runs on grid features computed from pixels: the regions are the shared image encoder's grid cells
(``local``, projected to ``embed_dim``), not the paper's bottom-up-attention boxes, so image corruptions reach
it like every other method.

- Global branch: l2-normalised regions -> 4 VSRN reasoning blocks -> GRU over regions -> l2-normalised
  vector; ``S_G`` = cosine with the Bi-GRU sentence vector.
- Local branch: SCAN cross attention (text-to-image by default) between regions (the reasoned ones by
  default, ``local_regions: raw`` for the projected ones) and words; ``S_L``.
- ``S = S_G + mu * S_L`` with ``mu = 2``.
- Loss: max-violation triplet on the fused ``S`` + ``caption_weight`` x caption-generation NLL, the
  batch caption decoded (teacher forcing) with attention over the reasoned regions (VSRN used 1.0).

Under DDP (rcit_bench.models.global_batch) the reasoning and the caption decoder (they have parameters) run on
each rank's slice; the global vectors, regions, words, lengths, and each caption's NLL sum and token count are
gathered, so the triplet and the token-mean NLL are those of the global batch. The decoder's Dropout(0.1) draws
its masks per rank, so with dropout a multi-process step equals the one-process step only in distribution (with
p = 0, exactly up to float rounding).

The heads return unit vectors (``F.normalize``) and the scorers normalise their inputs again with their own
l2norm; see :func:`rcit_bench.models.similarity.l2norm` for why both passes stay.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rcit_bench.models.base import RetrievalModule
from rcit_bench.models.layers import HEAD_NORM_EPS, AttentionCaptionDecoder, RegionReasoning
from rcit_bench.models.losses import caption_nll_loss
from rcit_bench.models.registry import register_method
from rcit_bench.models.similarity import (
    SCAN_BYTES_FACTOR,
    chunked_scores,
    cosine_sim,
    default_bytes_per_pair,
    scan_i2t,
    scan_t2i,
)
from rcit_bench.utils import check_choice

__all__ = ["VSRPP", "LOCAL_BRANCHES", "LOCAL_REGIONS"]

LOCAL_BRANCHES = ("t2i", "i2t")
LOCAL_REGIONS = ("reasoned", "raw")

TINY = {
    "image_encoder": {"name": "small_cnn", "input_size": 32, "channels": [8, 16, 32]},
    "text_encoder": {"name": "bigru", "word_dim": 16},
    "vocab_size": 40,
    "embed_dim": 32,
    "n_reasoning_blocks": 2,
    "decoder_word_dim": 16,
    "decoder_hidden_dim": 32,
    "lr": 3e-3,
    "lr_decay_epochs": None,
}


@register_method("vsrpp", tiny_config=TINY)
class VSRPP(RetrievalModule):
    """Global (VSRN reasoning + GRU) and local (SCAN) similarity, fused; triplet + caption loss."""

    image_rep_keys = ("global", "regions")
    text_rep_keys = ("global", "words", "lengths")

    def __init__(
        self,
        mu: float = 2.0,
        n_reasoning_blocks: int = 4,
        local_branch: str = "t2i",
        local_regions: str = "reasoned",
        lambda1: float | None = None,
        lambda2: float | None = None,
        agg: str = "lse",
        caption_weight: float = 1.0,
        decoder_word_dim: int = 300,
        decoder_hidden_dim: int = 512,
        text_encoder: str | dict[str, Any] = "bigru",
        **kwargs: Any,
    ) -> None:
        check_choice("local_branch", local_branch, LOCAL_BRANCHES)
        check_choice("local_regions", local_regions, LOCAL_REGIONS)
        check_choice("agg", agg, ("lse", "mean"))
        super().__init__(text_encoder=text_encoder, **kwargs)
        dim = int(self.hparams.embed_dim)
        self.reasoning = RegionReasoning(dim, n_blocks=int(n_reasoning_blocks))
        self.decoder: AttentionCaptionDecoder | None = None
        if caption_weight:
            vocab_size = self.hparams.vocab_size
            if not vocab_size:
                raise ValueError(
                    f"Method 'vsrpp' with caption_weight={caption_weight} needs `vocab_size` for its caption "
                    f"decoder, but got {vocab_size!r}; pass the data module's vocab_size or set caption_weight: 0."
                )
            self.decoder = AttentionCaptionDecoder(int(vocab_size), dim, decoder_word_dim, decoder_hidden_dim)
        # SCAN's published defaults per direction (Flickr30k): t2i 9 / 6, i2t 4 / 5.
        defaults = {"t2i": (9.0, 6.0), "i2t": (4.0, 5.0)}[local_branch]
        self._lambda1 = float(lambda1 if lambda1 is not None else defaults[0])
        self._lambda2 = float(lambda2 if lambda2 is not None else defaults[1])

    # ------------------------------------------------------------------------------------ encoding
    def _encode_image_full(self, images: Tensor) -> dict[str, Tensor]:
        """All image features: raw (B, R, D), reasoned (B, R, D), global (B, D), l2-normalised."""
        raw = F.normalize(self.image_encoder(images)["local"], dim=-1, eps=HEAD_NORM_EPS)  # (B, R, D)
        reasoned, vec = self.reasoning(raw)
        return {"raw": raw, "reasoned": reasoned, "global": F.normalize(vec, dim=-1, eps=HEAD_NORM_EPS)}

    def encode_image(self, images: Tensor) -> dict[str, Tensor]:
        """images (B, 3, H, W) -> {'global': (B, D), 'regions': (B, R, D)} for the two branches."""
        full = self._encode_image_full(images)
        return {"global": full["global"], "regions": full[self.hparams.local_regions]}

    def encode_text(self, tokens: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """tokens (B, L) -> {'global': (B, D), 'words': (B, L, D), 'lengths': (B,)}, l2-normalised."""
        out = self.text_encoder(tokens, lengths)
        return {"global": F.normalize(out["global"], dim=-1, eps=HEAD_NORM_EPS),
                "words": F.normalize(out["words"], dim=-1, eps=HEAD_NORM_EPS), "lengths": out["lengths"]}

    # ------------------------------------------------------------------------------------ similarity
    def local_similarity(self, image_reps: dict[str, Tensor], text_reps: dict[str, Tensor]) -> Tensor:
        """S_L (N_img, N_txt): SCAN cross attention, in blocks bounded by ``memory_budget_mb``."""
        regions, words = image_reps["regions"], text_reps["words"]
        scan = scan_t2i if self.hparams.local_branch == "t2i" else scan_i2t
        fn = functools.partial(scan, lambda1=self._lambda1, lambda2=self._lambda2, agg=self.hparams.agg)
        per_pair = default_bytes_per_pair(regions, words, SCAN_BYTES_FACTOR)
        return chunked_scores(fn, regions, words, text_reps["lengths"],
                              memory_budget_mb=float(self.hparams.memory_budget_mb), bytes_per_pair=per_pair,
                              by_length=not torch.is_grad_enabled())  # evaluation: no work on padding

    def global_similarity(self, image_reps: dict[str, Tensor], text_reps: dict[str, Tensor]) -> Tensor:
        """S_G (N_img, N_txt): cosine of the reasoned image vector and the sentence vector."""
        return cosine_sim(image_reps["global"], text_reps["global"])

    def similarity(self, image_reps: dict[str, Tensor], text_reps: dict[str, Tensor]) -> Tensor:
        """S = S_G + mu * S_L (N_img, N_txt)."""
        return self.global_similarity(image_reps, text_reps) + float(self.hparams.mu) * self.local_similarity(
            image_reps, text_reps)

    # ------------------------------------------------------------------------------------ training
    def caption_loss(self, reasoned: Tensor, tokens: Tensor, lengths: Tensor, reduction: str = "mean") -> Tensor:
        """NLL of each caption given its image's reasoned regions (B, R, D), teacher forcing: the mean over the
        batch's valid tokens, or (``reduction="caption_sum"``) each caption's (B,) sum over its tokens."""
        assert self.decoder is not None
        logits = self.decoder(reasoned, tokens[:, :-1])  # (B, L-1, V): predicts tokens 1..L-1
        targets, target_lengths = tokens[:, 1:], (lengths - 1).clamp(min=1)
        if reduction == "caption_sum":
            return caption_nll_loss(logits, targets, target_lengths, reduction="none").sum(dim=1)
        return caption_nll_loss(logits, targets, target_lengths, reduction=reduction)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        from rcit_bench.models.global_batch import world_size

        full = self._encode_image_full(batch["images"])
        img = {"global": full["global"], "regions": full[self.hparams.local_regions]}
        txt = self.encode_text(batch["tokens"], batch["lengths"])
        # one process: the token mean as before (bit-identical); several: every rank's sums and token counts
        distributed = self.decoder is not None and world_size() > 1
        cap: dict[str, Tensor] = {}
        if distributed:
            cap = {"nll_sum": self.caption_loss(full["reasoned"], batch["tokens"], batch["lengths"], "caption_sum"),
                   "tokens": (batch["lengths"] - 1).clamp(min=1).to(torch.float32)}
        img, txt, cap = self.global_batch(img, txt, cap)
        loss = self.triplet(self.similarity(img, txt))
        logs: dict[str, Tensor | float] = {"triplet": loss.detach()}
        if self.decoder is not None:
            if distributed:
                nll = cap["nll_sum"].sum() / cap["tokens"].sum()
            else:
                nll = self.caption_loss(full["reasoned"], batch["tokens"], batch["lengths"])
            loss = loss + float(self.hparams.caption_weight) * nll
            logs["caption_nll"] = nll.detach()
        return loss, logs
