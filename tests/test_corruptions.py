"""Tests for rcit_bench.data.corruptions: ranges, constants, determinism, rate mode, errors, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rcit_bench.data.corruptions import (
    CORRUPTION_FAMILIES,
    HELD_OUT_CORRUPTIONS,
    IMAGENET_C_CORRUPTIONS,
    RATE_CORRUPTIONS,
    SEVERITY_CORRUPTIONS,
    check_level,
    corrupt,
    corruption_grid,
    corruption_info,
    frost_source,
    list_corruptions,
    ops,
    pixel_noise_rate,
    register_corruption,
    registry,
    weather,
)

SEVERITY_NAMES = list(IMAGENET_C_CORRUPTIONS) + list(HELD_OUT_CORRUPTIONS)


def _kwargs(name: str) -> dict:
    return {"rate": 0.3} if name in RATE_CORRUPTIONS else {"severity": 3}


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """skimage's astronaut, area-resized to 48 x 48: (1, 3, 48, 48) in [0, 1]."""
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255
    return F.interpolate(img[None], size=(48, 48), mode="area").clamp(0, 1)


@pytest.fixture(scope="module")
def batch(photo: torch.Tensor) -> torch.Tensor:
    """4 different images (2 crops of a photo, 2 random): (4, 3, 32, 32)."""
    g = torch.Generator().manual_seed(0)
    return torch.cat(
        [photo[:, :, :32, :32], photo[:, :, 16:, 16:], torch.rand(2, 3, 32, 32, generator=g)]
    )


# independent literals: the published names and order (ImageNet-C's, then its held-out ones, then RCIT's)
PUBLISHED_IMAGENET_C = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
                        "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                        "jpeg_compression")
PUBLISHED_HELD_OUT = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
PUBLISHED_FAMILIES = {
    "gaussian_noise": "noise", "shot_noise": "noise", "impulse_noise": "noise", "speckle_noise": "noise",
    "speckle": "noise", "salt_pepper": "noise",
    "defocus_blur": "blur", "glass_blur": "blur", "motion_blur": "blur", "zoom_blur": "blur", "gaussian_blur": "blur",
    "snow": "weather", "frost": "weather", "fog": "weather", "spatter": "weather",
    "brightness": "digital", "contrast": "digital", "elastic_transform": "digital", "pixelate": "digital",
    "jpeg_compression": "digital", "saturate": "digital",
}


def test_names_and_families() -> None:
    names = list_corruptions()
    assert IMAGENET_C_CORRUPTIONS == PUBLISHED_IMAGENET_C and HELD_OUT_CORRUPTIONS == PUBLISHED_HELD_OUT
    assert SEVERITY_CORRUPTIONS == PUBLISHED_IMAGENET_C + PUBLISHED_HELD_OUT
    assert RATE_CORRUPTIONS == ("speckle", "salt_pepper")
    assert names == list(PUBLISHED_IMAGENET_C + PUBLISHED_HELD_OUT) + ["speckle", "salt_pepper"]
    assert len(names) == len(set(names))
    assert CORRUPTION_FAMILIES == PUBLISHED_FAMILIES
    assert list(CORRUPTION_FAMILIES) == sorted(names, key=lambda n: ["noise", "blur", "weather", "digital"].index(
        PUBLISHED_FAMILIES[n]))  # grouped by family, as before the registry


def test_derived_tuples_follow_the_registry_metadata() -> None:
    infos = [corruption_info(n) for n in list_corruptions()]
    assert IMAGENET_C_CORRUPTIONS == tuple(i.name for i in infos if i.suite == "imagenet_c")
    assert HELD_OUT_CORRUPTIONS == tuple(i.name for i in infos if i.suite == "held_out")
    assert RATE_CORRUPTIONS == tuple(i.name for i in infos if i.mode == "rate")
    assert all(i.mode == "severity" for i in infos if i.name in SEVERITY_CORRUPTIONS)
    assert CORRUPTION_FAMILIES == {i.name: i.family for i in infos}
    assert {i.name for i in infos if i.colour} == {"brightness", "saturate", "snow", "frost", "spatter"}
    assert {i.name for i in infos if i.in_range} == {"impulse_noise", "jpeg_compression", "pixelate"}
    assert {i.name for i in infos if not i.random} == {"gaussian_blur", "defocus_blur", "zoom_blur", "brightness",
                                                         "contrast", "saturate", "pixelate", "jpeg_compression"}


