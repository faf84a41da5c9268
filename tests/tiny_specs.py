"""Pieces of the tiny CPU benchmark spec that several whole-pipeline tests build on (not a test module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# model overrides: a 32 px CNN and a GRU, embedding 32
TINY_MODEL = {"model": {"image_encoder": {"name": "small_cnn", "input_size": 32},
                        "text_encoder": {"name": "gru", "word_dim": 32}, "embed_dim": 32}}


def tiny_dataset(root: Path) -> dict[str, Any]:
    """A spec's `dataset`: synthetic 32 px, 48 / 16 / 16 images, batches of 16, no loader workers."""
    return {"kind": "synthetic", "options": {
        "root": str(root), "image_size": 32, "n_train": 48, "n_val": 16, "n_test": 16,
        "batch_size": 16, "eval_batch_size": 16, "num_workers": 0}}


def tiny_trainer(max_epochs: int) -> dict[str, Any]:
    """A spec's `trainer`: CPU, 3 batches an epoch, quiet."""
    return {"max_epochs": max_epochs, "limit_train_batches": 3, "log_every_n_steps": 1, "enable_progress_bar": False,
            "num_sanity_val_steps": 0, "accelerator": "cpu"}


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_tiny_clip(folder: Path, image_size: int = 32, processor_kwargs: dict | None = None) -> Path:
    """A random 2-layer CLIP (32 px input), a byte-level CLIP tokenizer over printable ASCII with a few merges,
    and a CLIPImageProcessor, saved as `save_pretrained` writes them."""
    import json

    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    merges = [("r", "e"), ("a", "n"), ("t", "h"), ("th", "e</w>"), ("s", "q")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_hidden_layers": 2, "max_position_embeddings": 77, "bos_token_id": vocab.index(BOS),
            "eos_token_id": vocab.index(EOS), "pad_token_id": vocab.index(EOS)}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
              "image_size": image_size, "patch_size": 8}
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    kw = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
          **(processor_kwargs or {})}
    transformers.CLIPImageProcessor(**kw).save_pretrained(folder)
    return folder
