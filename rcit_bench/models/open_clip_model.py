"""`open_clip`: an OpenCLIP model (``model.arch``, ``model.pretrained`` a tag or a local checkpoint), zero-shot.

Why beside `hf_dual_encoder`: many published CLIP weights (LAION, DataComp) are distributed for open_clip only. The
optional extra ``pip install 'rcit-bench[open_clip]'`` installs it. Preprocessing follows the model's own
``preprocess_cfg`` (resize of the short side or a squash to the input size, centre crop, normalisation), done with the
same torch ops as `hf_dual_encoder` (:class:`~rcit_bench.models.hf_dual.ProcessorOps`) on the corrupted float batch;
captions go through the model's tokenizer (CLIP's byte-level BPE, shipped with open_clip: no download). A tag such
as ``openai`` downloads once; offline, point ``model.pretrained`` at a local checkpoint file instead.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rcit_bench.errors import UserError
from rcit_bench.models.base import RetrievalModule
from rcit_bench.models.hf_dual import ProcessorOps
from rcit_bench.models.registry import register_method

__all__ = ["OpenCLIP", "import_open_clip"]

_INTERPOLATION = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def import_open_clip() -> Any:
    """The open_clip module, or a UserError naming the extra that installs it."""
    try:
        import open_clip
    except ImportError as err:
        raise UserError("Method 'open_clip' needs the optional package open_clip_torch: pip install "
                        "'rcit-bench[open_clip]' (or pip install open_clip_torch).") from err
    return open_clip


def register_model_config(model_config: str | None) -> None:
    """A user's model config (JSON, as open_clip's own) so that `arch` may name it; its name is the file's stem."""
    if model_config is None:
        return
    if not os.path.isfile(model_config):
        raise UserError(f"Argument `model.model_config`: file {model_config!r} not found (an open_clip model config "
                        f"JSON; the arch name is its file name without .json).")
    import_open_clip().add_model_config(model_config)


def processor_view(cfg: dict[str, Any]) -> SimpleNamespace:
    """open_clip's ``preprocess_cfg`` in the image processor vocabulary ProcessorOps reads."""
    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = cfg.get("resize_mode", "shortest")
    if mode == "shortest":
        resize = {"shortest_edge": min(h, w)}
    elif mode == "squash":
        resize = {"height": h, "width": w}
    else:
        raise UserError(f"open_clip resize_mode {mode!r} is not supported (shortest, squash).")
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in _INTERPOLATION:
        raise UserError(f"open_clip interpolation {interpolation!r} is not supported ({', '.join(_INTERPOLATION)}).")
    return SimpleNamespace(do_resize=True, size=resize, resample=_INTERPOLATION[interpolation], do_center_crop=True,
                           crop_size={"height": h, "width": w}, do_rescale=True, rescale_factor=1 / 255,
                           do_normalize=True, image_mean=list(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                           image_std=list(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))))


class OpenClipTokenizer:
    """open_clip's CLIP tokenizer with the Vocabulary surface (`encode` -> ids up to and with the end token)."""

    def __init__(self, arch: str, model_config: str | None = None) -> None:
        open_clip = import_open_clip()
        register_model_config(model_config)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.eot = getattr(self.tokenizer, "eot_token_id", None)
        if self.eot is None:
            raise UserError(f"open_clip model {arch!r} uses a Hugging Face tokenizer; evaluate it with method "
                            f"'hf_dual_encoder' instead (a save_pretrained directory).")
        self.context_length = int(getattr(self.tokenizer, "context_length", 77))
        self.pad_id = 0  # open_clip pads with 0
        self.name_or_path = arch

    def __len__(self) -> int:
        return int(getattr(self.tokenizer, "vocab_size", 0) or len(self.tokenizer.encoder))

    def encode(self, tokens: Any, max_length: int | None = None) -> list[int]:
        text = tokens if isinstance(tokens, str) else " ".join(tokens)
        ids = self.tokenizer([text])[0].tolist()  # <start> words <end>, truncated, padded to the context length
        return ids[: ids.index(self.eot) + 1]

    def decode(self, ids: Any) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]


@register_method("open_clip")
class OpenCLIP(RetrievalModule):
    """An OpenCLIP model evaluated zero-shot (see the module docstring)."""

    zero_shot = True

    def __init__(self, arch: str, pretrained: str | None = None, model_config: str | None = None,
                 autocast: bool = True, vocab_size: int | None = None, data_config: dict[str, Any] | None = None,
                 **unused: Any) -> None:
        super().__init__(image_encoder=None, text_encoder=None, vocab_size=vocab_size, data_config=data_config,
                         **unused)
        open_clip = import_open_clip()
        register_model_config(model_config)
        try:
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        except RuntimeError as err:
            local = pretrained is not None and os.path.isfile(str(pretrained))
            hint = "" if local else (" A tag downloads its weights; offline, download the checkpoint on a machine "
                                     "with network and set `model.pretrained` to the local file.")
            raise UserError(f"Argument `model.pretrained`: open_clip could not create {arch!r} with pretrained="
                            f"{pretrained!r} ({err}).{hint}") from err
        self.model = model.eval()
        self.preprocess = ProcessorOps(processor_view(getattr(model.visual, "preprocess_cfg", {}) or {}))
        self.context_length = int(getattr(model, "context_length", 77) or 77)

    @classmethod
    def tokenizer_for(cls, model_config: dict[str, Any]) -> dict[str, Any] | None:
        arch = model_config.get("arch")
        return {"open_clip": arch, "model_config": model_config.get("model_config")} if isinstance(arch, str) else None

    @classmethod
    def check_model_config(cls, model_config: dict[str, Any]) -> None:
        import_open_clip()
        register_model_config(model_config.get("model_config"))

    def _autocast(self, device: torch.device) -> Any:
        enabled = bool(self.hparams.autocast) and device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.float16) if enabled else torch.autocast(device.type, enabled=False)

    def encode_image(self, images: Tensor) -> dict[str, Tensor]:
        pixels = self.preprocess(images)
        with self._autocast(pixels.device):
            return {"global": self.model.encode_image(pixels).float()}

    def encode_text(self, tokens: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        if tokens.shape[1] < self.context_length:  # as open_clip's tokenizer delivers them: padded with 0
            tokens = F.pad(tokens, (0, self.context_length - tokens.shape[1]), value=0)
        with self._autocast(tokens.device):
            return {"global": self.model.encode_text(tokens).float()}

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        raise UserError("open_clip is evaluated zero-shot and never trained; use regime 'pretrained'.")