@pytest.mark.parametrize("name", SEVERITY_NAMES)
def test_every_severity_shape_dtype_range(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g)
    before = x.clone()
    for s in range(1, 6):
        y = corrupt(x, name, severity=s, image_ids=[0, 1])
        assert torch.equal(x, before), "the input must not be written"
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert y.is_contiguous()  # callers may .view() it
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    # float64 in, float64 out
    assert corrupt(x.double(), name, severity=5, image_ids=[0, 1]).dtype == torch.float64


@pytest.mark.parametrize("name", list_corruptions())
def test_determinism_independent_of_batch(name: str, batch: torch.Tensor) -> None:
    ids = [10, 11, 12, 13]
    full = corrupt(batch, name, seed=3, image_ids=ids, **_kwargs(name))
    perm = [2, 0, 3, 1]
    permuted = corrupt(batch[perm], name, seed=3, image_ids=[ids[i] for i in perm], **_kwargs(name))
    assert torch.equal(permuted, full[perm])
    sub = corrupt(batch[1:3], name, seed=3, image_ids=ids[1:3], **_kwargs(name))
    assert torch.equal(sub, full[1:3])
    # default ids hash the pixels: also independent of batch composition
    assert torch.equal(corrupt(batch[2:], name, **_kwargs(name)), corrupt(batch, name, **_kwargs(name))[2:])


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur",
                                  "snow", "frost", "fog", "spatter", "elastic_transform", "speckle", "salt_pepper"])
def test_different_seed_different_result(name: str, batch: torch.Tensor) -> None:
    a = corrupt(batch, name, seed=0, image_ids=[0, 1, 2, 3], **_kwargs(name))
    b = corrupt(batch, name, seed=1, image_ids=[0, 1, 2, 3], **_kwargs(name))
    c = corrupt(batch, name, seed=0, image_ids=[5, 1, 2, 3], **_kwargs(name))
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1:], c[1:])


def test_gaussian_noise_std_matches_constant() -> None:
    x = torch.full((2, 3, 64, 64), 0.5)
    for s, sigma in [(1, 0.08), (3, 0.18)]:
        y = corrupt(x, "gaussian_noise", severity=s, image_ids=[0, 1])
        assert abs((y - x).std().item() - sigma) < 0.1 * sigma  # clipping is negligible at these sigmas
        assert abs((y - x).mean().item()) < 0.01


def test_shot_and_impulse_noise_statistics() -> None:
    x = torch.full((1, 3, 64, 64), 0.5)
    y = corrupt(x, "shot_noise", severity=1, image_ids=[0])  # Poisson(30) / 60: std sqrt(30)/60
    assert abs((y - x).std().item() - 30**0.5 / 60) < 0.1 * 30**0.5 / 60
    y = corrupt(x, "impulse_noise", severity=4, image_ids=[0])  # a = .17 of the channel values
    changed = y != x
    assert abs(changed.float().mean().item() - 0.17) < 0.02
    assert set(y[changed].unique().tolist()) <= {0.0, 1.0}


def test_contrast_matches_formula(photo: torch.Tensor) -> None:
    for s, c in zip(range(1, 6), (0.4, 0.3, 0.2, 0.1, 0.05)):
        y = corrupt(photo, "contrast", severity=s)
        m = photo.mean(dim=(2, 3), keepdim=True)  # per channel, as the reference
        torch.testing.assert_close(y, ((photo - m) * c + m).clamp(0, 1))


def test_brightness_and_saturate_match_skimage_hsv(photo: torch.Tensor) -> None:
    from skimage.color import hsv2rgb, rgb2hsv

    img = photo[0].permute(1, 2, 0).double().numpy()
    hsv = rgb2hsv(img)
    ref = hsv.copy()
    ref[..., 2] = np.clip(ref[..., 2] + 0.3, 0, 1)
    got = corrupt(photo, "brightness", severity=3)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, np.clip(hsv2rgb(ref), 0, 1), atol=1e-5)
    ref = hsv.copy()
    ref[..., 1] = np.clip(ref[..., 1] * 5 + 0.1, 0, 1)
    got = corrupt(photo, "saturate", severity=4)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, np.clip(hsv2rgb(ref), 0, 1), atol=1e-5)


