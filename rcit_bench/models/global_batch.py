"""Global-batch training under DDP: the multi-process step equals the one-process step on the same global batch.

Why: under DDP (world size W > 1) each rank holds a contiguous slice of the global batch (rank r: rows
``[offset_r, offset_r + b_r)``, in rank order). A loss computed on the slice alone mines VSE++'s hardest negative
among b pairs instead of B, and BatchNorm normalises with slice statistics, so W processes would train another
model than one process on the same batches. Here the ranks exchange what the loss needs:

- :func:`gather_rows` / :func:`gather_reps_with_grad`: every rank's rows concatenated in rank order, on every
  rank. Only this rank's own slot carries gradient (the other slots are detached copies), as open_clip's
  ``ClipLoss`` does with ``gather_with_grad=False``.
- :class:`GlobalBatchNorm`: BatchNorm whose training statistics are over the global batch, through
  differentiable all-reduces (:func:`all_reduce_sum`); ``torch.nn.SyncBatchNorm`` refuses CPU tensors, so gloo
  runs could not use it.

Derivation (why the step is exact). Every rank computes the SAME global loss L on the gathered outputs. Rank r's
backward reaches the parameters only through its own slot, so its gradient g_r is the part of dL/dθ that flows
through its own rows, and ``sum_r g_r = dL/dθ``. DDP AVERAGES gradients over ranks, so the loss handed to
backward is ``W * L`` (the logged loss stays L): the averaged gradient ``(1/W) sum_r W g_r = dL/dθ`` is the
one-process gradient on the global batch. GlobalBatchNorm agrees with this: the backward of its all-reduce (a sum)
sums every rank's upstream gradient with respect to the global statistics, so each rank's rows receive the full
gradient through the statistics plus their own direct term. (A method whose loss stays local, never gathering:
rank r's backward then gives the part of ``sum_s L_s`` through its rows, and DDP's average is the gradient of the
mean of the ranks' local losses, with global BatchNorm statistics; the same holds for ``torch.nn.SyncBatchNorm``.)

Rule for methods: everything with parameters runs on the local slice BEFORE the gather (encoders, a modality
classifier, a caption decoder); the gather takes outputs (embeddings, logits, per-caption loss sums and token
counts); the loss is a parameter-free function of gathered outputs. A parameterised module applied after the
gather would get the whole gradient on every rank and be counted W times.

Without a process group (or with W == 1) everything here is the identity: the same tensors, ``F.batch_norm``.
"""

from __future__ import annotations

import zlib
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from rcit_bench.distributed import get_world_size as world_size  # one definition of the world size, shared

__all__ = ["world_size", "gather_rows", "gather_reps_with_grad", "all_reduce_sum", "GlobalBatchNorm",
           "convert_global_batchnorm"]

#: most dims of a gathered tensor (the shape exchange packs every key's shape into one fixed-width int row)
_MAX_DIMS = 8
#: GlobalBatchNorm sends its value count as (count // split, count % split), both exact in float32
_COUNT_SPLIT = 4096


def gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of `x` concatenated in rank order (see :func:`gather_reps_with_grad`)."""
    return gather_reps_with_grad({"x": x})["x"]


def gather_reps_with_grad(reps: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor's rows from every rank, concatenated in rank order, on every rank.

    Ranks may hold different numbers of rows and differ in later dims (word features (b, L, D) with a per-rank
    L): every tensor is zero-padded to the largest shape over ranks (so padded word positions are zero, as
    ``rcit_bench.evaluation.cat_reps`` pads). This rank's slot is its own tensor padded with ``F.pad``, so the
    gradient reaches it; the other slots are received copies without gradient. Bool tensors travel as uint8 (gloo
    has no bool collectives). All shapes are exchanged with one small int all_gather, then one all_gather per key.
    Every rank must call it with the same keys (same code path). Without a process group (or W == 1) the very
    same tensors are returned (no copy).
    """
    world = world_size()
    if world == 1 or not reps:
        return dict(reps)
    keys = sorted(reps)
    for key in keys:
        value = reps[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"gather_reps_with_grad: reps[{key!r}] must be a Tensor, but got {type(value).__name__}.")
        if value.ndim < 1 or value.ndim > _MAX_DIMS:
            raise ValueError(f"gather_reps_with_grad: reps[{key!r}] must have 1 to {_MAX_DIMS} dims (rows first), "
                             f"but got shape {tuple(value.shape)}.")
    device = reps[keys[0]].device
    # one int64 tensor: per key [ndim, shape...], and a last row naming the keys (a mismatch would hang later)
    meta = torch.zeros(len(keys) + 1, _MAX_DIMS + 1, dtype=torch.long)
    for row, key in enumerate(keys):
        shape = reps[key].shape
        meta[row, 0] = len(shape)
        meta[row, 1:1 + len(shape)] = torch.tensor(shape, dtype=torch.long)
    meta[-1, 0] = zlib.crc32("\0".join(keys).encode())
    meta = meta.to(device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    metas = [m.cpu() for m in metas]
    if any(not torch.equal(m[:, 0], metas[0][:, 0]) for m in metas):
        raise RuntimeError(f"gather_reps_with_grad: ranks passed different keys or dims (this rank: {keys}, "
                           f"dims {[reps[k].ndim for k in keys]}); every rank must gather the same reps.")
    rank = dist.get_rank()
    out: dict[str, Tensor] = {}
    for row, key in enumerate(keys):
        local = reps[key]
        ndim = local.ndim
        shapes = [m[row, 1:1 + ndim].tolist() for m in metas]
        full = [max(s[d] for s in shapes) for d in range(ndim)]
        pad: list[int] = []
        for d in reversed(range(ndim)):  # F.pad lists the last dim first
            pad += [0, full[d] - local.shape[d]]
        padded = F.pad(local, pad) if any(pad) else local
        wire = padded.detach()
        is_bool = wire.dtype == torch.bool
        if is_bool:
            wire = wire.to(torch.uint8)
        parts = [torch.empty(full, dtype=wire.dtype, device=wire.device) for _ in range(world)]
        dist.all_gather(parts, wire.contiguous())
        if is_bool:
            parts = [p.bool() for p in parts]
        parts[rank] = padded  # the differentiable slot
        out[key] = torch.cat([p[:s[0]] for p, s in zip(parts, shapes)])
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the backward sums every rank's upstream gradient (the gradient of
    ``sum_s L_s`` with respect to this rank's input, each rank's ``L_s`` depending on the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.detach().clone().contiguous()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        out = grad.detach().clone().contiguous()
        dist.all_reduce(out)
        return out


def all_reduce_sum(x: Tensor) -> Tensor:
    """Differentiable sum of `x` over the ranks (``torch.distributed.nn.functional.all_reduce`` does the same, but is
    deprecated in recent PyTorch)."""
    return _AllReduceSum.apply(x)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm (1d or 2d: any input (N, C, *)) whose training statistics are over the global batch.

    Same parameters, buffers and state_dict keys as ``nn.BatchNorm1d/2d``, so checkpoints load both ways. In
    training mode under a process group of W > 1: per-channel mean and two-pass (biased) variance of all ranks'
    rows via differentiable all-reduces (:func:`all_reduce_sum`: its backward sums every rank's gradient, see the
    module docstring), running stats updated with the unbiased global variance as
    BatchNorm does. Eval mode or no process group: exactly ``nn.BatchNorm``'s ``F.batch_norm`` (in eval mode
    ranks encode different numbers of batches, so there is never a collective there; without running stats
    eval mode normalises with the local batch). Why not ``torch.nn.SyncBatchNorm``: it refuses CPU tensors.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects an input of shape (N, C, *), but got {tuple(input.shape)}.")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or world_size() == 1:  # eval batches differ per rank: never a collective there
            return super().forward(input)
        factor = 0.0 if self.momentum is None else float(self.momentum)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        shape = [1, c] + [1] * (input.dim() - 2)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input  # stats in >= float32
        local_count = input.numel() // c if c else 0
        # (C + 2,): per-channel sums, then the value count split in two float32-exact parts (exact up to 2^36)
        high, low = divmod(local_count, _COUNT_SPLIT)
        packed = torch.cat([x.sum(dim=dims), x.new_tensor([float(high), float(low)])])
        packed = all_reduce_sum(packed)
        high_low = packed[c:].detach().double().cpu().tolist()
        count = high_low[0] * _COUNT_SPLIT + high_low[1]
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{list(input.shape)} per rank ({count:g} values per channel over all ranks).")
        mean = packed[:c] / count
        centred = x - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dim=dims)) / count  # biased, as BatchNorm normalises
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.mul_(1.0 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (count / (count - 1.0))
                self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(input.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` in `module` (in place) by a :class:`GlobalBatchNorm`
    holding the very same parameter and buffer tensors (and train/eval mode); returns `module` (or the new layer
    when `module` itself is one). Layers already converted, and other norms, are left alone."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        new_child = convert_global_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
