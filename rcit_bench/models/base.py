"""`RetrievalModule`: the LightningModule every matching method subclasses.

Why one base: evaluation needs only ``encode_image``, ``encode_text`` and ``similarity``, so every
method shares one evaluation path (rcit_bench.evaluation), one validation loop, one optimizer setup
and one NaN guard; a method file only says what is specific to its paper.

Hooks for method authors (override what differs, keep the signatures):

- ``image_rep_keys`` / ``text_rep_keys`` (class attributes): which encoder outputs ``encode_image`` /
  ``encode_text`` keep. Image encoders give ``global`` (B, D) and ``local`` (B, R, D); text encoders
  ``global`` (B, D), ``words`` (B, L, D), ``lengths`` (B,). Defaults keep ``global`` only (VSE-style);
  a cross-attention method sets e.g. ``("local",)`` and ``("words", "lengths")``.
- ``encode_image(images) -> dict`` / ``encode_text(tokens, lengths) -> dict``: override to add heads
  (e.g. region reasoning); every value's first dim is the batch. Inference runs them in eval mode.
- ``similarity(image_reps, text_reps) -> (N_img, N_txt)``: default cosine of the ``global`` vectors.
  Cross-attention methods should compute through ``rcit_bench.models.similarity.chunked_scores`` with
  ``self.hparams.memory_budget_mb``.
- ``compute_loss(batch) -> (loss, logs)``: default bidirectional triplet on ``similarity`` of the
  batch (hardest negative, sum over negatives during the first ``warmup_epochs``). ``logs`` values
  are logged as ``train/<key>``.
- ``self.global_batch(*reps_dicts) -> tuple of dicts``: multi-process (DDP) training that equals one process on
  the same global batch (rcit_bench.models.global_batch explains why it is exact). ``compute_loss`` encodes its
  local slice, runs everything with parameters on it, then hands the outputs (reps, logits, per-caption loss sums)
  to ``self.global_batch``, which returns every rank's rows in rank order and marks this step's loss as global;
  the loss must then be a parameter-free function of the gathered outputs, and ``training_step`` hands DDP
  ``world_size * loss`` for backward (DDP averages gradients; the logged loss is the unscaled one). Call it before
  any ``self.triplet(..., pairs=True)``: with ``small_loss`` it also gathers the pair ids. Without a process group
  it returns its arguments unchanged. A method that never calls it keeps a local loss per rank and DDP's plain
  gradient average (a loss over the rank's slice only: hardest negatives mined among b, not B, pairs). Every
  method shipped here calls it. Under DDP (W > 1) ``setup`` also turns every BatchNorm into
  ``GlobalBatchNorm`` (statistics over the global batch; a subclass overriding ``setup`` calls super).
- ``self.triplet(sims, pairs=True)``: the triplet every method calls on its in-batch (B, B) matrix. With
  ``small_loss`` (robust training against mismatched training pairs, rcit_bench.models.small_loss) it becomes
  ``sum_i w_i * loss_i`` over the batch's pairs, ``w_i`` the clean posterior of caption ``caption_index[i]``
  from a two-component Gaussian mixture fitted on the per-pair losses at the end of every epoch after
  ``small_loss.warmup_epochs`` (1 until then), and records the per-pair losses (the mean over the calls of a
  step, e.g. RCIT's corrupted and clean image vs text). Pass ``pairs=False`` for a triplet whose pairs are
  true by construction (RCIT's corrupted vs clean image): never weighted, never recorded. Only ``self.triplet``
  is weighted: MIIE's modality classifier, Matchmap's sampled-impostor loss and VSR++'s caption NLL stay
  unweighted. Without ``small_loss``, ``self.triplet`` is the plain summed triplet.
  ``small_loss_posterior()`` gives (p_clean, seen) per training caption for a runner that scores the selection.
  Under DDP every rank records every rank's pairs (gathered), so all ranks fit the same mixture.
- ``extra_param_groups()``: optional extra optimizer groups; ``backbone_parameters()`` are the image
  backbone parameters scaled by ``backbone_lr_mult`` (0 freezes them).
- ``needs_paired_views`` / ``localizes`` (class attributes, default False): what the method needs from the
  data, read by the spec and the runner instead of the method's name. ``needs_paired_views = True`` (RCIT):
  it trains on a (clean, corrupted) view of every image, so only the 'paired' training regime runs it and its
  batches carry ``corrupted_images``. ``localizes = True`` (Matchmap): it has ``localize_batch(images,
  tokens, lengths) -> (P, L, H, W)`` word heatmaps, so the pointing game evaluates it on datasets with boxes.
- ``zero_shot`` (class attribute, default False): the method is loaded as published and never trained, so only the
  'pretrained' regime runs it (no fit, no checkpoint) and the 'pretrained' regime runs nothing else.
- ``tokenizer_for(model_config) -> str | dict | None`` (classmethod): the tokenizer the captions must go through
  for this model config (the datamodule's ``text_encoder``: a local tokenizer directory or ``{path,
  local_files_only}``), read by the runner so that data and model cannot disagree; None (default): the data option.
- ``image_encoder=None`` / ``text_encoder=None``: the subclass builds its own towers (a pretrained dual encoder).
- ``self.use_max_violation()``, ``self.training_progress(start_epoch=0)`` for schedules: the latter is in
  [0, 1], optimizer steps done over Lightning's ``estimated_stepping_batches`` (right with gradient
  accumulation and ``max_steps``); MIIE's gradient-reversal strength follows it.

Constructor args of subclasses must be plain YAML types (saved with ``save_hyperparameters`` so that
``Method.load_from_checkpoint(path, weights_only=True)`` rebuilds the model).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from rcit_bench.errors import UserError
from rcit_bench.utils import did_you_mean
from rcit_bench.models.registry import SET_BY_METHOD, build_image_encoder, build_text_encoder

__all__ = ["RetrievalModule", "encoder_config"]


def encoder_config(cfg: str | dict[str, Any], arg: str) -> tuple[str, dict[str, Any]]:
    """``'gru'`` or ``{'name': 'gru', **kwargs}`` -> (name, kwargs). The kwargs may not set what the method
    passes the builder itself (``SET_BY_METHOD``: ``embed_dim``, and the text encoder's ``vocab_size``)."""
    if isinstance(cfg, str):
        return cfg, {}
    if isinstance(cfg, dict) and "name" in cfg:
        kw = dict(cfg)
        name = str(kw.pop("name"))
        for key in SET_BY_METHOD.get(arg, ()):
            if key in kw:
                raise UserError(f"Argument `{arg}`: {key!r} is set by the method (its own `{key}` argument), not in "
                                 f"the encoder mapping; move it out of `{arg}` into the model's arguments.")
        return name, kw
    if isinstance(cfg, dict):
        keys = ", ".join(repr(k) for k in cfg) or "no keys"
        typo = next((k for k in cfg if did_you_mean(str(k), ["name"])), None)
        hint = f" Did you mean 'name' instead of {typo!r}?" if typo is not None else ""
        raise UserError(f"Argument `{arg}` must be a name or a mapping with a `name` key (the encoder), but got a "
                         f"mapping with {keys}.{hint}")
    raise UserError(f"Argument `{arg}` must be a name or a mapping with a `name` key, but got {cfg!r}.")


def _gather_pairs(ids: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's (ids, losses) of this step concatenated in rank order (unchanged in one process); ranks may
    hold different numbers of pairs."""
    from rcit_bench.distributed import _gather_padded, is_distributed

    if not is_distributed():
        return ids, losses
    import torch.distributed as dist

    world = dist.get_world_size()
    packed = torch.stack([ids.double(), losses.double()], dim=1)  # (B, 2): caption ids are exact in float64
    count = torch.tensor([packed.shape[0]], device=packed.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    parts = _gather_padded(packed, max(sizes), world)
    packed = torch.cat([part[:n] for part, n in zip(parts, sizes)])
    return packed[:, 0].long(), packed[:, 1].float()


class RetrievalModule(L.LightningModule):
    """Shared encoders + similarity + triplet training + retrieval validation (see module docstring)."""

    method_name: str = "base"
    image_rep_keys: tuple[str, ...] = ("global",)
    text_rep_keys: tuple[str, ...] = ("global",)
    #: what the method needs from the data, read by the spec and the runner (never its name):
    #: True = it trains on a (clean, corrupted) view of every image (regime 'paired'), and only that way
    needs_paired_views: bool = False
    #: True = it scores word-to-region maps, so the pointing game (datasets with object boxes) evaluates it
    localizes: bool = False
    #: True = loaded as published and never trained: only regime 'pretrained' runs it
    zero_shot: bool = False

    @classmethod
    def tokenizer_for(cls, model_config: dict[str, Any]) -> str | dict[str, Any] | None:
        """The tokenizer this model config needs (the datamodule's ``text_encoder``), or None for the data option.
        Default: a pretrained text encoder ``{name: hf, pretrained: <dir>}`` needs the tokenizer saved with it."""
        cfg = model_config.get("text_encoder")
        if isinstance(cfg, dict) and cfg.get("name") == "hf" and isinstance(cfg.get("pretrained"), str):
            return {"path": cfg["pretrained"], "local_files_only": bool(cfg.get("local_files_only", True))}
        return None

    @classmethod
    def check_model_config(cls, model_config: dict[str, Any]) -> None:
        """Hook for the runner's check before anything trains (e.g. pretrained weights present); default nothing."""

    def __init__(
        self,
        image_encoder: str | dict[str, Any] | None = "small_cnn",
        text_encoder: str | dict[str, Any] | None = "gru",
        vocab_size: int | None = None,
        embed_dim: int = 1024,
        margin: float = 0.2,
        max_violation: bool = True,
        warmup_epochs: int = 0,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        lr_decay_epochs: int | list[int] | None = 15,
        lr_decay_gamma: float = 0.1,
        grad_clip: float | None = 2.0,
        backbone_lr_mult: float = 1.0,
        memory_budget_mb: float = 512.0,
        data_config: dict[str, Any] | None = None,
        small_loss: bool | dict[str, Any] | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            import inspect

            valid = sorted(
                p for cls in type(self).__mro__ if issubclass(cls, RetrievalModule)
                for p in inspect.signature(cls.__init__).parameters if p not in ("self", "unused", "kwargs")
            )
            from rcit_bench.utils import did_you_mean

            bad = sorted(unused)[0]
            raise UserError(
                f"Unknown argument(s) {sorted(unused)} for method {self.method_name!r}; valid: {valid}."
                f"{did_you_mean(bad, valid)}"
            )
        from rcit_bench.models.small_loss import SmallLossSelector, small_loss_options

        small_opts = small_loss_options(small_loss, "small_loss")
        self.save_hyperparameters()
        #: small-loss selection (None when off); its state travels in checkpoints under "small_loss"
        self.small_loss_selector: SmallLossSelector | None = (
            SmallLossSelector(**small_opts) if small_opts is not None else None)
        self._pair_ids: Tensor | None = None  # caption_index of the training batch, while compute_loss runs
        self._pair_losses: list[Tensor] = []  # per-pair triplet losses of this step's pairs=True calls
        self._loss_is_global = False  # this step's compute_loss called global_batch (its loss is over all ranks)
        self._global_pair_ids: Tensor | None = None  # every rank's caption_index, once global_batch gathered them
        if image_encoder is not None:  # None: the subclass builds its own image tower
            img_name, img_kw = encoder_config(image_encoder, "image_encoder")
            self.image_encoder = build_image_encoder(img_name, embed_dim=embed_dim, **img_kw)
        if text_encoder is not None:
            txt_name, txt_kw = encoder_config(text_encoder, "text_encoder")
            self.text_encoder = build_text_encoder(txt_name, embed_dim=embed_dim, vocab_size=vocab_size, **txt_kw)
        self._val_img: list[dict[str, Tensor]] = []
        self._val_img_idx: list[Tensor] = []
        self._val_txt: list[dict[str, Tensor]] = []
        self._val_txt_idx: list[Tensor] = []
        self._val_c2i: list[Tensor] = []
        self._val_seen: set[int] = set()
        self._val_positional = False  # a validation batch had no caption_index (positions stood in for it)
        self._val_gathered: tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor] | None = None

    def setup(self, stage: str) -> None:
        """Under DDP (process group of W > 1): every BatchNorm becomes a GlobalBatchNorm (statistics over the
        global batch, same parameters and buffers). Lightning calls it on every rank once the process group exists
        and before wrapping the module in DDP; a subclass overriding it calls ``super().setup(stage)``."""
        from rcit_bench.models.global_batch import convert_global_batchnorm, world_size

        if world_size() > 1:
            convert_global_batchnorm(self)

    # ------------------------------------------------------------------------------------ encoding
    def encode_image(self, images: Tensor) -> dict[str, Tensor]:
        """images (B, 3, H, W) in [0, 1] -> reps, first dim B."""
        out = self.image_encoder(images)
        return {k: out[k] for k in self.image_rep_keys}

    def encode_text(self, tokens: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """tokens (B, L) int64, lengths (B,) -> reps, first dim B."""
        out = self.text_encoder(tokens, lengths)
        return {k: out[k] for k in self.text_rep_keys}

    def similarity(self, image_reps: dict[str, Tensor], text_reps: dict[str, Tensor]) -> Tensor:
        """(N_img, N_txt) cosine similarity of the global vectors."""
        from rcit_bench.models.similarity import cosine_sim

        return cosine_sim(image_reps["global"], text_reps["global"])

    # ------------------------------------------------------------------------------------ training
    def use_max_violation(self) -> bool:
        """Hardest negative after the warm-up epochs (VSE-infinity), sum of all negatives before."""
        return bool(self.hparams.max_violation) and self.current_epoch >= int(self.hparams.warmup_epochs or 0)

    def training_progress(self, start_epoch: int = 0) -> float:
        """Fraction in [0, 1] of the optimizer steps from the start of epoch `start_epoch` to the end of training
        that are done (``start_epoch=0``: of the whole training).

        Counted in optimizer steps: ``trainer.global_step`` over ``trainer.estimated_stepping_batches``, which
        accounts for ``accumulate_grad_batches`` (one step per k batches), ``max_steps`` (training may stop
        mid-epoch) and ``limit_train_batches``; epoch e starts after ``e * ceil(batches per epoch / k)`` steps,
        as Lightning steps on the last batch of every epoch. 0 without a trainer, before `start_epoch`, when
        nothing is left after it, and when Lightning cannot know the length of training (an iterable dataset
        without ``max_steps``).
        """
        trainer = self._trainer
        if trainer is None:
            return 0.0
        total = trainer.estimated_stepping_batches
        if not total or not math.isfinite(total):
            return 0.0
        start = 0
        if start_epoch:
            batches = trainer.num_training_batches
            if not math.isfinite(batches):  # epochs without an end: `start_epoch` is never reached
                return 0.0
            start = int(start_epoch) * math.ceil(batches / trainer.accumulate_grad_batches)
        if total <= start:
            return 0.0
        return float(min(1.0, max(0.0, (trainer.global_step - start) / (total - start))))

    def global_batch(self, *reps: dict[str, Tensor]) -> tuple[dict[str, Tensor], ...]:
        """Every rank's rows of each dict in `reps` (values (b, ...) tensors: reps, logits, per-caption sums),
        concatenated in rank order, one tuple entry per dict; marks this step's loss as global (see the module
        docstring). Only this rank's rows carry gradient; later dims are zero-padded to the largest over ranks.
        With ``small_loss`` the first call also gathers the step's ``caption_index`` so ``self.triplet`` weights
        and records the global pairs. Must be called by every rank in the same order (it is a collective).
        Without a process group (or one process) the very same dicts are returned."""
        from rcit_bench.models.global_batch import gather_reps_with_grad, world_size

        self._loss_is_global = True
        if world_size() == 1:
            return reps
        flat = {f"{i}/{key}": value for i, r in enumerate(reps) for key, value in r.items()}
        ids = self._pair_ids
        if ids is not None and self._global_pair_ids is None:
            flat["pair_ids"] = ids.detach()
        gathered = gather_reps_with_grad(flat)
        if "pair_ids" in gathered:
            self._global_pair_ids = self._pair_ids = gathered["pair_ids"]
        return tuple({key: gathered[f"{i}/{key}"] for key in r} for i, r in enumerate(reps))

    def triplet(self, sims: Tensor, pairs: bool = True) -> Tensor:
        """Bidirectional triplet ranking loss on a square (B, B) matrix, positives on the diagonal.

        `pairs`: the diagonal holds the batch's (image, caption) training pairs, which may be mismatched; with
        ``small_loss`` they are weighted by their clean posterior and their losses recorded (see the module
        docstring). False: the positives are true by construction (e.g. an image and its corrupted copy), so the
        loss is never weighted nor recorded.
        """
        from rcit_bench.models.losses import triplet_ranking_loss

        margin, hardest = float(self.hparams.margin), self.use_max_violation()
        ids = self._pair_ids
        if self.small_loss_selector is None or not pairs or ids is None:
            return triplet_ranking_loss(sims, margin=margin, max_violation=hardest)
        per_pair = triplet_ranking_loss(sims, margin=margin, max_violation=hardest, reduction="none")  # (B,)
        if per_pair.shape[0] != ids.numel():
            raise ValueError(f"small_loss: the similarity matrix holds {per_pair.shape[0]} pairs but the batch has "
                             f"{ids.numel()} `caption_index` values; `self.triplet(sims)` with pairs=True needs the "
                             f"batch's (image, caption) pairs on the diagonal (pass pairs=False otherwise).")
        self._pair_losses.append(per_pair.detach())
        weights = self.small_loss_selector.weights(ids).to(device=per_pair.device, dtype=per_pair.dtype)
        return (weights * per_pair).sum()

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Default: triplet loss on the in-batch similarity of images and captions."""
        img = self.encode_image(batch["images"])
        txt = self.encode_text(batch["tokens"], batch["lengths"])
        img, txt = self.global_batch(img, txt)
        loss = self.triplet(self.similarity(img, txt))
        return loss, {"triplet": loss.detach()}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The loss for backward: ``compute_loss``'s, times the world size when it is global (``global_batch``
        was called), so that DDP's gradient average is the gradient of the global loss; logs the unscaled loss."""
        self._loss_is_global, self._global_pair_ids = False, None
        if self.small_loss_selector is None:
            loss, logs = self.compute_loss(batch)
            self.check_finite(loss)
        else:
            ids = batch.get("caption_index")
            if ids is None:
                raise UserError(f"Method {self.method_name!r} with `small_loss` needs training batches with "
                                 f"`caption_index` (which caption each pair is), as RetrievalDataModule's "
                                 f"train_dataloader gives; this batch has {sorted(batch)}.")
            self._pair_ids, self._pair_losses = ids, []
            try:
                loss, logs = self.compute_loss(batch)
            finally:
                self._pair_ids = None
            self.check_finite(loss)
            self._record_pair_losses(ids)
        bs = int(batch["tokens"].shape[0])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for key, value in logs.items():
            self.log(f"train/{key}", value, batch_size=bs)
        if self._loss_is_global:
            from rcit_bench.models.global_batch import world_size

            world = world_size()
            if world > 1:
                return loss * world
        return loss

    # ------------------------------------------------------------------------------------ small-loss selection
    def _record_pair_losses(self, ids: Tensor) -> None:
        """Hand this step's per-pair losses (mean over the step's pairs=True triplets) to the selector; under DDP
        every rank records every rank's pairs, so all ranks fit the same mixture and any rank's checkpoint
        holds the whole record. A global loss (``global_batch``) already has every rank's pairs: its per-pair
        losses are recorded under the gathered ids as they are; a local loss is gathered here."""
        calls, self._pair_losses = self._pair_losses, []
        global_ids, self._global_pair_ids = self._global_pair_ids, None
        if not calls or self.small_loss_selector is None:
            return
        losses = torch.stack(calls).float().mean(dim=0)  # (B,)
        if global_ids is not None:
            ids = global_ids
        elif not self._loss_is_global:
            ids, losses = _gather_pairs(ids.to(losses.device), losses)
        self.small_loss_selector.record(ids, losses, self.current_epoch)

    def on_train_epoch_start(self) -> None:
        """Make a fit the previous epoch owed before this epoch's steps use it: a run resumed from a checkpoint
        written after that epoch's last step but before its ``on_train_epoch_end`` (ModelCheckpoint saving on
        validation end, e.g. with ``check_val_every_n_epoch`` > 1 or ``val_check_interval`` < 1)."""
        if self.small_loss_selector is not None:
            self.small_loss_selector.catch_up(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        """Fit the small-loss mixture on this epoch's per-pair losses (after the warm-up) for the next epoch."""
        sel = self.small_loss_selector
        if sel is None:
            return
        sel.end_epoch(self.current_epoch)
        summary = sel.summary()
        self.log("train/small_loss_clean_fraction", summary["clean_fraction"], sync_dist=False)
        self.log("train/small_loss_mean_weight", summary["mean_weight"], sync_dist=False)

    def small_loss_posterior(self) -> tuple[Tensor, Tensor] | None:
        """(p_clean, seen), both (N,) over the training captions indexed so far (``caption_index`` < N): the clean
        posterior of the last mixture fit (1 before any) and which captions have a recorded loss. None without
        ``small_loss``. Score it with rcit_bench.models.small_loss.selection_quality."""
        if self.small_loss_selector is None:
            return None
        return self.small_loss_selector.posterior()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.small_loss_selector is not None:
            checkpoint["small_loss"] = self.small_loss_selector.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.small_loss_selector is not None and "small_loss" in checkpoint:
            self.small_loss_selector.load_state_dict(checkpoint["small_loss"])

    def check_finite(self, loss: Tensor) -> None:
        """Stop training on a NaN/inf loss with a message that says where and what to do."""
        if not torch.isfinite(loss.detach()).all():
            value = loss.detach().float().cpu().item() if loss.numel() == 1 else "non-finite"
            raise FloatingPointError(
                f"Loss became {value} at global step {self.global_step} (epoch {self.current_epoch}) in method "
                f"{self.method_name!r}; the last good checkpoint is kept (nothing is saved after this step). "
                f"Lower `lr`, set `grad_clip`, or check the inputs of this batch."
            )

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        """Clip by the ``grad_clip`` hyper-parameter (VSE++ uses 2.0) unless the Trainer sets its own."""
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=float(clip),
                                gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    # ------------------------------------------------------------------------------------ optimizer
    def backbone_parameters(self) -> list[nn.Parameter]:
        backbone = getattr(getattr(self, "image_encoder", None), "backbone", None)
        return list(backbone.parameters()) if backbone is not None else []

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """Hook: extra optimizer groups (their parameters are excluded from the default group)."""
        return []

    def configure_optimizers(self) -> Any:
        lr = float(self.hparams.lr)
        wd = float(self.hparams.weight_decay)
        mult = float(self.hparams.backbone_lr_mult)
        extra = self.extra_param_groups()
        backbone = self.backbone_parameters()
        taken = {id(p) for g in extra for p in g["params"]} | {id(p) for p in backbone}
        groups = [{"params": [p for p in self.parameters() if id(p) not in taken and p.requires_grad]}]
        if mult > 0:
            groups.append({"params": [p for p in backbone if p.requires_grad], "lr": lr * mult})
        else:
            for p in backbone:
                p.requires_grad_(False)
        groups += extra
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=wd)
        decay = self.hparams.lr_decay_epochs
        if not decay:
            return opt
        if isinstance(decay, (list, tuple)):
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(e) for e in decay],
                                                         gamma=float(self.hparams.lr_decay_gamma))
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(decay), gamma=float(self.hparams.lr_decay_gamma))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ------------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_img, self._val_img_idx, self._val_txt, self._val_txt_idx, self._val_c2i = [], [], [], [], []
        self._val_seen = set()
        self._val_positional, self._val_gathered = False, None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Encode each unique image once (first time its index appears) and every caption."""
        image_index = batch["image_index"]
        keep = []
        for row, idx in enumerate(image_index.tolist()):
            if idx not in self._val_seen:
                self._val_seen.add(idx)
                keep.append(row)
        if keep:
            rows = torch.tensor(keep, device=image_index.device)
            self._val_img.append(self.encode_image(batch["images"][rows]))
            self._val_img_idx.append(image_index[rows])
        self._val_txt.append(self.encode_text(batch["tokens"], batch["lengths"]))
        cap_idx = batch.get("caption_index")
        if cap_idx is None:
            self._val_positional = True
            cap_idx = torch.arange(len(image_index), device=image_index.device) + sum(len(t) for t in self._val_txt_idx)
        self._val_txt_idx.append(cap_idx)
        self._val_c2i.append(image_index)

    def validation_reps(self) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor] | None:
        """This validation epoch's (image reps, image indices, text reps, c2i): images sorted by image index, texts
        by caption index, ``c2i`` (N_txt,) the position of each caption's image; None when nothing was encoded.

        Under DDP (W > 1) every rank's collected reps are gathered (a collective: every rank calls it, also one
        with an empty shard), so every rank holds the whole validation set and computes the global metrics. The
        datamodule gives each rank a contiguous shard of the captions, so an image whose captions straddle two ranks
        was encoded on both: after gathering, the copy of the lowest rank is kept (both were encoded from the same
        pixels in eval mode). Computed once per epoch (a subclass's hook and the base's share it).
        """
        if self._val_gathered is not None:
            return self._val_gathered
        from rcit_bench.evaluation import cat_reps
        from rcit_bench.models.global_batch import world_size

        world = world_size()
        if world == 1:
            if not self._val_txt:
                return None
            img_idx = torch.cat(self._val_img_idx)
            img_order = torch.argsort(img_idx)
            img_reps = {k: v[img_order] for k, v in cat_reps(self._val_img).items()}
            txt_idx = torch.cat(self._val_txt_idx)
            txt_order = torch.argsort(txt_idx)
            txt_reps = {k: v[txt_order] for k, v in cat_reps(self._val_txt).items()}
            c2i_raw = torch.cat(self._val_c2i)[txt_order]
            sorted_img = img_idx[img_order]
        else:
            gathered = self._gather_validation(world)
            if gathered is None:
                return None
            img_reps, sorted_img, txt_reps, c2i_raw = gathered
        c2i = torch.searchsorted(sorted_img, c2i_raw)  # positions of each caption's image
        self._val_gathered = (img_reps, sorted_img, txt_reps, c2i)
        return self._val_gathered

    def _gather_validation(self, world: int) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor] | None:
        """Every rank's validation reps, images deduplicated by index (lowest rank kept) and sorted, texts sorted by
        caption index with their image index; None when no rank encoded anything. Every rank must call it."""
        import torch.distributed as dist

        from rcit_bench.distributed import gather_reps
        from rcit_bench.evaluation import cat_reps

        positional = torch.tensor([int(self._val_positional)], device=self.device)
        dist.all_reduce(positional)
        if int(positional):
            raise UserError(f"Method {self.method_name!r}: under DDP validation batches need `caption_index` (each "
                            f"caption's index in the split), as RetrievalDataModule's val_dataloader gives; positions "
                            f"within a rank's shard cannot name captions across ranks.")
        rank = dist.get_rank()
        img: dict[str, Tensor] = {}
        img_idx = torch.zeros(0, dtype=torch.long, device=self.device)
        if self._val_img:
            img_idx = torch.cat(self._val_img_idx).long()
            img = {**cat_reps(self._val_img), "_image_index": img_idx}
        txt: dict[str, Tensor] = {}
        txt_idx = torch.zeros(0, dtype=torch.long, device=self.device)
        if self._val_txt:
            txt_idx = torch.cat(self._val_txt_idx).long()
            txt = {**cat_reps(self._val_txt), "_image_index": torch.cat(self._val_c2i).long()}
        # an image may sit on several ranks: its gathering key (index * world + rank) is unique, ordered by index
        img = gather_reps(img, img_idx * world + rank, device=self.device)
        txt = gather_reps(txt, txt_idx, device=self.device)
        if not txt or not img:
            return None
        all_img_idx = img.pop("_image_index")
        keep = torch.ones_like(all_img_idx, dtype=torch.bool)
        keep[1:] = all_img_idx[1:] != all_img_idx[:-1]  # sorted by (index, rank): the first copy is the lowest rank
        img_reps = {k: v[keep] for k, v in img.items()}
        c2i_raw = txt.pop("_image_index")
        return img_reps, all_img_idx[keep], txt, c2i_raw

    def on_validation_epoch_end(self) -> None:
        """Retrieval metrics of the whole validation set as ``val/<metric>`` (under DDP: gathered from every rank,
        the same numbers on every rank, so checkpoint selection and early stopping use the global ``val/rsum``)."""
        reps = self.validation_reps()
        self._val_img, self._val_txt, self._val_gathered = [], [], None
        if reps is None:
            return
        from rcit_bench.metrics import retrieval_metrics

        img_reps, _, txt_reps, c2i = reps
        sims = self.similarity(img_reps, txt_reps)
        metrics = retrieval_metrics(sims.float().cpu(), c2i.cpu())
        for key, value in metrics.items():
            self.log(f"val/{key}", float(value), prog_bar=key == "rsum", sync_dist=False)
