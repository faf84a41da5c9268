"""MIIE: Liu, Zhao, Wei, Zheng, Yang, "Modality-Invariant Image-Text Embedding for Image-Sentence
Matching", ACM TOMM 2019.

The VSE triplet baseline plus a modality classifier (an MLP on the l2-normalised joint embedding)
that tells image embeddings (label 1) from text embeddings (label 0). The encoders are trained to
fool it through a gradient reversal layer whose strength follows ``lambda = 2 / (1 + exp(-10 p)) - 1``
over the adversarial part of training (p in [0, 1]). Three stages by epoch:

1. ``warmup_stage_epochs``: triplet only;
2. ``adversarial_stage_epochs``: classifier + reversed encoders (``adv_weight``), with the triplet
   kept at ``adversarial_triplet_weight`` so the embedding does not drift;
3. the remaining epochs: joint fine-tuning, triplet + ``joint_adv_weight`` (smaller) adversarial.

The paper's claim is that the embedding becomes modality-invariant, i.e. the classifier falls to chance.
``train/modality_acc`` is its per-batch accuracy on the batch it is trained on; ``val/modality_acc`` (percent,
each validation epoch) is its accuracy on the held-out validation embeddings, balanced over the two
modalities (mean of the accuracy on images and on texts), so 50 is chance whatever the image/caption ratio
(5 captions per image) and a classifier answering one modality everywhere scores exactly 50.

Under DDP the classifier (it has parameters) runs on each rank's slice and only its logits are gathered with the
embeddings (``global_batch``, rcit_bench.models.global_batch), so the loss and ``train/modality_acc`` are those of
the global batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from rcit_bench.models.base import RetrievalModule
from rcit_bench.models.registry import register_method
from rcit_bench.models.vsepp import TINY as _VSEPP_TINY

__all__ = ["MIIE"]

TINY = dict(_VSEPP_TINY, warmup_stage_epochs=0, adversarial_stage_epochs=1, classifier_hidden=32)
STAGES = ("warmup", "adversarial", "joint")


@register_method("miie", tiny_config=TINY)
class MIIE(RetrievalModule):
    """Triplet + modality-adversarial training in three stages."""

    def __init__(self, warmup_stage_epochs: int = 1, adversarial_stage_epochs: int = 1, adv_weight: float = 1.0,
                 joint_adv_weight: float = 0.1, adversarial_triplet_weight: float = 1.0,
                 classifier_hidden: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        d = int(self.hparams.embed_dim)
        self.modality_classifier = nn.Sequential(
            nn.Linear(d, classifier_hidden), nn.ReLU(inplace=True), nn.Linear(classifier_hidden, 1)
        )

    def stage(self, epoch: int | None = None) -> str:
        """'warmup', 'adversarial' or 'joint' for `epoch` (default: the current epoch)."""
        epoch = self.current_epoch if epoch is None else int(epoch)
        w, a = int(self.hparams.warmup_stage_epochs), int(self.hparams.adversarial_stage_epochs)
        return STAGES[0] if epoch < w else STAGES[1] if epoch < w + a else STAGES[2]

    def adversarial_progress(self) -> float:
        """Progress p in [0, 1] through the adversarial stages, i.e. the optimizer steps from the end of the
        warm-up stage to the end of training (:meth:`training_progress`); 1 (full strength) without a trainer
        or when Lightning cannot know the length of training."""
        trainer = self._trainer
        if trainer is None or not math.isfinite(trainer.estimated_stepping_batches):
            return 1.0
        return self.training_progress(start_epoch=int(self.hparams.warmup_stage_epochs))

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        from rcit_bench.models.losses import grad_reverse, grl_lambda, modality_adversarial_loss

        img = self.encode_image(batch["images"])
        txt = self.encode_text(batch["tokens"], batch["lengths"])
        # global_batch is the identity in one process; under DDP the triplet runs on the gathered embeddings (two
        # gathers, to keep the one-process order of operations, whose gradients are then bit-identical to before)
        glob_img, glob_txt = self.global_batch(img, txt)
        triplet = self.triplet(self.similarity(glob_img, glob_txt))
        stage = self.stage()
        # the classifier has parameters, so it runs on this rank's (local) rows; only its logits are gathered
        feats_img = nn.functional.normalize(img["global"], dim=-1)  # (b, D) joint space
        feats_txt = nn.functional.normalize(txt["global"], dim=-1)
        lambd = grl_lambda(self.adversarial_progress()) if stage != "warmup" else 0.0
        logits = {"image": self.modality_classifier(grad_reverse(feats_img, lambd)).squeeze(-1),  # (b,)
                  "text": self.modality_classifier(grad_reverse(feats_txt, lambd)).squeeze(-1)}
        (logits,) = self.global_batch(logits)
        adv, acc = modality_adversarial_loss(logits["image"], logits["text"])
        hp = self.hparams
        if stage == "warmup":
            # the classifier still learns (lambda = 0 stops its gradient reaching the encoders)
            loss = triplet + adv
        elif stage == "adversarial":
            loss = hp.adversarial_triplet_weight * triplet + hp.adv_weight * adv
        else:
            loss = triplet + hp.joint_adv_weight * adv
        logs = {"triplet": triplet.detach(), "adversarial": adv.detach(), "modality_acc": torch.as_tensor(acc).float(),
                "grl_lambda": float(lambd), "stage": float(STAGES.index(stage))}
        return loss, logs

    @torch.no_grad()
    def modality_accuracy(self, image_global: Tensor, text_global: Tensor) -> float:
        """Balanced accuracy (percent) of the modality classifier on global embeddings (N_img, D), (N_txt, D):
        the mean of the accuracy on images (logit > 0 = image, as in training) and on texts."""
        if not len(image_global) or not len(text_global):
            raise ValueError(f"Arguments `image_global` and `text_global` must each hold at least one embedding, "
                             f"but got {len(image_global)} and {len(text_global)}; pass both modalities' "
                             f"embeddings (a balanced accuracy needs images and texts).")
        dtype = self.modality_classifier[0].weight.dtype
        logit_img = self.modality_classifier(nn.functional.normalize(image_global.to(dtype), dim=-1)).squeeze(-1)
        logit_txt = self.modality_classifier(nn.functional.normalize(text_global.to(dtype), dim=-1)).squeeze(-1)
        acc_img = (logit_img > 0).float().mean()
        acc_txt = (logit_txt <= 0).float().mean()
        return float(50.0 * (acc_img + acc_txt))

    def on_validation_epoch_end(self) -> None:
        """Log ``val/modality_acc`` from the validation embeddings the base class collected, before its
        retrieval metrics (super clears the lists). From ``validation_reps`` (under DDP every rank's embeddings,
        gathered, images deduplicated: the same number on every rank; computed once, super reuses them)."""
        reps = self.validation_reps()  # a collective under DDP: every rank calls it, whatever its shard
        if reps is not None:
            self.log("val/modality_acc", self.modality_accuracy(reps[0]["global"], reps[2]["global"]), sync_dist=False)
        super().on_validation_epoch_end()
