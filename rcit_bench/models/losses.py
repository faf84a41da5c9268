"""Training losses shared by the methods: VSE++ triplet hinge, gradient reversal (MIIE), caption NLL (VSR++).

Each loss receives features or scores, never a model, so every method reuses the one tested implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rcit_bench.models.layers import lengths_to_mask

#: what :func:`triplet_ranking_loss` returns: 'sum' over the batch (VSE++, the default) or 'none' (one loss per pair)
TRIPLET_REDUCTIONS = ("sum", "none")
#: what :func:`caption_nll_loss` returns: the 'mean' over valid tokens (default), their 'sum', or 'none' (B, T)
CAPTION_NLL_REDUCTIONS = ("mean", "sum", "none")


def triplet_ranking_loss(sims: Tensor, margin: float = 0.2, max_violation: bool = True,
                         reduction: str = "sum") -> Tensor:
    """VSE++ bidirectional hinge loss on a square similarity matrix with matching pairs on the diagonal.

    ``cost_t[i, j] = [margin + S[i, j] - S[i, i]]+`` (row i's anchor vs other columns),
    ``cost_i[i, j] = [margin + S[i, j] - S[j, j]]+`` (column j's anchor vs other rows), diagonal set to 0.
    ``max_violation`` keeps only the hardest negative (max of each row of cost_t and each column of cost_i);
    otherwise all negatives are summed. The result is summed over the batch (not averaged), as in VSE++.

    ``reduction="none"`` returns the (B,) loss of each pair instead: pair i's row-anchor term (row i of cost_t)
    plus its column-anchor term (column i of cost_i), so the per-pair losses sum to the ``"sum"`` result (up to
    float rounding). Small-loss selection (rcit_bench.models.small_loss) ranks pairs by it.

    Works for any square matrix, e.g. (image, text) or (corrupted image, clean image) as in RCIT.
    """
    if sims.ndim != 2 or sims.shape[0] != sims.shape[1]:
        raise ValueError(
            f"Argument `sims` must be a square (B, B) matrix with positives on the diagonal, but got shape "
            f"{tuple(sims.shape)}."
        )
    if sims.shape[0] == 0:
        raise ValueError("Argument `sims` must not be empty.")
    if reduction not in TRIPLET_REDUCTIONS:
        raise ValueError(f"Argument `reduction` must be one of {', '.join(map(repr, TRIPLET_REDUCTIONS))}, but got "
                         f"{reduction!r}; use 'none' for the (B,) per-pair losses.")
    diag = sims.diagonal().unsqueeze(1)  # (B, 1)
    cost_t = (margin + sims - diag).clamp(min=0)  # (B, B) row anchors
    cost_i = (margin + sims - diag.t()).clamp(min=0)  # (B, B) column anchors
    eye = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    cost_t = cost_t.masked_fill(eye, 0)
    cost_i = cost_i.masked_fill(eye, 0)
    if reduction == "none":
        if max_violation:
            return cost_t.max(dim=1).values + cost_i.max(dim=0).values
        return cost_t.sum(dim=1) + cost_i.sum(dim=0)
    # "sum": the very expressions used before `reduction` existed, so every method's loss stays bit-identical
    if max_violation:
        return cost_t.max(dim=1).values.sum() + cost_i.max(dim=0).values.sum()
    return cost_t.sum() + cost_i.sum()


class GradientReversal(torch.autograd.Function):
    """Identity forward, ``-lambd * grad`` backward: the encoders learn to fool the modality classifier."""

    @staticmethod
    def forward(ctx, x: Tensor, lambd: float) -> Tensor:  # type: ignore[override]
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return -ctx.lambd * grad_output, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """Apply :class:`GradientReversal` with strength ``lambd`` (see :func:`grl_lambda` for the usual schedule)."""
    return GradientReversal.apply(x, lambd)


def grl_lambda(progress: float) -> float:
    """DANN schedule ``2 / (1 + exp(-10 p)) - 1``: 0 at the start of training, ~1 at the end (p in [0, 1])."""
    p = float(progress)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"Argument `progress` must be the training progress in [0, 1], but got {progress!r}.")
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


def modality_adversarial_loss(logits_img: Tensor, logits_txt: Tensor) -> tuple[Tensor, Tensor]:
    """BCE-with-logits of a modality classifier (image = 1, text = 0), averaged over all samples.

    Args:
        logits_img: (B_img,) or (B_img, 1) classifier logits for image embeddings.
        logits_txt: (B_txt,) or (B_txt, 1) logits for text embeddings.
    Returns ``(loss, accuracy)``; accuracy is a detached float tensor in [0, 1] (chance 0.5 = encoders win).
    """
    for arg, t in (("logits_img", logits_img), ("logits_txt", logits_txt)):
        if not (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1)):
            raise ValueError(f"Argument `{arg}` must have shape (B,) or (B, 1), but got {tuple(t.shape)}.")
    logits = torch.cat([logits_img.reshape(-1), logits_txt.reshape(-1)])  # (B_img + B_txt,)
    labels = torch.cat([torch.ones_like(logits_img.reshape(-1)), torch.zeros_like(logits_txt.reshape(-1))])
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    accuracy = ((logits.detach() > 0).to(labels.dtype) == labels).float().mean()
    return loss, accuracy


def caption_nll_loss(logits: Tensor, targets: Tensor, lengths: Tensor, reduction: str = "mean") -> Tensor:
    """Mean negative log-likelihood over the valid tokens (``t < lengths[b]``) of a batch of decoded captions.

    Args:
        logits: (B, T, V) unnormalised decoder outputs.
        targets: (B, T) int token ids to predict; entries at ``t >= lengths[b]`` (padding) are ignored.
        lengths: (B,) number of valid target tokens per caption, in [1, T].
        reduction: ``"mean"`` (default) over all valid tokens; ``"sum"`` of them; ``"none"``: the (B, T) token NLL,
            0 at padding (``.sum(1)`` gives per-caption sums). Why the last two: under DDP the mean over the global
            batch is the sum of every rank's sums over the sum of its token counts (``lengths``), not a mean of means.
    """
    if reduction not in CAPTION_NLL_REDUCTIONS:
        raise ValueError(f"Argument `reduction` must be one of {', '.join(map(repr, CAPTION_NLL_REDUCTIONS))}, but got "
                         f"{reduction!r}.")
    if logits.ndim != 3:
        raise ValueError(f"Argument `logits` must be (B, T, V), but got shape {tuple(logits.shape)}.")
    b, t, _ = logits.shape
    if targets.shape != (b, t):
        raise ValueError(f"Argument `targets` must be (B, T) = {(b, t)}, but got shape {tuple(targets.shape)}.")
    lengths = torch.as_tensor(lengths, device=logits.device)
    if lengths.shape != (b,):
        raise ValueError(f"Argument `lengths` must be (B,) = ({b},), but got shape {tuple(lengths.shape)}.")
    if bool((lengths < 1).any()) or bool((lengths > t).any()):
        raise ValueError(
            f"Argument `lengths` must be in [1, T={t}], but got values in [{int(lengths.min())}, {int(lengths.max())}]."
        )
    valid = lengths_to_mask(lengths, t)  # (B, T)
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    safe_targets = targets.long().masked_fill(~valid, 0)  # padding may hold any id (e.g. -100)
    nll = -logp.gather(2, safe_targets.unsqueeze(2)).squeeze(2)  # (B, T)
    if reduction == "none":
        return nll.masked_fill(~valid, 0.0)
    if reduction == "sum":
        return nll[valid].sum()
    return nll[valid].mean()
