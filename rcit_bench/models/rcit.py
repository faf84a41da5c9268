"""RCIT: Kim, Shin, Shim, "Deep Learning for Corrupted Image-Text Matching".

VSE-style encoders shared by a clean image I, its corrupted copy CI and the caption T, trained with
``L = L(CI, T) + L(I, T) + L(CI, I)``, each the bidirectional triplet hinge (hardest negative). The
corruption used for CI (e.g. speckle / salt-and-pepper at rate 0.6) is chosen by the data module
(``train_corruption: paired`` + ``corruption_mix``) and recorded here as ``data_config``. At
evaluation the model is a plain VSE model: cosine of the global vectors.

Clean and corrupted images go through the shared encoder together on each rank's slice (its BatchNorm statistics
cover both views; under DDP those of the whole global batch, rcit_bench.models.global_batch), and the three
triplets run on the gathered clean images, corrupted images and captions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rcit_bench.models.base import RetrievalModule
from rcit_bench.models.registry import register_method
from rcit_bench.models.similarity import cosine_sim
from rcit_bench.models.vsepp import TINY as _VSEPP_TINY

__all__ = ["RCIT"]


@register_method("rcit", tiny_config=dict(_VSEPP_TINY))
class RCIT(RetrievalModule):
    """Triplet losses over (corrupted image, text), (clean image, text), (corrupted, clean image)."""

    needs_paired_views = True

    def __init__(self, weight_ci_t: float = 1.0, weight_i_t: float = 1.0, weight_ci_i: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        if "corrupted_images" not in batch:
            raise ValueError(
                "Method 'rcit' needs batches with `corrupted_images`: set the data option "
                "`train_corruption: paired` (with a `corruption_mix`)."
            )
        images, corrupted = batch["images"], batch["corrupted_images"]
        b = images.shape[0]
        both = self.encode_image(torch.cat([images, corrupted], dim=0))  # one pass through shared encoder
        img = {k: v[:b] for k, v in both.items()}
        cimg = {k: v[b:] for k, v in both.items()}
        txt = self.encode_text(batch["tokens"], batch["lengths"])
        img, cimg, txt = self.global_batch(img, cimg, txt)  # the three triplets over the global batch
        l_ci_t = self.triplet(self.similarity(cimg, txt))
        l_i_t = self.triplet(self.similarity(img, txt))
        # (CI, I): same square-diagonal triplet, the clean image plays the caption's role.
        l_ci_i = self.triplet(cosine_sim(cimg["global"], img["global"]), pairs=False)
        hp = self.hparams
        loss = hp.weight_ci_t * l_ci_t + hp.weight_i_t * l_i_t + hp.weight_ci_i * l_ci_i
        return loss, {"loss_ci_t": l_ci_t.detach(), "loss_i_t": l_i_t.detach(), "loss_ci_i": l_ci_i.detach()}