def test_gaussian_blur_matches_scipy_at_224() -> None:
    from scipy.ndimage import gaussian_filter

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 224, 224, generator=g)
    y = corrupt(x, "gaussian_blur", severity=1)  # sigma 1 px at 224 px, reflect-101 borders ('mirror')
    ref = gaussian_filter(x[0, 0].double().numpy(), sigma=1.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(y[0, 0].numpy(), ref, atol=1e-5)


def test_blur_and_pixelate_scale_with_size(photo: torch.Tensor) -> None:
    # pixelate at 448 px: blocks are twice as large as at 224 px (published constants are for 224 px)
    big = F.interpolate(photo, size=(448, 448), mode="nearest")
    y = corrupt(big, "pixelate", severity=2)  # c = .5: 112 blocks of 4 px
    assert torch.equal(y[..., ::4, ::4].repeat_interleave(4, -1).repeat_interleave(4, -2), y)
    small = corrupt(big[..., ::2, ::2], "pixelate", severity=2)  # 224 px: 2 px blocks, as published
    assert torch.equal(small[..., ::2, ::2].repeat_interleave(2, -1).repeat_interleave(2, -2), small)
    assert not torch.equal(small[..., ::4, ::4].repeat_interleave(4, -1).repeat_interleave(4, -2), small)


def test_rate_mode_salt_pepper_fraction() -> None:
    x = torch.full((3, 3, 40, 40), 0.5)
    for rate in (0.0, 0.1, 0.6, 1.0):
        y = corrupt(x, "salt_pepper", rate=rate, image_ids=[0, 1, 2])
        changed = (y != x).any(dim=1)  # (B, H, W)
        assert changed.sum(dim=(1, 2)).tolist() == [round(rate * 1600)] * 3
        # same mask and same value in every channel, values are 0 or 1 only
        assert ((y != x).all(dim=1) == changed).all()
        assert set(y[:, 0][changed].unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    y = corrupt(x, "salt_pepper", rate=1.0, image_ids=[0, 1, 2])
    assert 0.45 < (y == 1).float().mean().item() < 0.55
    assert torch.equal(corrupt(x, "salt_pepper", rate=0.0), x)


def test_rate_mode_speckle(photo: torch.Tensor) -> None:
    x = photo[..., :40, :40].clamp(0.05, 1)
    y = corrupt(x, "speckle", rate=0.5, image_ids=[0])
    changed = (y != x).any(dim=1)
    assert abs(changed.float().mean().item() - 0.5) < 1e-3
    # speckle is multiplicative: relative change ~ N(0, 0.6) on the picked pixels (clipping aside)
    rel = ((y - x) / x)[changed.unsqueeze(1).expand_as(x)]
    unclipped = rel[(rel > -0.9) & (rel < 0.3)]
    assert unclipped.numel() > 100
    assert torch.equal(corrupt(x, "speckle", rate=0.0), x)
    assert ((corrupt(x, "speckle", rate=1.0, image_ids=[0]) != x).any(dim=1)).float().mean() > 0.99


def test_grayscale_and_tiny_inputs(photo: torch.Tensor) -> None:
    gray = photo.mean(dim=1, keepdim=True)
    tiny = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gray_before, tiny_before = gray.clone(), tiny.clone()
    for name in list_corruptions():
        y = corrupt(gray, name, **_kwargs(name))
        assert y.shape == gray.shape and y.min() >= 0 and y.max() <= 1 and y.is_contiguous()
        t = corrupt(tiny, name, **_kwargs(name))
        assert t.shape == tiny.shape and t.min() >= 0 and t.max() <= 1
        assert torch.equal(gray, gray_before) and torch.equal(tiny, tiny_before), f"{name} wrote to its input"
    # brightness on gray is plain addition (as in imagecorruptions)
    torch.testing.assert_close(corrupt(gray, "brightness", severity=2), (gray + 0.2).clamp(0, 1))


def test_jpeg_changes_pixels_and_quality_orders(photo: torch.Tensor) -> None:
    err = [(corrupt(photo, "jpeg_compression", severity=s) - photo).abs().mean().item() for s in (1, 5)]
    assert 0 < err[0] < err[1]


def test_blur_preserves_constant_image() -> None:
    x = torch.full((1, 3, 32, 32), 0.3)
    for name in ("gaussian_blur", "defocus_blur", "motion_blur", "zoom_blur", "glass_blur", "pixelate"):
        torch.testing.assert_close(corrupt(x, name, severity=5), x, atol=1e-5, rtol=0)


def test_corruption_grid_shape(photo: torch.Tensor) -> None:
    img = photo[0, :, :16, :16]
    grid = corruption_grid(img, severities=(1, 5), padding=2)
    rows = sum(corruption_info(n).mode == "severity" for n in list_corruptions())  # 19 built in
    assert grid.shape == (3, rows * 16 + (rows - 1) * 2, 3 * 16 + 2 * 2)
    torch.testing.assert_close(grid[:, :16, :16], img)  # top-left tile is the clean image
    assert grid[:, 16:18].eq(1).all()  # white gutter


# ---- errors ----


def test_unknown_name_lists_choices_and_suggests() -> None:
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"Argument `name` must be one of .*'gaussian_noise'.*but got 'gausian_noise'"
                       r".*Did you mean 'gaussian_noise'\?"):
        corrupt(x, "gausian_noise", severity=1)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"severity": 0}, r"`severity` must be an int in 1..5, but got 0"),
        ({"severity": 6}, r"`severity` must be an int in 1..5, but got 6"),
        ({"severity": 2.5}, r"`severity` must be an int in 1..5, but got 2.5"),
        ({}, r"needs `severity`.*severity=None"),
        ({"severity": 1, "rate": 0.5}, r"exactly one of `severity` or `rate`.*severity=1 and rate=0.5"),
        ({"rate": 0.5}, r"ImageNet-C corruption: pass `severity` \(1..5\) instead of `rate`.*rate=0.5"),
    ],
)
def test_severity_errors(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        corrupt(torch.rand(1, 3, 16, 16), "gaussian_noise", **kwargs)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"rate": -0.1}, r"`rate` must be a number in \[0, 1\], but got -0.1"),
        ({"rate": 1.5}, r"`rate` must be a number in \[0, 1\], but got 1.5"),
        ({}, r"needs `rate`.*rate=None"),
        ({"severity": 3}, r"RCIT noise-rate corruption: pass `rate`.*instead of `severity` \(got severity=3\)"),
    ],
)
def test_rate_errors(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        corrupt(torch.rand(1, 3, 16, 16), "salt_pepper", **kwargs)


@pytest.mark.parametrize(
    "images, pattern",
    [
        (torch.rand(3, 16, 16), r"shape \(B, 3, H, W\) or \(B, 1, H, W\), but got \(3, 16, 16\)"),
        (torch.rand(1, 2, 16, 16), r"but got \(1, 2, 16, 16\)"),
        (torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8), r"float tensor in \[0, 1\].*torch.uint8"),
        (torch.full((1, 3, 16, 16), 2.0), r"must be in \[0, 1\], but got values in \[2, 2\]"),
        (torch.rand(1, 3, 7, 16), r"at least 8x8 px, but got 7x16"),
    ],
)
def test_image_errors(images: torch.Tensor, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        corrupt(images, "contrast", severity=1)


def test_image_ids_length_error() -> None:
    with pytest.raises(ValueError, match=r"`image_ids` must have one id per image \(2\), but got 3"):
        corrupt(torch.rand(2, 3, 16, 16), "contrast", severity=1, image_ids=[1, 2, 3])


# ---- fast paths: equal to the slow definitions, deterministic across batch composition ----


def test_impulse_noise_salt_and_pepper_balance() -> None:
    x = torch.full((2, 3, 64, 64), 0.5)
    y = corrupt(x, "impulse_noise", severity=5, image_ids=[0, 1])  # a = .27
    salt, pepper = (y == 1).float().mean().item(), (y == 0).float().mean().item()
    assert abs(salt - 0.135) < 0.01 and abs(pepper - 0.135) < 0.01


@pytest.mark.parametrize("c", [60, 12, 3])
def test_poisson_sampler_matches_poisson(c: int) -> None:
    from scipy.stats import chisquare, poisson

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    for lam in (0.0, 0.02, 1.0, 2.55, c * 0.7, float(c)):
        y = ops._poisson(torch.full((2, 40000), lam), c, gens).numpy()
        assert (y == np.round(y)).all() and y.min() >= 0
        if lam == 0:
            assert (y == 0).all()
            continue
        ks = np.arange(int(lam + 6 * lam**0.5 + 6))
        obs = np.array([(y == k).sum() for k in ks])
        exp = poisson.pmf(ks, lam) * y.size
        keep = exp > 5
        assert chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue > 1e-4


def test_shot_noise_independent_of_chunking(monkeypatch: pytest.MonkeyPatch, batch: torch.Tensor) -> None:
    full = corrupt(batch, "shot_noise", severity=1, image_ids=[1, 2, 3, 4])
    monkeypatch.setattr(ops, "_POISSON_CHUNK", 1000)  # chunks now straddle images
    assert torch.equal(corrupt(batch[2:], "shot_noise", severity=1, image_ids=[3, 4]), full[2:])
    assert torch.equal(corrupt(batch, "shot_noise", severity=1, image_ids=[1, 2, 3, 4]), full)


def test_shift_sum_fft_matches_direct_shifts() -> None:
    from rcit_bench.data.corruptions.ops import _line_taps, _shift_sum, _tap_bounds

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 30, 41, generator=g)
    width = 11  # > 7 taps: FFT path
    w = torch.rand(width, generator=g)
    for lo, hi in ((-45, 45), (-135, -45), (-180, 180)):
        angles = torch.rand(3, generator=g, dtype=torch.float64) * (hi - lo) + lo
        dy, dx = _line_taps(width, angles)
        b = _tap_bounds(width, lo, hi)
        assert b[0] <= int(dy.min()) and int(dy.max()) <= b[1] and b[2] <= int(dx.min()) and int(dx.max()) <= b[3]
        got = _shift_sum(x, w, dy, dx, b)
        ref = torch.zeros_like(x)
        for i in range(width):  # out[y, x] += w_i * x[clamp(y - dy), clamp(x - dx)]
            for n in range(3):
                rows = (torch.arange(30) - dy[n, i]).clamp(0, 29)
                cols = (torch.arange(41) - dx[n, i]).clamp(0, 40)
                ref[n] += w[i] * x[n][:, rows][:, :, cols]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_fast_len() -> None:
    assert [ops._fast_len(n) for n in (1, 7, 255, 286, 271)] == [1, 8, 256, 288, 288]


