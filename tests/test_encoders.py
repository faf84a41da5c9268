"""Image and text encoders: shapes, resize/normalisation inside, packing, weights loading, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rcit_bench.models.encoders import IMAGENET_MEAN, IMAGENET_STD, load_state_dict_file
from rcit_bench.models.registry import (
    build_image_encoder,
    build_text_encoder,
    list_image_encoders,
    list_text_encoders,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_registries_list_builtins() -> None:
    assert set(list_image_encoders()) == {"small_cnn", "timm", "hf"}
    assert set(list_text_encoders()) == {"gru", "bigru", "transformer", "hf"}


def test_small_cnn_grid_and_internal_preprocessing() -> None:
    torch.manual_seed(0)
    enc = build_image_encoder("small_cnn", embed_dim=24).eval()
    x = torch.rand(2, 3, 64, 64)
    out = enc(x)
    assert out["global"].shape == (2, 24) and out["local"].shape == (2, 64, 24)  # 8 x 8 grid
    # normalisation inside: equal to running the layers on manually normalised input
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        fmap = enc.backbone((x - mean) / std)  # (2, 256, 8, 8)
        ref_local = enc.proj_local(fmap.flatten(2).transpose(1, 2))
        torch.testing.assert_close(enc(x)["local"], ref_local)
        torch.testing.assert_close(enc(x)["global"], enc.proj_global(fmap.mean(dim=(2, 3))))
        # other dataset resolutions are resized to the model's input size first
        big = F.interpolate(x, size=(128, 128), mode="nearest")
        assert enc(big)["local"].shape == (2, 64, 24)
    light = build_image_encoder("small_cnn", embed_dim=8, channels=[16, 32, 64], stem_stride=2)  # CPU config
    assert light(x)["local"].shape == (2, 64, 8)  # still 8 x 8 at 64 px
    assert light.backbone[-3].out_channels == 64


def test_timm_cnn_and_vit_grids() -> None:
    enc = build_image_encoder("timm:resnet10t", embed_dim=16, pretrained=False, input_size=64).eval()
    assert enc.input_size == 64
    with torch.no_grad():
        out = enc(torch.rand(2, 3, 50, 50))
    assert out["local"].shape == (2, 4, 16)  # stride 32: 64 px -> 2 x 2
    assert out["global"].shape == (2, 16)
    vit = build_image_encoder("timm:test_vit", embed_dim=8).eval()
    n_patches = vit.backbone.patch_embed.num_patches
    with torch.no_grad():
        out = vit(torch.rand(1, 3, 40, 40))
    assert out["local"].shape == (1, n_patches, 8)  # class token dropped


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_path_round_trip(tmp_path, suffix: str) -> None:  # noqa: ANN001
    torch.manual_seed(1)
    src = build_image_encoder("timm:resnet10t", embed_dim=16, input_size=64)
    state = {k: v.clone() for k, v in src.backbone.state_dict().items()}
    state["fc.weight"] = torch.zeros(10, 512)  # a classifier head in the file is ignored
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    assert set(load_state_dict_file(path)) == set(state)
    torch.manual_seed(2)
    dst = build_image_encoder("timm:resnet10t", embed_dim=16, input_size=64, weights_path=str(path))
    for key, value in src.backbone.state_dict().items():
        torch.testing.assert_close(dst.backbone.state_dict()[key], value, msg=key)


def test_timm_weights_path_errors(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError, match="weights_path"):
        build_image_encoder("timm:resnet10t", embed_dim=8, weights_path=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not match timm model 'resnet10t'.*missing keys"):
        build_image_encoder("timm:resnet10t", embed_dim=8, weights_path=str(bad))


def test_timm_pretrained_offline_error_says_weights_path(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"Could not fetch pretrained weights.*'resnet10t'.*weights_path"):
        build_image_encoder("timm:resnet10t", embed_dim=8, pretrained=True)


def test_unknown_encoder_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown text encoder 'bigr'.*'bigru'.*Did you mean 'bigru'"):
        build_text_encoder("bigr", embed_dim=8, vocab_size=10)
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet10tt'.*Did you mean 'resnet10t'"):
        build_image_encoder("timm:resnet10tt", embed_dim=8)
    with pytest.raises(ValueError, match="timm:<model name>"):
        build_image_encoder("timm", embed_dim=8)
    with pytest.raises(ValueError, match="vocab_size"):
        build_text_encoder("gru", embed_dim=8)


@pytest.mark.parametrize("name", ["gru", "bigru"])
def test_text_encoder_padding_idx_is_the_vocabulary_pad_id(name: str) -> None:
    """The models' padding_idx default and the data layer's <pad> id are one constant (models import no data)."""
    from rcit_bench.data.vocab import PAD, Vocabulary
    from rcit_bench.utils import PAD_ID

    vocab = Vocabulary.build([["a", "red", "cube"]])
    enc = build_text_encoder(name, embed_dim=4, vocab_size=len(vocab), word_dim=3)
    assert vocab.itos[vocab.pad_id] == PAD and vocab.pad_id == PAD_ID
    assert enc.embed.padding_idx == vocab.pad_id
    assert torch.all(enc.embed.weight[vocab.pad_id] == 0) and torch.all(enc.embed.weight[vocab.pad_id + 1] != 0)


def test_gru_packing_matches_unpadded_and_last_word() -> None:
    torch.manual_seed(0)
    enc = build_text_encoder("gru", embed_dim=6, vocab_size=20, word_dim=5).eval()
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    lengths = torch.tensor([5, 3])
    with torch.no_grad():
        out = enc(tokens, lengths)
        alone = enc(tokens[1:, :3], lengths[1:])
    assert out["words"].shape == (2, 5, 6)
    torch.testing.assert_close(out["words"][1, :3], alone["words"][0])
    assert torch.all(out["words"][1, 3:] == 0)  # padded positions are zeros
    torch.testing.assert_close(out["global"][1], out["words"][1, 2])  # output at the last valid word
    torch.testing.assert_close(out["global"][0], out["words"][0, 4])
    assert out["lengths"].tolist() == [5, 3]


def test_bigru_averages_directions_against_plain_gru() -> None:
    torch.manual_seed(0)
    enc = build_text_encoder("bigru", embed_dim=4, vocab_size=20, word_dim=3).eval()
    tokens = torch.tensor([[1, 9, 4, 2, 0, 0]])
    lengths = torch.tensor([4])
    with torch.no_grad():
        out = enc(tokens, lengths)
        ref, _ = enc.rnn(enc.embed(tokens[:, :4]))  # unpadded run, (1, 4, 8)
    ref_words = (ref[..., :4] + ref[..., 4:]) / 2
    torch.testing.assert_close(out["words"][:, :4], ref_words)
    torch.testing.assert_close(out["global"], ref_words.mean(1))


def test_transformer_text_encoder_from_local_dir(tmp_path) -> None:  # noqa: ANN001
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(tmp_path / "tiny_bert")
    enc = build_text_encoder(f"transformer:{tmp_path / 'tiny_bert'}", embed_dim=8, vocab_size=30).eval()
    tokens = torch.tensor([[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]])
    lengths = torch.tensor([4, 3])
    with torch.no_grad():
        out = enc(tokens, lengths)
        shorter = enc(tokens[:, :4], lengths)
    assert out["global"].shape == (2, 8) and out["words"].shape == (2, 6, 8)
    # padding is masked: extra pad columns change nothing
    torch.testing.assert_close(out["global"], shorter["global"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["global"][1], out["words"][1, :3].mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="could not load transformer"):
        build_text_encoder(f"transformer:{tmp_path / 'nope'}", embed_dim=8)


@pytest.mark.parametrize("channels,stem,side", [([16, 32, 64], 2, 8), ([16, 32, 64, 64], 2, 4), ([8, 16], 1, 32)])
def test_small_cnn_flatten_global_sees_the_whole_grid(channels, stem, side):
    """global_pool='flatten' maps the whole (C, h, w) grid: the head's input size matches the real grid."""
    from rcit_bench.models.encoders import SmallCNN

    enc = SmallCNN(24, input_size=64, channels=tuple(channels), stem_stride=stem, global_pool="flatten")
    out = enc(torch.rand(2, 3, 64, 64))
    assert out["global"].shape == (2, 24) and out["local"].shape == (2, side * side, 24)
    assert enc.proj_global.in_features == channels[-1] * side * side
    with pytest.raises(ValueError, match="global_pool"):
        SmallCNN(24, global_pool="max")
