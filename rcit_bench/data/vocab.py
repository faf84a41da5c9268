"""Word vocabulary (built from training captions only) and a Hugging Face tokenizer with the same surface.

Building the vocabulary from the training split only matters: one reference implementation built it from all
splits, so test-only words got trained embeddings. Here test-only words map to ``<unk>``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from rcit_bench.errors import UserError
from rcit_bench.data.captions import simple_tokenize
from rcit_bench.utils import PAD_ID, atomic_write_text

__all__ = ["Vocabulary", "HFTokenizer", "PAD", "START", "END", "UNK", "SPECIALS"]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3


def _as_tokens(text: str | Sequence[str]) -> list[str]:
    return simple_tokenize(text) if isinstance(text, str) else list(text)


class Vocabulary:
    """Token <-> id mapping with specials <pad>=0 <start>=1 <end>=2 <unk>=3.

    Words are ordered by decreasing training count, ties alphabetically, so the same captions always give the
    same ids.
    """

    def __init__(self, itos: Sequence[str]) -> None:
        itos = list(itos)
        if tuple(itos[:4]) != SPECIALS:
            raise UserError(f"A vocabulary must start with the specials {SPECIALS}, but starts with {itos[:4]}.")
        if len(set(itos)) != len(itos):
            raise UserError("Vocabulary words must be unique.")
        self.itos: list[str] = itos
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(itos)}

    pad_id, start_id, end_id, unk_id = PAD_ID, 1, 2, 3  # PAD_ID = 0: the models' padding_idx default

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 1) -> "Vocabulary":
        """Vocabulary of the words that occur at least `min_count` times in `token_lists` (training captions)."""
        if min_count < 1:
            raise UserError(f"Argument `min_count` must be >= 1, but got {min_count}.")
        counts = Counter(t for toks in token_lists for t in toks)
        words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"

    def encode(self, tokens: str | Sequence[str], max_length: int | None = None) -> list[int]:
        """[<start>, word ids (unknown -> <unk>), <end>]; a string is tokenized first. Truncates to max_length."""
        ids = [self.start_id] + [self.stoi.get(t, self.unk_id) for t in _as_tokens(tokens)] + [self.end_id]
        if max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + [self.end_id]
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of `ids`, skipping <pad>/<start> and stopping at <end>."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return out

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps({"itos": self.itos}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Vocabulary file not found: {path}")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "itos" not in data:
            raise UserError(f"{path} is not a vocabulary file (expected a JSON object with 'itos').")
        return cls(data["itos"])


class HFTokenizer:
    """A local Hugging Face tokenizer (never downloads) with the :class:`Vocabulary` surface.

    `encode` returns the tokenizer's ids with its own special tokens ([CLS] ... [SEP] for BERT), which play the
    roles of <start>/<end>.
    """

    def __init__(self, name_or_path: str | os.PathLike, max_length: int | None = None,
                 local_files_only: bool = True) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local_files_only)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"Argument `text_encoder`: could not load a tokenizer from {str(name_or_path)!r}"
                f"{' with local files only' if local_files_only else ''} ({type(exc).__name__}: {exc}). Pass a local "
                f"directory holding the tokenizer files (save one with "
                f"`AutoTokenizer.from_pretrained(name).save_pretrained(dir)` on a machine with network), or use "
                f"text_encoder='vocab'."
            ) from exc
        self.name_or_path = str(name_or_path)
        # a pretrained text tower has a fixed number of positions: without an explicit limit, truncate to the
        # tokenizer's own (77 for CLIP) instead of failing on a long caption; 'unlimited' tokenizers say ~1e30
        model_max = getattr(self.tokenizer, "model_max_length", None)
        if max_length is None and isinstance(model_max, int) and 0 < model_max < 100_000:
            max_length = model_max
        self.max_length = max_length
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else PAD_ID)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name_or_path!r}, size={len(self)})"

    def encode(self, tokens: str | Sequence[str], max_length: int | None = None) -> list[int]:
        text = tokens if isinstance(tokens, str) else " ".join(tokens)
        max_length = max_length or self.max_length
        return list(self.tokenizer(text, add_special_tokens=True, truncation=max_length is not None,
                                   max_length=max_length)["input_ids"])

    def decode(self, ids: Iterable[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids], skip_special_tokens=True)