def test_edge_distance_matches_scipy() -> None:
    from scipy.ndimage import distance_transform_edt

    from rcit_bench.data.corruptions.weather import _edge_distance

    g = torch.Generator().manual_seed(0)
    for p in (0.0005, 0.01, 0.1):
        edge = torch.rand(3, 45, 70, generator=g) < p
        edge[0] = False  # no edge at all: everything at the cap
        ref = np.stack([np.minimum(distance_transform_edt(~e), 20) if e.any() else np.full(e.shape, 20.0)
                        for e in edge.numpy()])
        np.testing.assert_allclose(_edge_distance(edge, 20).numpy(), ref, atol=1e-5)


def test_equalize_hist_matches_opencv_definition() -> None:
    from rcit_bench.data.corruptions.weather import _equalize_hist

    g = torch.Generator().manual_seed(0)
    v = torch.randint(2, 18, (3, 1, 20, 25), generator=g).float()
    v[2] = 9.0  # a single level is left as is
    got = _equalize_hist(v, 20)
    for i in range(3):
        a = v[i, 0].numpy().astype(int)
        hist = np.bincount(a.ravel(), minlength=256)
        lo = int(np.nonzero(hist)[0][0])
        if hist[lo] == a.size:
            ref = a.astype(float)
        else:  # cv2.equalizeHist: lut = round((cdf - hist[lo]) * 255 / (N - hist[lo]))
            scale = np.float32(255.0) / np.float32(a.size - hist[lo])
            lut = np.rint((np.cumsum(hist) - hist[lo]).astype(np.float32) * scale)
            ref = lut[a]
        np.testing.assert_array_equal(got[i, 0].numpy(), ref)


