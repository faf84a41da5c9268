"""Tests for rcit_bench.data.text_perturbations: determinism, rate, each operation's effect, errors."""

from __future__ import annotations

from collections import Counter

import pytest

from rcit_bench.data.text_perturbations import KEYBOARD_NEIGHBOURS, list_perturbations, perturb_caption

CAPTION = (
    "A young woman in a bright orange space suit smiles while holding her helmet next to a model rocket "
    "on a table in front of an American flag"
)
N_WORDS = len(CAPTION.split())  # 27
N_LETTERS = sum(ch.isalpha() for ch in CAPTION)


def test_names() -> None:
    assert list_perturbations() == [
        "char_typo", "char_insert", "char_delete", "char_swap", "word_drop", "word_swap", "word_duplicate",
    ]


@pytest.mark.parametrize("name", list_perturbations())
def test_deterministic_and_seeded(name: str) -> None:
    a = perturb_caption(CAPTION, name, 3, seed=1, caption_id=7)
    assert a == perturb_caption(CAPTION, name, 3, seed=1, caption_id=7)
    assert a != CAPTION
    others = {perturb_caption(CAPTION, name, 3, seed=s, caption_id=c) for s, c in [(2, 7), (1, 8), (3, 9)]}
    assert len(others | {a}) > 1


def test_keyboard_neighbours() -> None:
    assert set(KEYBOARD_NEIGHBOURS["f"]) == set("dgrtcv")
    assert set(KEYBOARD_NEIGHBOURS["q"]) == set("wa")
    assert all(ch not in near for ch, near in KEYBOARD_NEIGHBOURS.items())
    assert all(ch in KEYBOARD_NEIGHBOURS[n] for ch, near in KEYBOARD_NEIGHBOURS.items() for n in near)


def test_char_typo_replaces_with_neighbours_at_rate() -> None:
    for level in (1, 5):
        out = perturb_caption(CAPTION, "char_typo", level, caption_id=3)
        assert len(out) == len(CAPTION)
        diffs = [(a, b) for a, b in zip(CAPTION, out) if a != b]
        assert len(diffs) == round(0.05 * level * N_LETTERS)
        assert all(b.lower() in KEYBOARD_NEIGHBOURS[a.lower()] and a.isupper() == b.isupper() for a, b in diffs)


def test_char_insert_delete_lengths() -> None:
    n = round(0.05 * 4 * N_LETTERS)
    assert len(perturb_caption(CAPTION, "char_insert", 4)) == len(CAPTION) + n
    out = perturb_caption(CAPTION, "char_delete", 4)
    assert len(out) == len(CAPTION) - n
    assert len(out.split()) == N_WORDS  # never deletes a whole word


def test_char_swap_keeps_letters() -> None:
    out = perturb_caption(CAPTION, "char_swap", 2)
    assert out != CAPTION
    for a, b in zip(CAPTION.split(), out.split()):
        assert sorted(a) == sorted(b)


def test_word_operations() -> None:
    for level in (1, 3, 5):
        n = round(0.05 * level * N_WORDS)
        drop = perturb_caption(CAPTION, "word_drop", level).split()
        assert len(drop) == N_WORDS - n
        assert not (Counter(drop) - Counter(CAPTION.split()))
        dup = perturb_caption(CAPTION, "word_duplicate", level).split()
        assert len(dup) == N_WORDS + n
        assert sorted(set(dup)) == sorted(set(CAPTION.split()))
        swap = perturb_caption(CAPTION, "word_swap", level).split()
        assert Counter(swap) == Counter(CAPTION.split()) and swap != CAPTION.split()


def test_more_level_more_change() -> None:
    def changed(name: str, level: int) -> int:
        out = perturb_caption(CAPTION, name, level)
        return sum(a != b for a, b in zip(CAPTION, out)) + abs(len(out) - len(CAPTION))

    assert changed("char_typo", 1) < changed("char_typo", 5)


def test_edge_cases() -> None:
    assert perturb_caption("", "word_drop", 5) == ""
    assert perturb_caption("dog", "word_drop", 5) == "dog"  # keeps at least one word
    assert perturb_caption("dog", "word_swap", 5) == "dog"
    assert perturb_caption("a b", "char_delete", 5) == "a b"  # never empties a word
    assert perturb_caption("123 456", "char_typo", 5) == "123 456"  # nothing eligible


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"Argument `name` must be one of 'char_typo'.*but got 'char_typos'\."
                       r" Did you mean 'char_typo'\?"):
        perturb_caption(CAPTION, "char_typos", 1)
    for bad in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match=rf"Argument `level` must be an int in 1..5, but got {bad!r}"):
            perturb_caption(CAPTION, "word_drop", bad)
    with pytest.raises(ValueError, match=r"Argument `caption` must be a str, but got list"):
        perturb_caption(["a", "b"], "word_drop", 1)
