"""`hf_dual_encoder`: a pretrained two-tower model from `transformers` (CLIP, SigLIP, ALIGN...), zero-shot.

Why a method of its own: reviewers ask how a web-scale pretrained model fares on the same corruption grid, and
such a model is evaluated as published, never trained here (regime 'pretrained'). Anything with
``get_image_features`` / ``get_text_features`` loads through ``AutoModel`` from ``model.pretrained`` (a local
``save_pretrained`` directory, or a hub id when ``local_files_only: false``).

The pipeline keeps the suite's order: images are corrupted at the dataset's resolution, then preprocessed as the
model's image processor says (:class:`ProcessorOps`: resize, centre crop, rescale, normalise, as torch ops on the
float batch so that the corrupted pixels are not rounded to 8 bits on the way); captions (perturbed raw text first)
go through the model's own tokenizer, which the method declares (:meth:`HFDualEncoder.tokenizer_for`). Similarity
is the cosine of the projected features: SigLIP's logit scale and bias are monotone and do not change ranks.

On a GPU the towers run under float16 autocast (``autocast: true``); features are cast to float32 before they are
normalised and compared, so the ranking is computed in float32. That path is untested here (CPU-only machines).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rcit_bench.errors import UserError
from rcit_bench.models.base import RetrievalModule
from rcit_bench.models.registry import register_method

__all__ = ["HFDualEncoder", "ProcessorOps", "load_pretrained"]

#: PIL resample codes an image processor stores -> the torch interpolation that matches it
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
#: models whose text tower pools the last position and was trained on captions padded to the full length
_PAD_TO_MAX = ("siglip", "siglip2")


def _offline_hint(name: str, what: str, exc: BaseException, local_files_only: bool) -> UserError:
    local = os.path.isdir(name)
    if local:
        fix = (f"the directory must hold a `save_pretrained` {what} (config and weights, tokenizer files, "
               f"preprocessor_config.json)")
    else:
        fix = (f"{name!r} is not a local directory, so it was looked up as a hub id"
               f"{' in the local cache only' if local_files_only else ''}. On a machine with network run "
               f"`AutoModel.from_pretrained({name!r}).save_pretrained(DIR)` (and the same for AutoTokenizer and "
               f"AutoImageProcessor), copy DIR here and set `model.pretrained: DIR`; with a filled hub cache, set "
               f"HF_HUB_OFFLINE=1; to allow a download set `model.local_files_only: false`")
    return UserError(f"Argument `model.pretrained`: could not load the {what} from {name!r} "
                     f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {fix}.")


def load_pretrained(name: str, local_files_only: bool = True, need_dual: bool = True) -> tuple[Any, Any]:
    """(model, image processor) from a local directory or a hub id; a UserError saying how to go offline.
    need_dual: the model must have both feature methods (a dual encoder)."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise _offline_hint(name, "model", exc, local_files_only) from exc
    for attr in ("get_image_features", "get_text_features") if need_dual else ():
        if not hasattr(model, attr):
            raise UserError(f"Argument `model.pretrained`: {name!r} loads as {type(model).__name__}, which has no "
                            f"`{attr}`; hf_dual_encoder needs a dual encoder (CLIP, SigLIP, ALIGN, ...).")
    try:
        processor = AutoImageProcessor.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise _offline_hint(name, "image processor", exc, local_files_only) from exc
    return model, processor


def _size_pair(size: Any, where: str) -> tuple[str, Any]:
    if isinstance(size, int):
        return "exact", (size, size)
    size = dict(size or {})
    if "shortest_edge" in size:
        return "shortest", int(size["shortest_edge"])
    if "height" in size and "width" in size:
        return "exact", (int(size["height"]), int(size["width"]))
    raise UserError(f"Image processor `{where}` {size!r} is not supported (expected shortest_edge or height/width).")