def test_pixelate_matches_pil_box_then_nearest() -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, 224, 224, generator=g) * 255).round() / 255
    for s, c in ((1, 0.6), (3, 0.4)):  # non-integer ratios: 134 and 89 px
        a = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        n = int(224 * c)
        small = Image.fromarray(a).resize((n, n), Image.BOX)
        ref = np.asarray(small.resize((224, 224), Image.NEAREST)).astype(np.float64)
        got = corrupt(x, "pixelate", severity=s)[0].permute(1, 2, 0).double().numpy() * 255
        assert np.abs(got - ref).max() <= 1 + 1e-3  # PIL stores the small image in 8 bits (fixed-point weights)


def test_jpeg_equals_pil_round_trip(photo: torch.Tensor) -> None:
    import io

    from PIL import Image

    x = (photo * 255).round() / 255
    a = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=15)
    ref = np.asarray(Image.open(buf)).astype(np.float32) / 255
    got = corrupt(x, "jpeg_compression", severity=3)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, ref)
    # a batch: the same pixels as one image at a time, in order
    batch = torch.cat([x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2), x])
    whole = corrupt(batch, "jpeg_compression", severity=3)
    for i in range(5):
        assert torch.equal(whole[i:i + 1], corrupt(batch[i:i + 1], "jpeg_compression", severity=3))


