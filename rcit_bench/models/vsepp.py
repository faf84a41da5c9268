"""VSE++: Faghri, Fleet, Kiros, Fidler, "VSE++: Improving Visual-Semantic Embeddings with Hard
Negatives", BMVC 2018 (reference code: github.com/fartashf/vsepp).

Global image vector (pooled CNN feature map, linear projection), GRU sentence vector (output at the
last word), cosine similarity, bidirectional triplet hinge with the hardest in-batch negative (max
violation), optionally the sum over all negatives for the first ``warmup_epochs`` (VSE-infinity).
Everything is the shared :class:`RetrievalModule` default; the class exists to register the name.
"""

from __future__ import annotations

from typing import Any

from rcit_bench.models.base import RetrievalModule
from rcit_bench.models.registry import register_method

__all__ = ["VSEPP"]

TINY = {
    "image_encoder": {"name": "small_cnn", "input_size": 32, "channels": [8, 16, 32]},
    "text_encoder": {"name": "gru", "word_dim": 16},
    "vocab_size": 40,
    "embed_dim": 32,
    "lr": 3e-3,
    "lr_decay_epochs": None,
    "margin": 0.2,
}


@register_method("vsepp", tiny_config=TINY)
class VSEPP(RetrievalModule):
    """VSE++ (global vectors, cosine, max-violation triplet)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
