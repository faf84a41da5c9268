"""Pointing game: hit rule, batching over images and captions, annotation formats, corrupted path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rcit_bench.data.captions import CaptionSplit
from rcit_bench.localization import pointing_game, pointing_hits
from rcit_bench.utils import PAD_ID
from conftest import WordVocab

SIZE = 8


class PlantedModel(nn.Module):
    """Each word's heatmap is a single peak at a planted pixel, whatever the image."""

    def __init__(self, vocab: WordVocab, peaks: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.vocab, self.peaks = vocab, peaks
        self.calls: list[int] = []

    def localize_batch(self, images, tokens, lengths):  # (P, 3, H, W), (P, L), (P,) -> (P, L, H, W)
        p, length = tokens.shape
        self.calls.append(p)
        heat = torch.zeros(p, length, images.shape[-2], images.shape[-1])
        for i in range(p):
            for t in range(int(lengths[i])):
                word = self.vocab.words.get(int(tokens[i, t]))
                if word in self.peaks:
                    y, x = self.peaks[word]
                    heat[i, t, y, x] = 1.0
        return heat


def _split(annotations=None) -> CaptionSplit:
    tokens = [["red", "blue"], ["a", "big", "blue"], ["green"]]
    return CaptionSplit(
        image_ids=[10, 11],
        captions=[" ".join(t) for t in tokens],
        tokens=tokens,
        caption_to_image=[0, 0, 1],
        source=lambda i, size=None: torch.full((3, SIZE, SIZE), 100 + i, dtype=torch.uint8),
        annotations=annotations,
        name="tiny/test",
    )


ANNS = [
    {"imgid": 10, "objects": [{"box": [0, 0, 4, 4]}, {"box": [4, 4, 8, 8]}],
     "captions": [{"word_objects": [[0, 0], [1, 1]]}, {"word_objects": [[2, 1]]}]},
    {"imgid": 11, "objects": [{"box": [2, 2, 6, 6]}], "captions": [{"word_objects": [[0, 0]]}]},
]
VOCAB = WordVocab(["red", "blue", "a", "big", "green"])
# red peak (1,1) in box 0 -> hit; blue peak (y=4, x=4): centre (4.5, 4.5) in [4, 8) -> hit twice;
# green peak (0, 7) outside [2, 6) -> miss. By hand: 3 hits of 4 queries = 75 %.
PEAKS = {"red": (1, 1), "blue": (4, 4), "green": (0, 7), "a": (2, 2), "big": (3, 3)}


def test_pointing_hits_hand_cases() -> None:
    heat = torch.zeros(2, 3, 4, 4)
    heat[0, 1, 2, 3] = 5.0  # pair 0 row 1 peaks at y=2, x=3
    heat[1, 0, 0, 0] = heat[1, 0, 3, 3] = 1.0  # tie: the first in row-major order (0, 0) wins
    boxes = torch.tensor([[3.0, 2.0, 4.0, 3.0], [0.0, 0.0, 3.0, 2.0], [1.0, 1.0, 4.0, 4.0], [0.0, 0.0, 0.5, 0.5]])
    hits = pointing_hits(heat, torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 0, 0]), boxes)
    # centre (3.5, 2.5) in [3,4)x[2,3) yes; in [0,3)x[0,2) no; tie -> (0.5, 0.5) in [1,4) no; [0,.5) no (edge open)
    assert hits.tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="heatmaps"):
        pointing_hits(torch.zeros(3, 4, 4), torch.tensor([0]), torch.tensor([0]), boxes[:1])


@pytest.mark.parametrize("pairs_per_batch", [1, 2, 64])
def test_pointing_game_matches_hand_count(pairs_per_batch: int) -> None:
    model = PlantedModel(VOCAB, PEAKS)
    out = pointing_game(model, _split(ANNS), vocab=VOCAB, pairs_per_batch=pairs_per_batch, batch_size=2)
    assert out == {"accuracy": 75.0, "centre_accuracy": 75.0, "random_accuracy": 25.0, "n": 4}
    assert max(model.calls) <= pairs_per_batch and sum(model.calls) == 3  # one heatmap stack per caption


def test_pointing_game_reads_annotation_file_by_image_id(tmp_path) -> None:
    path = tmp_path / "annotations_synthetic.json"
    path.write_text(json.dumps({"images": list(reversed(ANNS))}))  # order differs from the split
    out = pointing_game(PlantedModel(VOCAB, PEAKS), _split(), annotations=str(path), vocab=VOCAB)
    assert out == {"accuracy": 75.0, "centre_accuracy": 75.0, "random_accuracy": 25.0, "n": 4}
    with pytest.raises(FileNotFoundError, match="annotations"):
        pointing_game(PlantedModel(VOCAB, PEAKS), _split(), annotations=str(tmp_path / "missing.json"), vocab=VOCAB)


def test_pointing_game_errors() -> None:
    with pytest.raises(ValueError, match="localize_batch"):
        pointing_game(nn.Linear(1, 1), _split(ANNS), vocab=VOCAB)
    with pytest.raises(ValueError, match="vocab"):
        pointing_game(PlantedModel(VOCAB, PEAKS), _split(ANNS))
    with pytest.raises(ValueError, match="no annotations"):
        pointing_game(PlantedModel(VOCAB, PEAKS), _split(), vocab=VOCAB)


def test_pointing_game_corrupted_path_changes_images_not_queries() -> None:
    seen = []

    class Recording(PlantedModel):
        def localize_batch(self, images, tokens, lengths):
            seen.append(images.clone())
            return super().localize_batch(images, tokens, lengths)

    clean = pointing_game(Recording(VOCAB, PEAKS), _split(ANNS), vocab=VOCAB)
    noisy = pointing_game(Recording(VOCAB, PEAKS), _split(ANNS), vocab=VOCAB, corruption="gaussian_noise", severity=5)
    assert clean == noisy == {"accuracy": 75.0, "centre_accuracy": 75.0, "random_accuracy": 25.0, "n": 4}  # planted peaks ignore pixels
    assert not torch.equal(seen[0], seen[1])  # but the model saw corrupted pixels


def test_pointing_game_pads_captions_with_the_vocabulary_pad_id() -> None:
    seen = []

    class Recording(PlantedModel):
        def localize_batch(self, images, tokens, lengths):
            seen.append((tokens.clone(), lengths.clone()))
            return super().localize_batch(images, tokens, lengths)

    odd = WordVocab(["red", "blue", "a", "big", "green"])
    odd.pad_id = 99  # not a word id: padding must come from the vocabulary, not a hard-coded 0
    out = pointing_game(Recording(odd, PEAKS), _split(ANNS), vocab=odd, batch_size=2)
    assert out["accuracy"] == 75.0
    without_pad = SimpleNamespace(encode=odd.encode)  # a vocabulary without `pad_id`: the suite's PAD_ID
    pointing_game(Recording(odd, PEAKS), _split(ANNS), vocab=without_pad, batch_size=2)
    (tokens, lengths), (tokens_default, _) = seen
    # captions of 4, 5 and 3 ids ("red blue", "a big blue", "green" with <start>/<end>) in one (3, 5) batch
    assert lengths.tolist() == [4, 5, 3] and tokens.shape == (3, 5)
    for row, n in enumerate(lengths.tolist()):
        assert tokens[row, n:].tolist() == [99] * (5 - n)
        assert tokens_default[row, n:].tolist() == [PAD_ID] * (5 - n)
        assert torch.equal(tokens[row, :n], tokens_default[row, :n])