def test_any3x3_is_binary_dilation() -> None:
    from rcit_bench.data.corruptions.weather import _any3x3

    m = torch.rand(3, 20, 31, generator=torch.Generator().manual_seed(0)) < 0.2
    assert torch.equal(_any3x3(m), F.max_pool2d(m.float()[:, None], 3, 1, 1)[:, 0] > 0)


@pytest.mark.parametrize("c", [60, 3])
def test_poisson_guide_table_inverts_the_cdf_exactly(c: int) -> None:
    """On the lambda grid (no remainder) the sampler must return exactly the first k with CDF(k) > u."""
    cdf, guide = ops._poisson_tables(c)
    k = cdf.numel() // (c * ops._POISSON_STEP + 1)
    g = torch.Generator().manual_seed(c)
    j = torch.randint(0, c * ops._POISSON_STEP + 1, (50000,), generator=g)
    u1 = torch.rand(50000, generator=g)
    u1[:500] = (1 - torch.rand(500, generator=g) * 1e-4).clamp(max=1 - 2**-24)  # upper tail: searched buckets
    u1[500:1000] = torch.rand(500, generator=g) * 1e-4  # the lower tail
    out = torch.empty(50000)
    ops._poisson_chunk(j.float() / ops._POISSON_STEP, u1, torch.zeros(50000), cdf, guide, c, out)
    ref = torch.searchsorted(cdf.view(-1, k)[j], u1[:, None], right=True)[:, 0].clamp(max=k - 1)
    assert torch.equal(out.long(), ref)
    assert ((guide[:, 0] >= ops._POISSON_HARD).sum() > 0)  # the test reached the searched buckets


def test_rate_mode_picks_exactly_k_pixels_when_keys_tie(monkeypatch: pytest.MonkeyPatch) -> None:
    """The k-th smallest key found by selection may be shared (float32 uniforms repeat): still exactly k pixels,
    and the same ones as the first k of a stable sort."""
    real = pixel_noise_rate._randn
    keys_seen = []

    def coarse(gens, shape, device, uniform=False):  # keys on a grid of 8 values: ties everywhere
        out = real(gens, shape, device, uniform)
        if uniform and not keys_seen:
            out = (out * 8).floor_() / 8
            keys_seen.append(out.clone())
        return out

    monkeypatch.setattr(pixel_noise_rate, "_randn", coarse)
    x = torch.full((2, 3, 20, 20), 0.5)
    y = corrupt(x, "salt_pepper", rate=0.3, image_ids=[0, 1])
    changed = (y != x).any(dim=1).view(2, -1)
    assert changed.sum(1).tolist() == [120, 120]
    expected = torch.zeros(2, 400, dtype=torch.bool).scatter_(1, keys_seen[0].argsort(dim=1, stable=True)[:, :120], True)
    # a changed pixel must be a picked one (a pick may keep its value only if its draw equals 0.5: never here)
    assert torch.equal(changed, expected)


# ---- the registry ----

USER_MODULE = '''"""A user's corruption: a vignette (darkened corners), severity 1..5."""
import torch

from rcit_bench.data.corruptions import register_corruption

STRENGTH = (0.2, 0.35, 0.5, 0.65, 0.8)  # darkening at the corners, severity 1..5


@register_corruption("vignette", family="digital", random=False, in_range=True, suite="user")
def vignette(x: torch.Tensor, s: int, gens: list[torch.Generator]) -> torch.Tensor:
    """x * (1 - strength * r^2), r^2 = 0 at the centre and 1 at the corners; s is severity - 1."""
    h, w = x.shape[-2:]
    ys = torch.linspace(-1, 1, h, device=x.device).view(-1, 1)
    xs = torch.linspace(-1, 1, w, device=x.device).view(1, -1)
    return x * (1 - STRENGTH[s] * (ys**2 + xs**2) / 2)
'''


