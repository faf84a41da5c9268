"""Caption perturbations (character and word level) for text-side robustness, after Qiu et al. 2022.

Qiu et al., "Are Multimodal Models Robust to Image and Text Perturbations?" perturb captions with
character-level typos, insertions, deletions and swaps and word-level drops, swaps and insertions at
rate 0.05 x level, level 1..5. Here:

* the caption is split on whitespace and re-joined with single spaces;
* character operations act on letters; ``n = max(1, round(rate * number of eligible letters))`` distinct
  positions are edited; word operations edit ``n = max(1, round(rate * number of words))`` distinct words
  (so level 1 always changes something on a non-trivial caption);
* every random choice comes from ``random.Random(stable_hash(seed, caption_id, name, level))``, so the
  result depends only on those and the caption, never on call order or process.

The perturbations:
  char_typo       replace a letter by a neighbouring key on a QWERTY keyboard (case kept)
  char_insert     insert a random lowercase letter after a letter
  char_delete     delete a letter (never a word's last remaining character)
  char_swap       swap a letter with the next letter of the same word
  word_drop       delete a word (at least one word is kept)
  word_swap       swap a word with the next word
  word_duplicate  repeat a word right after itself
"""

from __future__ import annotations

import random
import string

from rcit_bench.errors import UserError
from rcit_bench.utils import did_you_mean, stable_hash

__all__ = ["perturb_caption", "list_perturbations", "PERTURBATION_RATE_PER_LEVEL"]

PERTURBATION_RATE_PER_LEVEL = 0.05

_PERTURBATIONS = (
    "char_typo", "char_insert", "char_delete", "char_swap", "word_drop", "word_swap", "word_duplicate",
)

_QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    """Letters adjacent on a QWERTY keyboard (same row left/right, rows above/below at offset 0/+1/-1)."""
    pos = {ch: (r, c) for r, row in enumerate(_QWERTY_ROWS) for c, ch in enumerate(row)}
    out = {}
    for ch, (r, c) in pos.items():
        near = []
        for other, (r2, c2) in pos.items():
            if other == ch:
                continue
            if (r2 == r and abs(c2 - c) == 1) or (abs(r2 - r) == 1 and c2 - c in ((0, 1) if r2 < r else (-1, 0))):
                near.append(other)
        out[ch] = "".join(sorted(near))
    return out


KEYBOARD_NEIGHBOURS: dict[str, str] = _keyboard_neighbours()


def list_perturbations() -> list[str]:
    """Names accepted by :func:`perturb_caption`."""
    return list(_PERTURBATIONS)


def perturb_caption(caption: str, name: str, level: int, seed: int = 0, caption_id: int = 0) -> str:
    """Return `caption` perturbed by `name` at `level` (1..5, rate 0.05 x level), deterministically."""
    if name not in _PERTURBATIONS:
        listed = ", ".join(f"'{n}'" for n in _PERTURBATIONS)
        raise UserError(
            f"Argument `name` must be one of {listed}, but got {name!r}.{did_you_mean(str(name), _PERTURBATIONS)}"
        )
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 5:
        raise UserError(f"Argument `level` must be an int in 1..5, but got {level!r}.")
    if not isinstance(caption, str):
        raise UserError(f"Argument `caption` must be a str, but got {type(caption).__name__}.")
    rng = random.Random(stable_hash(int(seed), int(caption_id), name, level))
    rate = PERTURBATION_RATE_PER_LEVEL * level
    words = caption.split()
    if not words:
        return caption
    if name.startswith("char_"):
        return " ".join(_perturb_chars(words, name, rate, rng))
    return " ".join(_perturb_words(words, name, rate, rng))


def _count(rate: float, n: int) -> int:
    return min(n, max(1, round(rate * n)))


def _perturb_chars(words: list[str], name: str, rate: float, rng: random.Random) -> list[str]:
    chars = [list(w) for w in words]
    # eligible (word, char) positions
    if name == "char_swap":
        eligible = [
            (i, j) for i, w in enumerate(chars) for j in range(len(w) - 1) if w[j].isalpha() and w[j + 1].isalpha()
        ]
    elif name == "char_typo":
        eligible = [(i, j) for i, w in enumerate(chars) for j, ch in enumerate(w) if ch.lower() in KEYBOARD_NEIGHBOURS]
    else:
        eligible = [(i, j) for i, w in enumerate(chars) for j, ch in enumerate(w) if ch.isalpha()]
    if not eligible:
        return words
    n = _count(rate, len(eligible))
    if name == "char_delete":  # pick in random order, never a word's last remaining character
        left = [len(w) for w in chars]
        picked = []
        for i, j in rng.sample(eligible, len(eligible)):
            if len(picked) == n:
                break
            if left[i] > 1:
                left[i] -= 1
                picked.append((i, j))
    else:
        picked = rng.sample(eligible, n)
    # apply from the end of the caption so earlier indices stay valid
    for i, j in sorted(picked, reverse=True):
        w = chars[i]
        if name == "char_typo":
            ch = w[j]
            new = rng.choice(KEYBOARD_NEIGHBOURS[ch.lower()])
            w[j] = new.upper() if ch.isupper() else new
        elif name == "char_insert":
            w.insert(j + 1, rng.choice(string.ascii_lowercase))
        elif name == "char_delete":
            del w[j]
        elif name == "char_swap":
            if j + 1 < len(w):
                w[j], w[j + 1] = w[j + 1], w[j]
    return ["".join(w) for w in chars]


def _perturb_words(words: list[str], name: str, rate: float, rng: random.Random) -> list[str]:
    words = list(words)
    n = len(words)
    if name == "word_drop":
        if n == 1:
            return words
        drop = set(rng.sample(range(n), min(n - 1, _count(rate, n))))
        return [w for k, w in enumerate(words) if k not in drop]
    if name == "word_swap":
        if n == 1:
            return words
        for k in sorted(rng.sample(range(n - 1), _count(rate, n - 1))):
            words[k], words[k + 1] = words[k + 1], words[k]
        return words
    # word_duplicate
    dup = set(rng.sample(range(n), _count(rate, n)))
    out = []
    for k, w in enumerate(words):
        out.append(w)
        if k in dup:
            out.append(w)
    return out
