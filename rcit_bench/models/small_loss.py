"""Small-loss selection: the robust-training baseline against noisy correspondence (mismatched training pairs).

Why it works: a network fits the true (image, caption) pairs before it memorises the wrong ones, so after a short
warm-up a mismatched pair keeps a larger triplet loss than a true one. NCR (Huang et al., NeurIPS 2021) and DECL
build on this: fit a two-component Gaussian mixture on the per-pair losses and read the posterior of the low-mean
component as the probability that a pair is clean. This module is that shared core, kept apart from any method:

- :func:`fit_two_component_gmm`: the mixture, fitted by EM on min-max normalised losses (no scikit-learn);
- :class:`SmallLossSelector`: the latest per-pair loss of every training caption, one fit per epoch after the
  warm-up, and per-pair weights (the clean posterior: a soft down-weighting of the high-loss component) for the
  next epoch; :class:`rcit_bench.models.base.RetrievalModule` drives it when built with ``small_loss``;
- :func:`selection_quality`: precision and recall of the pairs it flags, for the runner or a benchmark that knows
  which pairs were mismatched (the model itself never sees that mask).

What to expect (benchmarks/noisy_correspondence.py, synthetic set, half the pairs mismatched): the flagged pairs
are nearly all mismatched (precision ~0.96-0.98 at p_clean < 0.5), but only ~55-65% of the mismatched pairs are
flagged: their losses are heavy-tailed, so the mixture's broad high-loss component leaves the moderate ones in
the clean component, where they keep part of their weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rcit_bench.errors import UserError
from rcit_bench.utils import did_you_mean

__all__ = ["GaussianMixture1D", "fit_gaussian_mixture", "fit_two_component_gmm", "SmallLossSelector",
           "selection_quality", "small_loss_options", "SMALL_LOSS_DEFAULTS"]

#: the ``small_loss`` options of a method and their defaults (``small_loss: true`` takes them all)
SMALL_LOSS_DEFAULTS: dict[str, Any] = {
    "warmup_epochs": 1,  # epochs of plain training before the first fit (at least 1: a fit needs an epoch of losses)
    "threshold": 0.5,  # p_clean below it counts as flagged (logged clean fraction; selection_quality's default)
    "min_weight": 0.0,  # floor on a pair's weight: weight = max(p_clean, min_weight)
    "gmm_iters": 20,  # EM iterations per fit (NCR: 10)
    "reg_covar": 5e-4,  # variance floor on the normalised losses (scikit-learn's GaussianMixture default, as NCR)
}

_LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------------------ mixture
@dataclass(frozen=True)
class GaussianMixture1D:
    """A fitted two-component mixture on the normalised losses ``(loss - low) / (high - low)``; component 0 is
    the low-mean (clean) one. Parameters are float64 tensors of shape (2,)."""

    means: Tensor
    variances: Tensor
    weights: Tensor
    low: float
    high: float
    iterations: int

    def normalise(self, losses: Tensor) -> Tensor:
        """Losses on the scale the mixture was fitted on (float64)."""
        return (torch.as_tensor(losses).double() - self.low) / (self.high - self.low)

    def posterior_clean(self, losses: Tensor) -> Tensor:
        """(N,) float32 posterior probability of the low-mean component for each loss."""
        return _responsibilities(self.normalise(losses).reshape(-1), self.means, self.variances,
                                 self.weights)[0][:, 0].float()


def _responsibilities(x: Tensor, means: Tensor, variances: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """E-step in the log domain (no underflow far in a tail): (N, 2) posteriors and the mean log-likelihood."""
    log_p = (weights.log() - 0.5 * (_LOG_2PI + variances.log())
             - 0.5 * (x[:, None] - means) ** 2 / variances)  # (N, 2) log pi_k N(x | mu_k, var_k)
    log_norm = torch.logsumexp(log_p, dim=1, keepdim=True)
    return (log_p - log_norm).exp(), log_norm.mean()


def _check_losses(losses: Tensor) -> Tensor:
    x = torch.as_tensor(losses)
    if x.ndim != 1:
        raise ValueError(f"Argument `losses` must be a 1-D tensor of per-pair losses, but got shape {tuple(x.shape)}.")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"Argument `losses` must be finite, but {int((~torch.isfinite(x)).sum())} of {x.numel()} "
                         f"values are NaN or infinite; fit on the losses of finished training steps only.")
    return x


def fit_gaussian_mixture(losses: Tensor, iters: int = 20, reg_covar: float = 5e-4,
                         tol: float = 1e-6) -> GaussianMixture1D | None:
    """Fit a two-component 1-D Gaussian mixture by EM; None when the input cannot be split (fewer than 2 values
    or all equal).

    The losses are min-max normalised first (as NCR does), so ``reg_covar``, added to both variances after every
    M-step, is a floor relative to the loss range and a component never collapses onto one value. The start is
    deterministic: means at the 0.25 / 0.75 quantiles (min / max when those coincide), both variances the overall
    variance, equal weights. EM stops after `iters` iterations or when the mean log-likelihood moves less than
    `tol`.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"Argument `iters` must be an integer >= 1, but got {iters!r}.")
    if not float(reg_covar) > 0:
        raise ValueError(f"Argument `reg_covar` must be > 0 (a variance floor), but got {reg_covar!r}.")
    x = _check_losses(losses).detach().double().cpu()
    if x.numel() < 2:
        return None
    low, high = float(x.min()), float(x.max())
    if not high > low:
        return None
    x = (x - low) / (high - low)
    means = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=torch.float64))
    if not bool(means[1] > means[0]):
        means = torch.tensor([0.0, 1.0], dtype=torch.float64)
    variances = (x.var(unbiased=False) + reg_covar).repeat(2)
    weights = torch.full((2,), 0.5, dtype=torch.float64)
    tiny = 10 * torch.finfo(torch.float64).eps  # keeps an emptied component's mean defined
    previous = -math.inf
    done = 0
    for done in range(1, iters + 1):
        resp, loglik = _responsibilities(x, means, variances, weights)
        counts = resp.sum(dim=0) + tiny  # (2,)
        means = (resp * x[:, None]).sum(dim=0) / counts
        variances = (resp * (x[:, None] - means) ** 2).sum(dim=0) / counts + reg_covar
        weights = counts / counts.sum()
        if abs(float(loglik) - previous) < tol:
            break
        previous = float(loglik)
    order = torch.argsort(means)  # component 0 = the low-mean (clean) one
    return GaussianMixture1D(means[order], variances[order], weights[order], low, high, done)