class ProcessorOps(torch.nn.Module):
    """An image processor's steps as torch ops on a float (B, 3, H, W) batch in [0, 1].

    Follows the processor's config: ``do_resize`` with ``size`` (``shortest_edge``: the short side to that, the long
    side ``int(size * long / short)`` as transformers computes it; or ``height``/``width``) and ``resample``
    (bicubic / bilinear with antialiasing, the kernels PIL uses), ``do_center_crop`` with ``crop_size`` (top-left
    at ``(H - h) // 2``, ``(W - w) // 2``), ``do_rescale`` (the [0, 1] batch is 8-bit values times 1/255, so the
    processor's ``rescale_factor`` is applied to ``255 x``), ``do_normalize`` with ``image_mean``/``image_std``.
    The processor itself would round the resized image to 8 bits; this keeps full precision.
    """

    def __init__(self, processor: Any) -> None:
        super().__init__()
        get = lambda k, d=None: getattr(processor, k, d)  # noqa: E731
        self.do_resize = bool(get("do_resize", True))
        self.resize = _size_pair(get("size"), "size") if self.do_resize else None
        resample = get("resample", 3)
        code = int(getattr(resample, "value", resample) if resample is not None else 3)
        if self.do_resize and code not in _RESAMPLE:
            raise UserError(f"Image processor `resample` {resample!r} is not supported (nearest, bilinear, bicubic).")
        self.mode = _RESAMPLE.get(code, "bicubic")
        self.do_center_crop = bool(get("do_center_crop", False))
        self.crop = _size_pair(get("crop_size"), "crop_size")[1] if self.do_center_crop else None
        self.scale = 255.0 * float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 255.0
        self.do_normalize = bool(get("do_normalize", True))
        mean = torch.tensor(list(get("image_mean", [0.0, 0.0, 0.0])), dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(list(get("image_std", [1.0, 1.0, 1.0])), dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        if self.resize is None:
            return h, w
        kind, size = self.resize
        if kind == "exact":
            return size
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(size * long / short)
        return (size, new_long) if h <= w else (new_long, size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        h, w = x.shape[-2:]
        oh, ow = self.output_size(h, w)
        if (oh, ow) != (h, w):
            if self.mode == "nearest":
                x = F.interpolate(x, size=(oh, ow), mode="nearest")
            else:
                x = F.interpolate(x, size=(oh, ow), mode=self.mode, align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)  # the processor's resize works on 8-bit images: no overshoot survives
        if self.crop is not None:
            ch, cw = self.crop
            if ch > oh or cw > ow:  # the processor pads with zeros, centred
                top, left = max(0, (ch - oh) // 2), max(0, (cw - ow) // 2)
                x = F.pad(x, (left, max(0, cw - ow) - left, top, max(0, ch - oh) - top))
                oh, ow = x.shape[-2:]
            top, left = (oh - ch) // 2, (ow - cw) // 2
            x = x[..., top: top + ch, left: left + cw]
        x = x * self.scale
        if self.do_normalize:
            x = (x - self.mean) / self.std
        return x


def _features(out: Any) -> Tensor:
    """transformers < 5 returns the projected features, 5 a ModelOutput holding them as ``pooler_output``."""
    return out if isinstance(out, Tensor) else out.pooler_output


@register_method("hf_dual_encoder")
class HFDualEncoder(RetrievalModule):
    """A pretrained CLIP-style model evaluated zero-shot (see the module docstring)."""

    zero_shot = True

    def __init__(self, pretrained: str, local_files_only: bool = True, autocast: bool = True,
                 pad_to_max_length: bool | None = None, vocab_size: int | None = None,
                 data_config: dict[str, Any] | None = None, **unused: Any) -> None:
        super().__init__(image_encoder=None, text_encoder=None, vocab_size=vocab_size, data_config=data_config,
                         **unused)
        if not isinstance(pretrained, str) or not pretrained:
            raise UserError(f"Argument `model.pretrained` must be a local directory or a hub id, but got "
                            f"{pretrained!r}.")
        self.model, processor = load_pretrained(pretrained, local_files_only=bool(local_files_only))
        self.model.eval()
        self.preprocess = ProcessorOps(processor)
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_positions = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
        model_type = str(getattr(self.model.config, "model_type", ""))
        self.pad_to_max = (model_type in _PAD_TO_MAX) if pad_to_max_length is None else bool(pad_to_max_length)
        self.pad_id = int(getattr(text_cfg, "pad_token_id", None) or 0)

    @classmethod
    def tokenizer_for(cls, model_config: dict[str, Any]) -> str | dict[str, Any] | None:
        """The model's own tokenizer, from the same directory (or hub id) as its weights."""
        path = model_config.get("pretrained")
        if not isinstance(path, str):
            return None
        return {"path": path, "local_files_only": bool(model_config.get("local_files_only", True))}

    @classmethod
    def check_model_config(cls, model_config: dict[str, Any]) -> None:
        """The config of `model.pretrained` loads (cheap, no weights), so a missing model fails before any work."""
        from transformers import AutoConfig

        name = model_config.get("pretrained")
        if not isinstance(name, str) or not name:
            raise UserError(f"Argument `model.pretrained` must be a local directory or a hub id, but got {name!r}.")
        local = bool(model_config.get("local_files_only", True))
        try:
            AutoConfig.from_pretrained(name, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise _offline_hint(name, "model", exc, local) from exc

    def _autocast(self, device: torch.device) -> Any:
        enabled = bool(self.hparams.autocast) and device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.float16, enabled=enabled) if enabled else torch.autocast(
            device.type, enabled=False)

    def encode_image(self, images: Tensor) -> dict[str, Tensor]:
        """Corrupted (B, 3, H, W) in [0, 1] -> the processor's steps -> projected features, float32."""
        pixels = self.preprocess(images)
        with self._autocast(pixels.device):
            feats = _features(self.model.get_image_features(pixel_values=pixels))
        return {"global": feats.float()}

    def encode_text(self, tokens: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """Token ids of the model's tokenizer (padded by the collate) -> projected features, float32."""
        if self.pad_to_max and self.max_positions and tokens.shape[1] < self.max_positions:
            tokens = F.pad(tokens, (0, self.max_positions - tokens.shape[1]), value=self.pad_id)
        mask = (torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]).long()
        with self._autocast(tokens.device):
            feats = _features(self.model.get_text_features(input_ids=tokens, attention_mask=mask))
        return {"global": feats.float()}

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        raise UserError("hf_dual_encoder is evaluated zero-shot and never trained; use regime 'pretrained'.")
