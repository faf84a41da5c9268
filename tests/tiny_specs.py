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


def write_tiny_clip(folder: Path, image_size: int = 32, processor_kwargs: dict | None = None) -> Path:
    """A random 2-layer CLIP (32 px input), its byte-level tokenizer and a CLIPImageProcessor in `save_pretrained`
    layout (rcit_bench.models.random_clip)."""
    from rcit_bench.models.random_clip import write_random_clip

    return write_random_clip(folder, "tiny", image_size=image_size, processor_kwargs=processor_kwargs)
