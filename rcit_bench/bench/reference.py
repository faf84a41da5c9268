"""Figures the seed papers report (Flickr30k 1K test), shown in leaderboards as a separate table.

These are the papers' own numbers, never results of this suite: the leaderboard prints them under a
"reported by the paper" heading and never mixes them into measured rows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportedRow:
    """One row as reported: R@1/5/10 image-to-text, then text-to-image, RSUM (percent)."""

    method: str
    i2t: tuple[float, float, float]
    t2i: tuple[float, float, float]
    rsum: float
    note: str = ""
    dataset: str = "flickr30k"

    def __post_init__(self) -> None:
        assert abs(sum(self.i2t) + sum(self.t2i) - self.rsum) < 0.15, self  # internal consistency of the table


REPORTED: tuple[ReportedRow, ...] = (
    ReportedRow("VSE++ (ResNet-152 fine-tuned)", (52.9, 80.5, 87.2), (39.6, 70.1, 79.5), 409.8),
    ReportedRow("VSRN (2-model ensemble)", (71.3, 90.6, 96.0), (54.7, 81.8, 88.2), 482.6),
    ReportedRow("VSR++", (72.6, 92.7, 97.2), (56.3, 82.7, 89.0), 490.5),
    ReportedRow("SCAN (ensemble)", (67.4, 90.3, 95.8), (48.6, 77.7, 85.2), 465.0),
    ReportedRow("VSE-infinity (BUTD regions + BiGRU)", (76.5, 94.2, 97.7), (56.4, 83.4, 89.9), 498.1,
                "strongest VSE baseline"),
    ReportedRow("RCIT, corrupted test images", (50.1, 76.8, 84.6), (35.3, 61.5, 72.1), 380.4,
                "speckle or salt-and-pepper, pixel noise rate 0.6"),
    ReportedRow("VSE++ trained on corrupted images, corrupted test", (39.7, 56.6, 61.9), (30.6, 52.3, 59.0), 300.1,
                "same setting (pixel noise rate 0.6)"),
    # RSUM is the sum of the six recalls as published there (78.9 + 94.9 + 98.2 + 58.8 + 83.6 + 90.0)
    ReportedRow("CLIP ViT-B/32 (OpenAI weights), zero-shot", (78.9, 94.9, 98.2), (58.8, 83.6, 90.0), 504.4,
                "pretrained (not trained); open_clip retrieval results table (CLIP_benchmark)"),
)


@dataclass(frozen=True)
class ReportedNoiseRow:
    """A clean-test figure a paper reports for a model trained with a fraction of mismatched training pairs
    (correspondence noise); only figures printed in the paper's text, with the citation."""

    method: str
    citation: str
    dataset: str
    mismatch_rate: float
    rsum: float
    note: str = ""


REPORTED_NOISE: tuple[ReportedNoiseRow, ...] = (
    ReportedNoiseRow("CRCL", "Qin et al., Cross-modal Active Complementary Learning with Self-refining "
                     "Correspondence, NeurIPS 2023 (arXiv 2310.17468)", "flickr30k", 0.8, 412.2,
                     "Flickr30k 1K test, as reported"),
)
