"""`scaling` of the corruptions: 'image' (constants scaled to the image size) vs 'published' (as published)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from rcit_bench.data import corruptions as C
from rcit_bench.data.corruptions import (
    SCALINGS,
    SEVERITY_CORRUPTIONS,
    blur,
    corrupt,
    corruption_grid,
    ops,
)

# no spatial constant and no random layer: the same pixels in both modes at any size
POINTWISE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "brightness", "contrast", "saturate",
             "jpeg_compression", "zoom_blur")
SPATIAL = tuple(n for n in SEVERITY_CORRUPTIONS if n not in POINTWISE)


def _images(size: int, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g)


def test_scalings_constant() -> None:
    assert SCALINGS == ("image", "published")
    assert "SCALINGS" in C.__all__


def test_pixelate_is_the_identity_at_64_px_in_image_mode_only() -> None:
    x = _images(64)
    for s in (1, 2, 3):  # the 224 px pixelated image (134, 112, 89 px) has more pixels than the 64 px one
        assert torch.equal(corrupt(x, "pixelate", severity=s), x)
        assert torch.equal(corrupt(x, "pixelate", severity=s, scaling="image"), x)
    y = corrupt(x, "pixelate", severity=1, scaling="published")  # 64 * .6 -> 38 px blocks, as imagecorruptions
    assert (y - x).abs().max() > 0.1


def test_published_pixelate_matches_pil_at_64_px() -> None:
    from PIL import Image

    x = (_images(64, 1) * 255).round() / 255
    a = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    n = int(64 * 0.6)  # the factor of the image's own size (imagecorruptions), not of 224 px
    ref = np.asarray(Image.fromarray(a).resize((n, n), Image.BOX).resize((64, 64), Image.NEAREST)).astype(np.float64)
    got = corrupt(x, "pixelate", severity=1, scaling="published")[0].permute(1, 2, 0).double().numpy() * 255
    assert np.abs(got - ref).max() <= 1 + 1e-3  # PIL stores the small image in 8 bits


@pytest.mark.parametrize("severity", [1, 3])
def test_published_gaussian_blur_uses_the_224_px_sigma_at_64_px(severity: int) -> None:
    from scipy.ndimage import gaussian_filter

    x = _images(64, 1)[:, :1]
    sigma = blur._GAUSSIAN_BLUR[severity - 1]  # 1 and 3 px, as at 224 px
    ref = gaussian_filter(x[0, 0].double().numpy(), sigma=sigma, mode="mirror", truncate=4.0)
    got = corrupt(x, "gaussian_blur", severity=severity, scaling="published")
    np.testing.assert_allclose(got[0, 0].numpy(), ref, atol=1e-5)
    scaled = gaussian_filter(x[0, 0].double().numpy(), sigma=sigma * 64 / 224, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(corrupt(x, "gaussian_blur", severity=severity)[0, 0].numpy(), scaled, atol=1e-5)


def test_published_equals_image_mode_with_the_reference_size_at_the_image_size(monkeypatch) -> None:
    """'published' on a 64 px image = 'image' scaling if the constants had been published for 64 px images:
    every spatial constant unscaled and every random layer drawn at the image's own size."""
    x = _images(64)
    published = {n: corrupt(x, n, severity=2, seed=1, image_ids=[3, 4], scaling="published")
                 for n in SEVERITY_CORRUPTIONS}
    monkeypatch.setattr(ops, "REFERENCE_SIZE", 64)  # read by ops._scale
    for n in SEVERITY_CORRUPTIONS:
        assert torch.equal(corrupt(x, n, severity=2, seed=1, image_ids=[3, 4]), published[n]), n


def test_both_modes_identical_at_224_px() -> None:
    x = _images(224, 1)
    for n in SEVERITY_CORRUPTIONS:  # scale = 1: nothing differs
        assert torch.equal(corrupt(x, n, severity=3, image_ids=[0]),
                           corrupt(x, n, severity=3, image_ids=[0], scaling="published")), n
    # the short side decides: 224 x 264 is the same in both modes, 160 x 224 is not
    g = torch.Generator().manual_seed(1)
    z, y = torch.rand(1, 3, 224, 264, generator=g), torch.rand(1, 3, 160, 224, generator=g)
    assert torch.equal(corrupt(z, "fog", severity=3, image_ids=[0]),
                       corrupt(z, "fog", severity=3, image_ids=[0], scaling="published"))
    assert not torch.equal(corrupt(y, "fog", severity=3, image_ids=[0]),
                           corrupt(y, "fog", severity=3, image_ids=[0], scaling="published"))


