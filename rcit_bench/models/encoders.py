"""Image and text encoders shared by all methods (each defined once, selected by name in the config).

Representation keys (the contract every method builds on):

- image encoders return ``{"global": (B, D), "local": (B, R, D)}``: a pooled vector and the grid of
  the last feature map (R = h * w cells, row-major), both linearly projected to ``embed_dim``;
- text encoders return ``{"global": (B, D), "words": (B, L, D), "lengths": (B,)}``: a sentence vector,
  per-token features (zeros past each length) and the token counts.

Nothing is l2-normalised here: the methods decide (cosine similarity normalises inside).

Image encoders take images float (B, 3, H, W) in [0, 1] at the dataset's resolution and do the model's
own resize and normalisation inside, so a corruption is applied once to the dataset's pixels, before any
model-specific resize or normalisation, and every method sees the same corrupted image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rcit_bench.errors import UserError
from rcit_bench.models.layers import lengths_to_mask
from rcit_bench.models.registry import register_image_encoder, register_text_encoder
from rcit_bench.utils import PAD_ID

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "ImageEncoder",
    "SmallCNN",
    "TimmImageEncoder",
    "RNNTextEncoder",
    "TransformerTextEncoder",
    "load_state_dict_file",
]


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Load weights from a local ``.safetensors`` or torch file (``weights_only=True``, no pickled code).

    Nested ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Argument `weights_path`: file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"Weights file {str(path)!r} does not hold a state dict (got {type(state).__name__}).")
    return state


# =============================================================================================== images
class ImageEncoder(nn.Module):
    """Base image encoder: resize + normalise -> ``backbone`` feature map -> projected grid and vector.

    Subclasses set ``self.backbone`` (a module mapping normalised images to (B, C, h, w) or tokens
    (B, N, C); override :meth:`features`) and call :meth:`_init_heads` with C. ``backbone`` is the
    part that ``backbone_lr_mult`` scales in the optimizer.
    """

    input_size: int | None
    embed_dim: int

    def __init__(self, embed_dim: int, input_size: int | None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.input_size = int(input_size) if input_size else None
        # Non-persistent: constants, not weights; keeps checkpoints and weight files backbone-only.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    global_pool: str = "avg"

    def _init_heads(self, feat_dim: int, global_in: int | None = None) -> None:
        self.feat_dim = int(feat_dim)
        self.proj_local = nn.Linear(feat_dim, self.embed_dim)
        self.proj_global = nn.Linear(global_in or feat_dim, self.embed_dim)

    def preprocess(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> resized to ``input_size`` and normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"Image encoder expects images of shape (B, 3, H, W), got {tuple(images.shape)}.")
        x = images.float()
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def features(self, x: Tensor) -> Tensor:
        """Normalised images -> feature map (B, C, h, w)."""
        return self.backbone(x)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        fmap = self.features(self.preprocess(images))
        if fmap.ndim == 4:
            grid = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        else:
            grid = fmap  # (B, N, C) tokens
        pooled = grid.flatten(1) if self.global_pool == "flatten" else grid.mean(dim=1)  # (B, h*w*C) | (B, C)
        return {"global": self.proj_global(pooled), "local": self.proj_local(grid)}


class SmallCNN(ImageEncoder):
    """A small conv net for CPU runs: conv-BN-ReLU layers, the first with ``stem_stride``, the others
    stride 2, then one stride-1 conv. Defaults: 64 px in, stride 8 -> an 8x8 grid of 256-d cells.
    The CPU configs use ``channels: [16, 32, 64], stem_stride: 2`` (also 8x8, ~20x fewer FLOPs).

    ``global_pool``: ``avg`` (mean over the grid, as ResNet/VSE++) or ``flatten`` (a linear map of the whole
    grid): a small from-scratch net has too few channels to carry where things are through an average, and
    the captions say where ("at the top right").
    """

    def __init__(self, embed_dim: int, input_size: int = 64, channels: tuple[int, ...] = (32, 64, 128, 256),
                 stem_stride: int = 1, global_pool: str = "avg") -> None:
        from rcit_bench.utils import check_choice

        check_choice("global_pool", global_pool, ("avg", "flatten"))
        super().__init__(embed_dim, input_size)
        self.global_pool = global_pool
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            stride = stem_stride if i == 0 else 2
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
        self.backbone = nn.Sequential(*layers)
        side = -(-input_size // stem_stride)
        for _ in channels[1:]:
            side = -(-side // 2)  # 3x3 conv, padding 1, stride 2: ceil(side / 2)
        self._init_heads(c_in, c_in * side * side if global_pool == "flatten" else None)


class TimmImageEncoder(ImageEncoder):
    """Any timm model's last feature map as grid features (CNN maps or ViT patch tokens).

    Weights: ``pretrained=True`` uses timm's pretrained weights (needs the Hugging Face hub or a
    populated cache), ``weights_path`` loads a local safetensors/torch file into the backbone.
    Resize and normalisation use the model's pretrained config (input size, mean, std) unless
    ``input_size`` is given.
    """

    def __init__(self, model_name: str, embed_dim: int, pretrained: bool = False,
                 weights_path: str | None = None, input_size: int | None = None) -> None:
        import timm

        if not timm.is_model(model_name):
            from rcit_bench.utils import did_you_mean

            raise UserError(
                f"Argument `image_encoder`: unknown timm model {model_name!r}."
                f"{did_you_mean(model_name, timm.list_models())} See timm.list_models()."
            )
        try:
            backbone = timm.create_model(model_name, pretrained=pretrained and weights_path is None,
                                         num_classes=0, global_pool="")
        except Exception as err:  # network / hub errors differ across versions
            if not pretrained:
                raise
            raise RuntimeError(
                f"Could not fetch pretrained weights for timm model {model_name!r} ({type(err).__name__}: {err}). "
                f"Offline, download the weights once elsewhere and pass them as a local file: "
                f"image_encoder: {{name: 'timm:{model_name}', weights_path: '<file.safetensors or .pth>'}} "
                f"(or set pretrained: false to train from scratch)."
            ) from err
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        size = input_size or (cfg.get("input_size", (3, 224, 224))[-1])
        super().__init__(embed_dim, size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
        self.model_name = model_name
        self.backbone = backbone
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        if weights_path is not None:
            self.load_backbone_weights(weights_path)
        self._init_heads(backbone.num_features)

    def load_backbone_weights(self, weights_path: str | Path) -> None:
        """Load a local weights file into the backbone; classifier-head keys are ignored."""
        state = load_state_dict_file(weights_path)
        result = self.backbone.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise UserError(
                f"Weights file {str(weights_path)!r} does not match timm model {self.model_name!r}: "
                f"{len(result.missing_keys)} missing keys, e.g. {result.missing_keys[:5]}."
            )
        if result.unexpected_keys:
            log.info("ignored %d keys from %s (e.g. %s)", len(result.unexpected_keys), weights_path,
                     result.unexpected_keys[:3])

    def features(self, x: Tensor) -> Tensor:
        out = self.backbone.forward_features(x)
        if out.ndim == 3 and self.num_prefix_tokens:
            out = out[:, self.num_prefix_tokens:]  # drop class / register tokens: (B, N_patches, C)
        return out


@register_image_encoder("small_cnn")
def _build_small_cnn(spec: str | None, embed_dim: int, input_size: int = 64,
                     channels: tuple[int, ...] | list[int] = (32, 64, 128, 256), stem_stride: int = 1,
                     global_pool: str = "avg") -> SmallCNN:
    return SmallCNN(embed_dim, input_size=input_size, channels=tuple(channels), stem_stride=stem_stride,
                    global_pool=global_pool)


@register_image_encoder("timm")
def _build_timm(spec: str | None, embed_dim: int, pretrained: bool = False, weights_path: str | None = None,
                input_size: int | None = None) -> TimmImageEncoder:
    if not spec:
        raise UserError("Argument `image_encoder`: write 'timm:<model name>', e.g. 'timm:resnet152'.")
    return TimmImageEncoder(spec, embed_dim, pretrained=pretrained, weights_path=weights_path, input_size=input_size)


# =============================================================================================== text
class RNNTextEncoder(nn.Module):
    """Word embeddings -> (Bi)GRU over packed sequences.

    ``gru`` (VSE++): the sentence vector is the output at the last valid token.
    ``bigru`` (SCAN / VSE-infinity): word features average the two directions; the sentence vector
    is the mean of the valid word features.
    """

    def __init__(self, vocab_size: int, embed_dim: int, word_dim: int = 300, num_layers: int = 1,
                 bidirectional: bool = False, pad_id: int = PAD_ID) -> None:
        super().__init__()
        if vocab_size is None or int(vocab_size) <= 0:
            raise UserError(f"Argument `vocab_size` must be a positive int for a GRU text encoder, got {vocab_size!r}.")
        self.embed_dim = int(embed_dim)
        self.bidirectional = bool(bidirectional)
        self.embed = nn.Embedding(int(vocab_size), word_dim, padding_idx=pad_id)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers=num_layers, batch_first=True, bidirectional=bidirectional)

    def forward(self, tokens: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        # tokens (B, L), lengths (B,)
        b, max_len = tokens.shape
        lengths = lengths.clamp(min=1, max=max_len)
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        words, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)  # (B, L, D or 2D)
        if self.bidirectional:
            d = self.embed_dim
            words = (words[..., :d] + words[..., d:]) / 2
            mask = lengths_to_mask(lengths, max_len).unsqueeze(-1).to(words.dtype)
            sent = (words * mask).sum(1) / lengths[:, None].to(words.dtype)
        else:
            sent = words[torch.arange(b, device=words.device), lengths - 1]
        return {"global": sent, "words": words, "lengths": lengths}


class TransformerTextEncoder(nn.Module):
    """A Hugging Face encoder (local files only), mean-pooled over valid tokens and projected.

    Token ids must come from the matching tokenizer (``rcit_bench.data.vocab.HFTokenizer``); the
    attention mask is built from ``lengths``.
    """

    def __init__(self, name_or_path: str, embed_dim: int, local_files_only: bool = True) -> None:
        super().__init__()
        from transformers import AutoModel

        try:
            self.model = AutoModel.from_pretrained(name_or_path, local_files_only=local_files_only)
        except OSError as err:
            raise FileNotFoundError(
                f"Argument `text_encoder`: could not load transformer {name_or_path!r} from local files "
                f"({err}). Pass a directory saved with `save_pretrained` or a model already in the "
                f"Hugging Face cache."
            ) from err
        self.name_or_path = name_or_path
        self.embed_dim = int(embed_dim)
        self.proj = nn.Linear(self.model.config.hidden_size, embed_dim)
        self.backbone = self.model

    def forward(self, tokens: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        mask = lengths_to_mask(lengths, tokens.shape[1])  # (B, L)
        hidden = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state  # (B, L, H)
        words = self.proj(hidden) * mask.unsqueeze(-1)
        sent = words.sum(1) / lengths.clamp(min=1)[:, None].to(words.dtype)
        return {"global": sent, "words": words, "lengths": lengths}


class HFTextEncoder(TransformerTextEncoder):
    """``{name: hf, pretrained: <dir>}``: a pretrained text tower (a text model, or the text half of a dual encoder such
    as CLIP) with the method's own projection, fine-tuned by the method's loss. Its tokenizer comes from the same
    directory: the method declares it (RetrievalModule.tokenizer_for), so the data cannot use another."""

    def __init__(self, name_or_path: str, embed_dim: int, local_files_only: bool = True) -> None:
        nn.Module.__init__(self)
        from transformers import AutoModel

        from rcit_bench.models.hf_dual import _offline_hint

        try:
            model = AutoModel.from_pretrained(name_or_path, local_files_only=local_files_only)
        except (OSError, ValueError) as exc:
            raise _offline_hint(name_or_path, "text model", exc, local_files_only) from exc
        self.model = self.backbone = getattr(model, "text_model", model)  # a dual encoder: its text tower only
        self.name_or_path = name_or_path
        self.embed_dim = int(embed_dim)
        self.proj = nn.Linear(int(self.model.config.hidden_size), embed_dim)


class HFImageEncoder(ImageEncoder):
    """``{name: hf, pretrained: <dir>}``: a pretrained image tower (a vision model, or the vision half of a dual
    encoder such as CLIP) as ``backbone``, preprocessed as its image processor says (rcit_bench.models.hf_dual
    .ProcessorOps), its patch tokens (class token dropped) or feature map projected by the method's heads."""

    def __init__(self, name_or_path: str, embed_dim: int, local_files_only: bool = True) -> None:
        from rcit_bench.models.hf_dual import ProcessorOps, load_pretrained

        model, processor = load_pretrained(name_or_path, local_files_only=local_files_only, need_dual=False)
        super().__init__(embed_dim, None)
        self.backbone = getattr(model, "vision_model", model)
        self.processor = ProcessorOps(processor)
        self.name_or_path = name_or_path
        with torch.no_grad():  # one probe image: the feature width and the number of prefix tokens
            crop = self.processor.crop or self.processor.output_size(224, 224)
            out = self._tokens(self.backbone(pixel_values=torch.zeros(1, 3, *crop)))
        cfg = getattr(self.backbone, "config", None)
        size, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
        self.num_prefix_tokens = 0
        if out.ndim == 3 and isinstance(size, int) and isinstance(patch, int):
            self.num_prefix_tokens = max(0, out.shape[1] - (size // patch) ** 2)
        self._init_heads(out.shape[1] if out.ndim == 4 else out.shape[-1])

    @staticmethod
    def _tokens(out: Any) -> Tensor:
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def preprocess(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"Image encoder expects images of shape (B, 3, H, W), got {tuple(images.shape)}.")
        return self.processor(images)

    def features(self, x: Tensor) -> Tensor:
        out = self._tokens(self.backbone(pixel_values=x))
        return out[:, self.num_prefix_tokens:] if out.ndim == 3 else out


def _hf_path(arg: str, spec: str | None, pretrained: str | None) -> str:
    """The directory (or hub id) of an ``hf`` tower: ``pretrained``, or the name's ``hf:<path>`` part."""
    path = pretrained or spec
    if not path:
        raise UserError(f"Argument `{arg}`: write {{name: hf, pretrained: <save_pretrained directory>}}.")
    return path


@register_image_encoder("hf")
def _build_hf_image(spec: str | None, embed_dim: int, pretrained: str | None = None,
                    local_files_only: bool = True) -> HFImageEncoder:
    return HFImageEncoder(_hf_path("image_encoder", spec, pretrained), embed_dim, local_files_only=local_files_only)


@register_text_encoder("hf")
def _build_hf_text(spec: str | None, embed_dim: int, vocab_size: int | None = None, pretrained: str | None = None,
                   local_files_only: bool = True) -> HFTextEncoder:
    return HFTextEncoder(_hf_path("text_encoder", spec, pretrained), embed_dim, local_files_only=local_files_only)


@register_text_encoder("gru")
def _build_gru(spec: str | None, embed_dim: int, vocab_size: int | None = None, word_dim: int = 300,
               num_layers: int = 1, pad_id: int = PAD_ID) -> RNNTextEncoder:
    return RNNTextEncoder(vocab_size, embed_dim, word_dim, num_layers, bidirectional=False, pad_id=pad_id)


@register_text_encoder("bigru")
def _build_bigru(spec: str | None, embed_dim: int, vocab_size: int | None = None, word_dim: int = 300,
                 num_layers: int = 1, pad_id: int = PAD_ID) -> RNNTextEncoder:
    return RNNTextEncoder(vocab_size, embed_dim, word_dim, num_layers, bidirectional=True, pad_id=pad_id)


@register_text_encoder("transformer")
def _build_transformer(spec: str | None, embed_dim: int, vocab_size: int | None = None,
                       local_files_only: bool = True, **_: Any) -> TransformerTextEncoder:
    if not spec:
        raise UserError("Argument `text_encoder`: write 'transformer:<local path or hub name>'.")
    return TransformerTextEncoder(spec, embed_dim, local_files_only=local_files_only)
