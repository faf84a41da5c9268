"""Vocabulary from training captions only, encode/decode/save/load, and the local HF tokenizer wrapper."""

from __future__ import annotations

import json

import pytest

from rcit_bench.data.vocab import SPECIALS, HFTokenizer, Vocabulary

TRAIN = [["a", "red", "circle"], ["a", "blue", "square"], ["a", "red", "star"]]


def test_specials_and_frequency_order():
    v = Vocabulary.build(TRAIN)
    assert v.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"] == list(SPECIALS)
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    # by count (a:3, red:2), then alphabetical among count-1 words
    assert v.itos[4:] == ["a", "red", "blue", "circle", "square", "star"]
    assert len(v) == 10


def test_encode_decode_and_test_only_word_is_unk():
    v = Vocabulary.build(TRAIN)
    ids = v.encode(["a", "red", "hexagon"])  # 'hexagon' occurs only in test captions
    assert ids == [1, v.stoi["a"], v.stoi["red"], 3, 2]
    assert "hexagon" not in v
    assert v.decode(ids) == ["a", "red", "<unk>"]
    assert v.decode([1, 4, 2, 5, 5]) == ["a"]  # stops at <end>
    assert v.encode("A red, circle!") == v.encode(["a", "red", "circle"])  # strings are tokenized
    assert v.encode(["a", "red", "circle", "a"], max_length=4) == [1, 4, 5, 2]


def test_min_count_and_save_load(tmp_path):
    v = Vocabulary.build(TRAIN, min_count=2)
    assert v.itos[4:] == ["a", "red"]
    v.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text())["itos"] == v.itos
    assert Vocabulary.load(tmp_path / "vocab.json") == v
    with pytest.raises(ValueError, match="`min_count`"):
        Vocabulary.build(TRAIN, min_count=0)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Vocabulary.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="must start with the specials"):
        Vocabulary(["a", "b"])


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("tok")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    try:  # transformers >= 5 names the argument `vocab`, 4.x `vocab_file`
        tok = BertTokenizerFast(vocab=str(d / "vocab.txt"))
    except TypeError:  # pragma: no cover - transformers 4.x
        tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    if len(tok) != len(words):  # pragma: no cover - 4.x ignores `vocab`
        tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    tok.save_pretrained(d / "saved")
    return d / "saved"


def test_hf_tokenizer_same_surface(bert_dir):
    tok = HFTokenizer(bert_dir)
    assert len(tok) == 10 and tok.pad_id == 0
    ids = tok.encode(["a", "red", "circle"])
    assert ids == [2, 5, 6, 7, 3]  # [CLS] a red circle [SEP]
    assert tok.encode("A red circle") == ids  # lower-cased like the vocab
    assert tok.encode("a red hexagon")[3] == 1  # [UNK]
    assert tok.decode(ids) == ["a", "red", "circle"]
    assert tok.encode("a red circle blue square", max_length=4) == [2, 5, 6, 3]


def test_hf_tokenizer_missing_is_clear(tmp_path):
    with pytest.raises(ValueError, match=r"could not load a tokenizer .*local files only.*text_encoder='vocab'"):
        HFTokenizer(tmp_path / "no_such_tokenizer")