@pytest.fixture
def restore_registry():
    """Registrations made by a test are removed after it (the built-in ones are kept as they were)."""
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_user_corruption_from_its_own_module(tmp_path, monkeypatch, restore_registry) -> None:
    import importlib
    import sys

    (tmp_path / "my_vignette.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_vignette", raising=False)
    mod = importlib.import_module("my_vignette")
    names = list_corruptions()
    # after the built-in severity-mode names, before the rate-mode ones
    assert names == list(SEVERITY_CORRUPTIONS) + ["vignette"] + list(RATE_CORRUPTIONS)
    info = corruption_info("vignette")
    assert (info.name, info.family, info.mode, info.suite, info.fn) == ("vignette", "digital", "severity", "user",
                                                                       mod.vignette)
    assert not info.random and info.in_range and not info.colour
    x = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    y = corrupt(x, "vignette", severity=5)
    assert torch.equal(y, mod.vignette(x, 4, []))
    assert y[..., 12, 16].sub(x[..., 12, 16]).abs().max() < 0.01 and (y[..., 0, 0] < x[..., 0, 0] * 0.25).all()
    assert corrupt(x[:, :1], "vignette", severity=1).shape == (2, 1, 24, 32)  # grey: the single channel
    assert check_level("vignette", 2) == 2
    with pytest.raises(ValueError, match=r"'vignette' is a severity-mode corruption: pass `severity` \(1..5\)"):
        check_level("vignette", rate=0.5)
    grid = corruption_grid(x[0, :, :16, :16], severities=(1,), padding=0)
    assert grid.shape[1] == (len(SEVERITY_CORRUPTIONS) + 1) * 16  # a row for the user's corruption too


def test_user_rate_corruption_is_one_function(restore_registry) -> None:
    @register_corruption("dead_pixels", family="noise", mode="rate", suite="user")
    def dead_pixels(x, rate, gens):
        return pixel_noise_rate.replace_fraction(x, rate, gens, lambda: torch.zeros_like(x))

    assert list_corruptions()[-3:] == ["speckle", "salt_pepper", "dead_pixels"]
    x = torch.full((2, 3, 20, 20), 0.5)
    y = corrupt(x, "dead_pixels", rate=0.25, image_ids=[0, 1])
    assert ((y == 0).all(dim=1).sum(dim=(1, 2)) == 100).all() and ((y == 0.5) | (y == 0)).all()
    assert torch.equal(y, corrupt(x, "dead_pixels", rate=0.25, image_ids=[0, 1]))
    with pytest.raises(ValueError, match=r"'dead_pixels' is a rate-mode corruption: pass `rate`"):
        corrupt(x, "dead_pixels", severity=1)
    with pytest.raises(ValueError, match=r"rate mode is for 'speckle', 'salt_pepper', 'dead_pixels'"):
        check_level("contrast", rate=0.5)


def test_duplicate_registration_is_an_error(restore_registry) -> None:
    before = dict(registry._REGISTRY)
    with pytest.raises(ValueError, match=r"Corruption 'gaussian_noise' is already registered by "
                                         r"rcit_bench\.data\.corruptions\.noise\._gaussian_noise"):
        register_corruption("gaussian_noise", family="noise")(lambda x, s, gens: x)
    assert registry._REGISTRY == before
    register_corruption("twice", family="blur")(lambda x, s, gens: x)
    with pytest.raises(ValueError, match=r"'twice' is already registered"):
        register_corruption("twice", family="blur")(lambda x, s, gens: x)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"mode": "severities"}, r"`mode` must be one of 'severity', 'rate', but got 'severities'.*Did you mean"),
        ({"family": ""}, r"`family` must be a non-empty string"),
        ({"suite": None}, r"`suite` must be a non-empty string"),
    ],
)
def test_register_argument_errors(kwargs: dict, pattern: str, restore_registry) -> None:
    with pytest.raises(ValueError, match=pattern):
        register_corruption("new_one", **{"family": "noise", **kwargs})
    assert "new_one" not in list_corruptions()


def test_unknown_name_in_corruption_info_and_check_level() -> None:
    for fn in (corruption_info, check_level):
        with pytest.raises(ValueError, match=r"Argument `name` must be one of 'gaussian_noise', .*'salt_pepper', "
                                             r"but got 'gaussian_nosie'\. Did you mean 'gaussian_noise'\?"):
            fn("gaussian_nosie")