def test_at_64_px_spatial_corruptions_differ_and_pointwise_ones_do_not() -> None:
    x = _images(64)
    for n in SEVERITY_CORRUPTIONS:
        a = corrupt(x, n, severity=3, image_ids=[0, 1])
        b = corrupt(x, n, severity=3, image_ids=[0, 1], scaling="published")
        assert torch.equal(a, b) == (n in POINTWISE), n
    for name, rate in (("speckle", 0.3), ("salt_pepper", 0.3)):  # rate mode is pointwise too
        assert torch.equal(corrupt(x, name, rate=rate), corrupt(x, name, rate=rate, scaling="published"))


@pytest.mark.parametrize("name", SPATIAL)
def test_published_is_deterministic_and_batch_independent(name: str) -> None:
    x = _images(48, 4)
    ids = [10, 11, 12, 13]
    full = corrupt(x, name, severity=3, seed=2, image_ids=ids, scaling="published")
    assert torch.equal(full, corrupt(x, name, severity=3, seed=2, image_ids=ids, scaling="published"))
    perm = [2, 0, 3, 1]
    permuted = corrupt(x[perm], name, severity=3, seed=2, image_ids=[ids[i] for i in perm], scaling="published")
    assert torch.equal(permuted, full[perm])
    assert torch.equal(corrupt(x[1:3], name, severity=3, seed=2, image_ids=ids[1:3], scaling="published"), full[1:3])
    assert full.min() >= 0 and full.max() <= 1 and full.dtype == x.dtype


def test_scaling_is_reset_after_each_call_even_on_error() -> None:
    x = _images(64, 1)
    ref = corrupt(x, "gaussian_blur", severity=1)
    corrupt(x, "gaussian_blur", severity=1, scaling="published")
    assert ops._SCALING.get() == "image"
    assert torch.equal(corrupt(x, "gaussian_blur", severity=1), ref)
    with pytest.raises(ValueError, match="image_ids"):
        corrupt(x, "gaussian_blur", severity=1, image_ids=[1, 2], scaling="published")  # raised inside the call
    assert ops._SCALING.get() == "image"
    assert torch.equal(corrupt(x, "gaussian_blur", severity=1), ref)


def test_concurrent_calls_keep_their_own_scaling() -> None:
    x = _images(64, 1)
    refs = {s: corrupt(x, "defocus_blur", severity=2, scaling=s) for s in SCALINGS}
    bad: list[str] = []

    def work(scaling: str) -> None:
        for _ in range(20):
            if not torch.equal(corrupt(x, "defocus_blur", severity=2, scaling=scaling), refs[scaling]):
                bad.append(scaling)

    threads = [threading.Thread(target=work, args=(s,)) for s in SCALINGS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@pytest.mark.parametrize("bad", ["Published", "imagecorruptions", None, 1])
def test_bad_scaling_names_the_argument_and_choices(bad) -> None:
    x = _images(16, 1)
    with pytest.raises(ValueError, match=r"Argument `scaling` must be one of 'image', 'published', but got"):
        corrupt(x, "gaussian_noise", severity=1, scaling=bad)
    with pytest.raises(ValueError, match=r"Argument `scaling`"):
        corruption_grid(x[0], severities=(1,), scaling=bad)


def test_misspelt_scaling_suggests() -> None:
    with pytest.raises(ValueError, match=r"but got 'publshed'.*Did you mean 'published'\?"):
        corrupt(_images(16, 1), "pixelate", severity=1, scaling="publshed")


def test_corruption_grid_passes_scaling() -> None:
    img = _images(64, 1)[0]
    image = corruption_grid(img, severities=(1,), padding=0)
    published = corruption_grid(img, severities=(1,), padding=0, scaling="published")
    row = SEVERITY_CORRUPTIONS.index("pixelate") * 64
    assert torch.equal(image[:, row:row + 64, 64:], img)  # identity in image mode at 64 px
    assert torch.equal(published[:, row:row + 64, 64:],
                       corrupt(img[None], "pixelate", severity=1, image_ids=[0], scaling="published")[0])
    assert not torch.equal(published[:, row:row + 64, 64:], img)
