"""Fixtures and helpers shared by several test modules.

Helpers are plain functions and classes: pytest's default (prepend) import mode puts ``tests/`` on
``sys.path`` (it has no ``__init__.py``), so a test module imports them with ``from conftest import ...``,
as ``tiny_specs`` is imported.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from rcit_bench.utils import PAD_ID

START_ID, END_ID = 1, 2  # the suite's vocabulary: <pad>=PAD_ID, <start>=1, <end>=2, <unk>=3, words from 4


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models are dominated by thread overhead: one intra-op thread is much faster on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(name: str, **over: Any) -> Any:
    """Registered method `name` built from its tiny config (keys in `over` replaced), seed 0, in eval mode."""
    from rcit_bench.models.registry import build_method, tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(name)
    cfg.update(over)
    return build_method(name, **cfg).eval()


def caption_batch(b: int = 5, length: int = 7, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (b, 3, size, size) in [0, 1], tokens (b, length), lengths (b,)) for the tiny models (40 ids).

    Captions are ``<start> words <end>`` padded with PAD_ID; lengths are ``[length, 3, 5, length, 4][:b]``.
    """
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 40, (b, length), generator=g)
    tokens[:, 0] = START_ID
    lengths = torch.tensor([length, 3, 5, length, 4][:b])
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = END_ID
        tokens[i, n:] = PAD_ID
    return torch.rand(b, 3, size, size, generator=g), tokens, lengths


class WordVocab:
    """Word-level vocabulary with the suite's specials: one id per word (from 4), ``<start>``/``<end>`` around."""

    def __init__(self, words: list[str]) -> None:
        self.ids = {w: i + 4 for i, w in enumerate(words)}
        self.words = {i: w for w, i in self.ids.items()}
        self.pad_id = PAD_ID

    def encode(self, tokens: list[str]) -> list[int]:
        return [START_ID] + [self.ids[t] for t in tokens] + [END_ID]