def fit_two_component_gmm(losses: Tensor, iters: int = 20, reg_covar: float = 5e-4, tol: float = 1e-6) -> Tensor:
    """(N,) float32 posterior probability that each loss belongs to the low-mean (clean) component of a
    two-component Gaussian mixture fitted by EM (:func:`fit_gaussian_mixture`); all ones when the losses cannot be
    split (fewer than 2 values, or all equal): no evidence against any pair."""
    x = _check_losses(losses)
    fit = fit_gaussian_mixture(x, iters=iters, reg_covar=reg_covar, tol=tol)
    if fit is None:
        return torch.ones(x.numel(), dtype=torch.float32, device=x.device)
    return fit.posterior_clean(x.detach().cpu()).to(x.device)


# ------------------------------------------------------------------------------------------------ options
def small_loss_options(value: bool | dict[str, Any] | None, arg: str = "small_loss") -> dict[str, Any] | None:
    """A method's ``small_loss`` argument (plain YAML) as a complete options dict, or None when off.

    ``None`` / ``false``: off; ``true``: :data:`SMALL_LOSS_DEFAULTS`; a mapping overrides some of them. A bad
    key or value is a UserError naming it and what is allowed."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(SMALL_LOSS_DEFAULTS)
    if not isinstance(value, dict):
        raise UserError(f"Argument `{arg}` must be true, false or a mapping of options "
                        f"({', '.join(SMALL_LOSS_DEFAULTS)}), but got {value!r}.")
    allowed = list(SMALL_LOSS_DEFAULTS)
    for key in value:
        if key not in SMALL_LOSS_DEFAULTS:
            raise UserError(f"Unknown key {key!r} in argument `{arg}`; allowed keys: {', '.join(allowed)}."
                            f"{did_you_mean(str(key), allowed)}")
    opts = {**SMALL_LOSS_DEFAULTS, **value}
    warm, iters = opts["warmup_epochs"], opts["gmm_iters"]
    if isinstance(warm, bool) or not isinstance(warm, int) or warm < 1:
        raise UserError(f"`{arg}.warmup_epochs` must be an integer >= 1 (the first fit needs one epoch of losses), "
                        f"but got {warm!r}.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise UserError(f"`{arg}.gmm_iters` must be an integer >= 1, but got {iters!r}.")
    for key, lo, hi, closed in (("threshold", 0.0, 1.0, False), ("min_weight", 0.0, 1.0, True)):
        v = opts[key]
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (
            lo <= v <= hi if closed else lo < v < hi)
        if not ok:
            span = f"[{lo}, {hi}]" if closed else f"({lo}, {hi})"
            raise UserError(f"`{arg}.{key}` must be a number in {span}, but got {v!r}.")
        opts[key] = float(v)
    rc = opts["reg_covar"]
    if isinstance(rc, bool) or not isinstance(rc, (int, float)) or not rc > 0:
        raise UserError(f"`{arg}.reg_covar` must be a number > 0 (a variance floor on losses scaled to [0, 1]), "
                        f"but got {rc!r}.")
    opts["reg_covar"] = float(rc)
    return opts


# ------------------------------------------------------------------------------------------------ selector
class SmallLossSelector:
    """Per-caption memory of the latest per-pair loss, one mixture fit per epoch, per-pair weights.

    Why per caption: a training pair is a caption with the image it is paired with (``caption_index`` of the
    batch), so the caption index names the pair. Storage grows with the largest index seen; a caption never seen
    (or seen only after the last fit) keeps its previous weight, 1 at first. The weight of a pair is
    ``max(p_clean, min_weight)``: a soft down-weighting of the pairs the mixture puts in the high-loss component.

    Timing: losses are recorded during epoch e; once ``e + 1 >= warmup_epochs`` the mixture is fitted at the end of
    epoch e (:meth:`end_epoch`) and its posteriors weight epoch e + 1. :meth:`catch_up` at the start of an epoch
    makes a missing fit happen then, from the same recorded losses (a checkpoint written after the epoch's last
    step but before the fit, as Lightning's ModelCheckpoint does when it saves on validation end), so a resumed
    run continues identically.
    """

    def __init__(self, warmup_epochs: int = 1, threshold: float = 0.5, min_weight: float = 0.0,
                 gmm_iters: int = 20, reg_covar: float = 5e-4) -> None:
        opts = small_loss_options(dict(warmup_epochs=warmup_epochs, threshold=threshold, min_weight=min_weight,
                                       gmm_iters=gmm_iters, reg_covar=reg_covar))
        assert opts is not None
        self.options = opts
        self.losses = torch.zeros(0, dtype=torch.float32)  # latest per-pair loss of each caption
        self.stamps = torch.zeros(0, dtype=torch.long)  # 1 + epoch of that loss; 0 = never seen
        self.p_clean = torch.ones(0, dtype=torch.float32)  # posterior of the clean component at the last fit
        self.fitted_epoch = -1  # the epoch whose losses the last fit used; -1 = none yet
        self._n = 0  # captions indexed so far (largest index + 1); the tensors may be longer (growth by doubling)

    def __len__(self) -> int:
        return self._n

    # ---- recording and weighting
    def _grow(self, n: int) -> None:
        if n <= self._n:
            return
        capacity = int(self.losses.numel())
        if n > capacity:  # doubling: a first epoch over N captions copies O(N) in all, not O(N^2 / batch)
            extra = max(n, 2 * capacity) - capacity
            self.losses = torch.cat([self.losses, torch.zeros(extra, dtype=torch.float32)])
            self.stamps = torch.cat([self.stamps, torch.zeros(extra, dtype=torch.long)])
            self.p_clean = torch.cat([self.p_clean, torch.ones(extra, dtype=torch.float32)])
        self._n = n

    @staticmethod
    def _index(index: Tensor) -> Tensor:
        idx = torch.as_tensor(index).detach().reshape(-1).long().cpu()
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"Argument `index` must hold caption indices >= 0, but got {int(idx.min())}.")
        return idx

    def record(self, index: Tensor, losses: Tensor, epoch: int) -> None:
        """Remember the (B,) per-pair `losses` of the captions `index` (B,) seen in `epoch` (a caption recorded twice
        in one call, as DDP's padding can do within a step, keeps one of its two losses)."""
        idx = self._index(index)
        values = torch.as_tensor(losses).detach().reshape(-1).float().cpu()
        if values.shape != idx.shape:
            raise ValueError(f"Arguments `index` and `losses` must have one entry per pair, but got {idx.numel()} "
                             f"indices and {values.numel()} losses.")
        if not idx.numel():
            return
        self._grow(int(idx.max()) + 1)
        self.losses[idx] = values
        self.stamps[idx] = int(epoch) + 1

    def weights(self, index: Tensor) -> Tensor:
        """(B,) float32 weights of the captions `index`, on `index`'s device: 1 before the first fit and for
        captions the fits have not seen."""
        idx = self._index(index)
        out = torch.ones(idx.numel(), dtype=torch.float32)
        known = idx < len(self)
        out[known] = self.p_clean[idx[known]].clamp(min=self.options["min_weight"])
        return out.to(torch.as_tensor(index).device)

    # ---- fitting
    def due(self, epoch: int) -> bool:
        """Whether the end of `epoch` is followed by a fit (the warm-up is over) that has not happened yet."""
        return int(epoch) + 1 >= self.options["warmup_epochs"] and self.fitted_epoch < int(epoch)

    def end_epoch(self, epoch: int) -> bool:
        """Fit the mixture on the recorded losses at the end of `epoch` when due; True when it fitted."""
        if not self.due(epoch):
            return False
        self.fit()
        self.fitted_epoch = int(epoch)
        return True

    def catch_up(self, epoch: int) -> bool:
        """At the start of `epoch`: make the fit the end of the previous epoch owed, if it did not happen."""
        return int(epoch) >= 1 and self.end_epoch(int(epoch) - 1)

    def fit(self) -> None:
        """Posterior of the clean component for every seen caption, from its latest loss."""
        seen = self.stamps[: self._n] > 0
        if int(seen.sum()) == 0:
            return
        p = self.p_clean[: self._n]  # a view: the assignment below writes into self.p_clean
        p[seen] = fit_two_component_gmm(self.losses[: self._n][seen], iters=self.options["gmm_iters"],
                                        reg_covar=self.options["reg_covar"])

    # ---- reading
    def posterior(self) -> tuple[Tensor, Tensor]:
        """(p_clean, seen): the clean posterior of the last fit (1 where none) and which captions have a recorded
        loss, both (N,) over the captions indexed so far (copies)."""
        return self.p_clean[: self._n].clone(), self.stamps[: self._n] > 0

    def summary(self) -> dict[str, float]:
        """Over the seen captions: the fraction with p_clean >= threshold and the mean weight of the next epoch."""
        p, seen = self.posterior()
        if not bool(seen.any()):
            return {"clean_fraction": 1.0, "mean_weight": 1.0}
        p = p[seen]
        return {"clean_fraction": float((p >= self.options["threshold"]).float().mean()),
                "mean_weight": float(p.clamp(min=self.options["min_weight"]).mean())}

    # ---- checkpointing (tensors and plain types only: loads with weights_only=True)
    def state_dict(self) -> dict[str, Any]:
        n = self._n
        return {"version": 1, "losses": self.losses[:n].clone(), "stamps": self.stamps[:n].clone(),
                "p_clean": self.p_clean[:n].clone(), "fitted_epoch": int(self.fitted_epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"Small-loss state of version {state.get('version')!r} cannot be read (expected 1); "
                             f"the checkpoint was written by another version of rcit_bench.")
        n = int(state["losses"].numel())
        if state["stamps"].shape != (n,) or state["p_clean"].shape != (n,):
            raise ValueError(f"Small-loss state is inconsistent: losses {tuple(state['losses'].shape)}, stamps "
                             f"{tuple(state['stamps'].shape)}, p_clean {tuple(state['p_clean'].shape)}.")
        self.losses = state["losses"].detach().float().cpu().clone()
        self.stamps = state["stamps"].detach().long().cpu().clone()
        self.p_clean = state["p_clean"].detach().float().cpu().clone()
        self.fitted_epoch = int(state["fitted_epoch"])
        self._n = n


# ------------------------------------------------------------------------------------------------ scoring
def selection_quality(p_clean: Tensor, seen: Tensor, mismatched: Tensor,
                      threshold: float = 0.5) -> dict[str, float | int]:
    """How well ``p_clean < threshold`` flags the mismatched pairs, among the seen captions.

    Args:
        p_clean, seen: (N,) clean posterior and seen mask, e.g. from ``RetrievalModule.small_loss_posterior()``.
        mismatched: (M,) bool, M >= N: which training captions are paired with another image
            (``RetrievalDataModule.mismatched_captions()``); captions past N were never seen and are left out.
        threshold: a pair is flagged as mismatched when its p_clean is below it.
    Returns precision (flagged pairs that are mismatched; 0 when none is flagged), recall (mismatched pairs that
    are flagged; 0 when none was seen), and the counts ``seen``, ``flagged``, ``mismatched`` (seen ones) and
    ``true_positives``.
    """
    p = torch.as_tensor(p_clean).detach().reshape(-1).float().cpu()
    s = torch.as_tensor(seen).detach().reshape(-1).bool().cpu()
    m = torch.as_tensor(mismatched).detach().reshape(-1).bool().cpu()
    if s.shape != p.shape:
        raise ValueError(f"Arguments `p_clean` and `seen` must have the same length, but got {p.numel()} and "
                         f"{s.numel()}.")
    if m.numel() < p.numel():
        raise ValueError(f"Argument `mismatched` covers {m.numel()} captions but `p_clean` has {p.numel()}; pass the "
                         f"mask of the whole training split (RetrievalDataModule.mismatched_captions()).")
    m = m[: p.numel()] & s
    flagged = (p < float(threshold)) & s
    tp = int((flagged & m).sum())
    n_flag, n_mis = int(flagged.sum()), int(m.sum())
    return {"precision": tp / n_flag if n_flag else 0.0, "recall": tp / n_mis if n_mis else 0.0,
            "seen": int(s.sum()), "flagged": n_flag, "mismatched": n_mis, "true_positives": tp}