@pytest.mark.parametrize(
    "name, kwargs, pattern",
    [
        ("fog", {"severity": 0}, r"`severity` must be an int in 1..5, but got 0"),
        ("fog", {"severity": True}, r"`severity` must be an int in 1..5, but got True"),
        ("fog", {}, r"Corruption 'fog' needs `severity` \(an int in 1..5\), but got severity=None"),
        ("fog", {"severity": 2, "rate": 0.1}, r"exactly one of `severity` or `rate`, but got severity=2 and rate=0.1"),
        ("fog", {"rate": 0.1}, (r"'fog' is an ImageNet-C corruption: pass `severity` \(1..5\) instead of `rate` "
                                r"\(got rate=0.1\); rate mode is for 'speckle', 'salt_pepper'\.")),
        ("speckle", {"rate": 1.01}, r"`rate` must be a number in \[0, 1\], but got 1.01"),
        ("speckle", {"rate": "0.5"}, r"`rate` must be a number in \[0, 1\], but got '0.5'"),
        ("speckle", {}, r"Corruption 'speckle' needs `rate` \(fraction of pixels in \[0, 1\]\), but got rate=None"),
        ("speckle", {"severity": 2}, (r"'speckle' is an RCIT noise-rate corruption: pass `rate` \(fraction of "
                                      r"pixels in \[0, 1\]\) instead of `severity` \(got severity=2\)")),
    ],
)
def test_check_level_errors(name: str, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        check_level(name, **kwargs)


def test_check_level_returns_the_seeding_level() -> None:
    assert check_level("fog", 3) == 3 and type(check_level("fog", 3.0)) is int
    assert check_level("salt_pepper", rate=1) == 1.0 and type(check_level("salt_pepper", rate=0)) is float
    assert check_level("speckle", None, 0.25) == 0.25


# ---- frost: ImageNet-C's photographs, or the procedural fallback ----


def test_frost_source_is_imagenet_c_when_the_package_is_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("imagecorruptions") is None:
        assert frost_source() == "procedural"
        return
    assert frost_source() == "imagenet_c"
    _, photos = weather._frost_photos()
    assert len(photos) == 5 and all(p.dtype == torch.uint8 and p.shape[0] == 3 for p in photos)
    assert weather._frost_photos()[1] is photos  # decoded once per process


def test_frost_rescale_follows_the_reference() -> None:
    def reference(frost_hw, x_hw):  # imagecorruptions 1.1.2 frost(), its four cases
        (f0, f1), (x0, x1) = frost_hw, x_hw
        if f0 >= x0 and f1 >= x1:
            sf = 1
        elif f0 < x0 and f1 >= x1:
            sf = x0 / f0
        elif f0 >= x0 and f1 < x1:
            sf = x1 / f1
        else:
            sf = np.maximum(x0 / f0, x1 / f1)
        sf *= 1.1
        return int(np.ceil(f0 * sf)), int(np.ceil(f1 * sf))

    for frost_hw in ((600, 900), (315, 560), (350, 527)):
        for grid in ((224, 224), (224, 336), (400, 224), (700, 1000), (8, 8), (315, 560)):
            assert weather._frost_rescaled_size(frost_hw, grid) == reference(frost_hw, grid), (frost_hw, grid)


def test_frost_falls_back_to_procedural_textures_and_warns_once(monkeypatch, caplog, batch) -> None:
    monkeypatch.setattr(weather, "_frost_photo_dir", lambda: None)  # the package is not found
    monkeypatch.setattr(weather, "_FROST_FALLBACK_WARNED", False)
    assert frost_source() == "procedural"
    with caplog.at_level("WARNING", logger="rcit_bench.data.corruptions.weather"):
        a = corrupt(batch, "frost", severity=2, image_ids=[0, 1, 2, 3])
        bank = weather._FROST_BANK[max(weather._FROST_BANK)]
        assert torch.equal(corrupt(batch, "frost", severity=2, image_ids=[0, 1, 2, 3]), a)
        assert weather._FROST_BANK[max(weather._FROST_BANK)] is bank  # reused, not regenerated
    warned = [r for r in caplog.records if "procedural frost" in r.getMessage()]
    assert len(warned) == 1 and "imagecorruptions" in warned[0].getMessage()
    assert a.shape == batch.shape and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, batch)
    weather._FROST_BANK.clear()  # regenerated from fixed seeds: the same pixels
    assert torch.equal(corrupt(batch, "frost", severity=2, image_ids=[0, 1, 2, 3]), a)
    assert bank.shape[:2] == (6, 3) and bank.min() >= 0 and bank.max() <= 1
    gray = corrupt(batch[:, :1], "frost", severity=2, image_ids=[0, 1, 2, 3])
    assert gray.shape == (4, 1, 32, 32)
    monkeypatch.undo()
    if frost_source() == "imagenet_c":  # the photographs give other pixels
        assert not torch.equal(corrupt(batch, "frost", severity=2, image_ids=[0, 1, 2, 3]), a)
