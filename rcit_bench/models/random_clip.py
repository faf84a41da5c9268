"""A CLIP with random weights in `save_pretrained` layout (model, tokenizer, image processor), written offline.

Why: tests and speed measurements of the zero-shot path (`hf_dual_encoder`, the `hf` backbones) need a real
transformers CLIP directory, and this machine cannot download one. The tokenizer is CLIP's byte-level BPE class
over printable ASCII characters with a handful of merges (a caption becomes about one token per character, more
than CLIP's real 49K-word vocabulary would give; captions are truncated at 77 tokens as CLIP's are).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["ARCHS", "write_random_clip"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: (text tower, vision tower, projection) sizes: a 2-layer toy, and CLIP ViT-B/32's published shape
ARCHS: dict[str, dict[str, Any]] = {
    "tiny": {"text": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2},
             "vision": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                        "patch_size": 8}, "projection_dim": 16, "image_size": 32},
    "vit-b-32": {"text": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                          "num_hidden_layers": 12},
                 "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                            "num_hidden_layers": 12, "patch_size": 32}, "projection_dim": 512, "image_size": 224},
}


def write_random_clip(folder: str | Path, arch: str = "tiny", image_size: int | None = None,
                      processor_kwargs: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Write a random-weight CLIP of `arch` (see ARCHS) with its tokenizer and image processor into `folder`."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = ARCHS[arch]
    size = int(image_size or a["image_size"])
    chars = [chr(c) for c in range(33, 127)]
    merges = [("r", "e"), ("a", "n"), ("t", "h"), ("th", "e</w>"), ("s", "q")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{x} {y}\n" for x, y in merges))
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    text = {**a["text"], "vocab_size": len(vocab), "max_position_embeddings": 77, "bos_token_id": vocab.index(BOS),
            "eos_token_id": vocab.index(EOS), "pad_token_id": vocab.index(EOS)}
    vision = {**a["vision"], "image_size": size}
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=a["projection_dim"])
    transformers.CLIPModel(cfg).save_pretrained(folder)
    kw = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}, **(processor_kwargs or {})}
    transformers.CLIPImageProcessor(**kw).save_pretrained(folder)
    return folder
