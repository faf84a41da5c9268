"""Reusable blocks for the methods: VSRN region reasoning, an attention caption decoder, the length mask.

References:
- VSRN: Li et al., "Visual Semantic Reasoning for Image-Text Matching", ICCV 2019
  (reference code: github.com/KunpengLi1994/VSRN, ``Rs_GCN`` and ``EncoderImagePrecompAttn``).
- VSR++: Yuan et al., ICPR 2020, which reuses the VSRN reasoning encoder and caption loss.

Each block lives here once so that `vsrpp` (and any later method) builds on the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReasoningBlock", "RegionReasoning", "AttentionCaptionDecoder", "gru_last_state", "lengths_to_mask",
           "HEAD_NORM_EPS"]

#: eps of ``F.normalize`` in the methods' heads (VSR++, Matchmap, the reasoning blocks); see
#: :func:`rcit_bench.models.similarity.l2norm` for why the scorers normalise differently.
HEAD_NORM_EPS = 1e-8


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """lengths (B,) -> bool mask (B, max_len), True at the valid positions ``t < lengths[b]`` (on lengths' device)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def gru_last_state(rnn: nn.GRU, x: Tensor) -> Tensor:
    """Last hidden state (B, H) of a one-layer unidirectional batch-first ``nn.GRU`` over x (B, T, D).

    On CPU, autograd through ``nn.GRU`` selects each time step from the whole input and its backward
    allocates and adds a full-size zero tensor per step (quadratic in T: 64 grid regions made one
    VSR++ step take over a minute). Here the input projection is one matmul and the steps are
    ``unbind`` views, whose backward is a single stack. Same equations and weights as ``nn.GRU``;
    on accelerators the fused kernel is used.
    """
    if rnn.num_layers != 1 or rnn.bidirectional or not rnn.batch_first:
        raise ValueError("gru_last_state supports a one-layer, unidirectional, batch_first nn.GRU.")
    if x.device.type != "cpu":
        return rnn(x)[1][-1]
    h = x.new_zeros(x.shape[0], rnn.hidden_size)  # (B, H)
    gates_x = F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0)  # (B, T, 3H) in PyTorch's (r, z, n) order
    for gx in gates_x.unbind(1):
        gh = F.linear(h, rnn.weight_hh_l0, rnn.bias_hh_l0)  # (B, 3H)
        xr, xz, xn = gx.chunk(3, dim=1)
        hr, hz, hn = gh.chunk(3, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
    return h


class ReasoningBlock(nn.Module):
    """One VSRN graph-reasoning block over region features.

    ``R = theta(V)^T phi(V) / N`` is a fully connected region graph (N regions) and
    ``V* = W_r(R g(V)) + V``. ``W_r`` is a 1x1 conv followed by BatchNorm whose affine weight and
    bias start at zero, so a fresh block is the identity and stacking blocks cannot hurt at init.
    """

    def __init__(self, dim: int, inter_dim: int | None = None) -> None:
        super().__init__()
        inter_dim = inter_dim or dim
        self.theta = nn.Conv1d(dim, inter_dim, kernel_size=1)
        self.phi = nn.Conv1d(dim, inter_dim, kernel_size=1)
        self.g = nn.Conv1d(dim, inter_dim, kernel_size=1)
        self.w_r = nn.Sequential(nn.Conv1d(inter_dim, dim, kernel_size=1), nn.BatchNorm1d(dim))
        nn.init.zeros_(self.w_r[1].weight)
        nn.init.zeros_(self.w_r[1].bias)

    def forward(self, regions: Tensor) -> Tensor:
        """regions (B, N, D) -> reasoned regions (B, N, D)."""
        v = regions.transpose(1, 2)  # (B, D, N)
        n = v.shape[-1]
        theta = self.theta(v)  # (B, Di, N)
        phi = self.phi(v)  # (B, Di, N)
        g = self.g(v)  # (B, Di, N)
        relation = theta.transpose(1, 2) @ phi / n  # (B, N, N)
        y = g @ relation.transpose(1, 2)  # (B, Di, N): y[:, :, i] = sum_j R[i, j] g[:, :, j]
        return (self.w_r(y) + v).transpose(1, 2)


class RegionReasoning(nn.Module):
    """VSRN image head: `n_blocks` reasoning blocks, l2-normalise (``F.normalize``), a GRU over regions.

    The GRU's last hidden state is the global image vector (not normalised here; the caller decides).
    Returns ``(reasoned (B, N, D), global (B, D))``; the reasoned regions also feed the caption decoder.
    """

    def __init__(self, dim: int, n_blocks: int = 4) -> None:
        super().__init__()
        if n_blocks < 0:
            raise ValueError(f"Argument `n_blocks` must be >= 0, but got {n_blocks}.")
        self.blocks = nn.ModuleList(ReasoningBlock(dim) for _ in range(n_blocks))
        self.rnn = nn.GRU(dim, dim, batch_first=True)

    def forward(self, regions: Tensor) -> tuple[Tensor, Tensor]:
        """regions (B, N, D) -> (reasoned (B, N, D) l2-normalised, global (B, D))."""
        x = regions
        for block in self.blocks:
            x = block(x)
        x = F.normalize(x, dim=-1, eps=HEAD_NORM_EPS)
        return x, gru_last_state(self.rnn, x)


class AttentionCaptionDecoder(nn.Module):
    """GRU caption decoder with (Luong, global) attention over region features, for teacher forcing.

    The GRU state starts from the mean region; at each step the GRU output attends over the regions
    (dot product after a linear map) and ``tanh(W [h; context])`` is projected to the vocabulary.
    Attention after the GRU (no input feeding) lets the whole caption be decoded in parallel under
    teacher forcing, which keeps the auxiliary loss cheap on CPU; VSRN's decoder attends before
    the recurrent step, which needs a Python loop over time.
    """

    def __init__(self, vocab_size: int, region_dim: int, word_dim: int = 300, hidden_dim: int = 512,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.init_h = nn.Linear(region_dim, hidden_dim)
        self.rnn = nn.GRU(word_dim, hidden_dim, batch_first=True)
        self.attn = nn.Linear(hidden_dim, region_dim, bias=False)
        self.combine = nn.Linear(hidden_dim + region_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, vocab_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, regions: Tensor, inputs: Tensor) -> Tensor:
        """regions (B, N, Dr), inputs (B, T) token ids (caption without its last token) -> logits (B, T, V).

        Padding positions produce logits too; the loss masks them with the caption lengths.
        """
        h0 = torch.tanh(self.init_h(regions.mean(dim=1))).unsqueeze(0)  # (1, B, H)
        emb = self.dropout(self.embed(inputs))  # (B, T, E)
        out, _ = self.rnn(emb, h0)  # (B, T, H)
        scores = self.attn(out) @ regions.transpose(1, 2)  # (B, T, N)
        context = F.softmax(scores, dim=-1) @ regions  # (B, T, Dr)
        fused = torch.tanh(self.combine(torch.cat([out, context], dim=-1)))  # (B, T, H)
        return self.out(self.dropout(fused))
