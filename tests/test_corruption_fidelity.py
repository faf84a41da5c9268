"""Fidelity to the reference `imagecorruptions` package (ImageNet-C's code) for the nine corruptions that have no
other reference comparison: defocus, glass, motion and zoom blur, snow, frost, fog, spatter, elastic transform.

Inputs: four photographs from skimage.data (astronaut, chelsea, coffee, rocket), short side area-resized to
224 px and centre-cropped to 224 x 224, 8 bits, so that both sides see the same uint8 image. At 224 px our
'image' and 'published' scalings are the same (scale 1), i.e. the published constants on both sides.

* Deterministic corruptions (defocus, zoom) are compared pixel by pixel: the reference returns
  ``np.uint8(float)``, which truncates, so ours is floored before the mean absolute difference (in 8-bit
  levels). Motion blur is random only through its angle: the pixel test feeds the reference's angle to our
  kernel.
* Random corruptions cannot match pixel by pixel (other random numbers). Their statistic is the PSNR to the
  clean image, averaged over the four photos and several seeds (numpy's global RNG seeded before each
  reference call, as the reference draws from it; ours seeded through `seed`), per severity. Both sides are
  deterministic, so the figures below are exact for the installed versions; the tolerances leave a margin
  over the measured differences for other library versions (resampling, codecs).

The reference package is imported with two shims for current libraries (its own code is not changed):
``pkg_resources`` (gone from recent setuptools; it only locates the frost files) and, for glass blur and fog,
skimage's removed ``multichannel`` argument and numpy's removed ``np.float_``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rcit_bench.data.corruptions import corrupt, frost_source, ops, weather

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")

# PSNR tolerance (dB) of the weather corruptions (snow, frost, fog, spatter's mud): the largest measured
# |ours - reference| is 0.53 dB (frost, severity 2; snow 0.42, fog 0.30, mud 0.05), all sampling noise of
# other random layers / crops over 4 photos x 5 seeds (an earlier 3-seed run had fog at 0.72 dB); 1.0 dB
# keeps a margin of ~0.5 dB. For scale: one severity step changes these PSNRs by 0.4-4 dB, and the former
# procedural frost was 7-9 dB off.
WEATHER_PSNR_TOL = 1.0


# ---- the reference and the inputs ----


@pytest.fixture(scope="module")
def ic():
    """The `imagecorruptions` package, imported with shims for current setuptools / scikit-image / numpy."""
    if importlib.util.find_spec("imagecorruptions") is None:
        pytest.skip("imagecorruptions is not installed (extra `imagenet-c`)")
    mp = pytest.MonkeyPatch()
    try:
        import pkg_resources  # noqa: F401  (only whether it exists)
    except ImportError:
        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = lambda pkg, res: os.path.join(  # type: ignore[attr-defined]
            os.path.dirname(importlib.util.find_spec(pkg).origin), res)
        mp.setitem(sys.modules, "pkg_resources", stub)
    if not hasattr(np, "float_"):
        mp.setattr(np, "float_", np.float64, raising=False)  # plasma_fractal (fog)
    try:
        import imagecorruptions
    except ImportError as e:  # e.g. OpenCV missing
        mp.undo()
        pytest.skip(f"imagecorruptions cannot be imported: {e}")
    from skimage.filters import gaussian

    def gaussian_compat(image, sigma, multichannel=False, **kw):
        return gaussian(image, sigma=sigma, channel_axis=-1 if multichannel else None, **kw)

    mp.setattr(imagecorruptions.corruptions, "gaussian", gaussian_compat)  # glass_blur (and gaussian_blur)
    yield imagecorruptions
    mp.undo()


def _photo(name: str, size: int) -> np.ndarray:
    from skimage import data

    t = torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1).float()[None] / 255
    h, w = t.shape[-2:]
    s = size / min(h, w)
    t = F.interpolate(t, size=(max(size, round(h * s)), max(size, round(w * s))), mode="area")
    h, w = t.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    t = t[0, :, top:top + size, left:left + size].clamp(0, 1)
    return (t.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """(4, 224, 224, 3) uint8."""
    return np.stack([_photo(n, 224) for n in PHOTOS])


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255


def _levels(y: torch.Tensor) -> np.ndarray:
    """Ours as the reference would store it: (N, H, W, 3) 8-bit levels, truncated as np.uint8 does."""
    return np.floor(y.permute(0, 2, 3, 1).double().numpy() * 255 + 1e-6)


def _psnr(a: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """PSNR (dB) per image of (N, H, W, 3) 8-bit arrays."""
    mse = ((a.astype(np.float64) - clean.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / mse)


def _reference(ic, images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    out = []
    for im in images:
        np.random.seed(seed)  # the reference draws from numpy's global RNG
        out.append(ic.corrupt(im, corruption_name=name, severity=severity))
    return np.stack(out)


def _psnr_pair(ic, images: np.ndarray, name: str, severity: int, seeds: range,
               scaling: str = "image") -> tuple[float, float]:
    """Mean PSNR to the clean images: (reference, ours), over images x seeds."""
    ref = np.concatenate([_reference(ic, images, name, severity, s) for s in seeds])
    x = _tensor(images)
    ours = np.concatenate([_levels(corrupt(x, name, severity=severity, seed=s, image_ids=list(range(len(x))),
                                           scaling=scaling)) for s in seeds])
    clean = np.concatenate([images] * len(seeds))
    return float(_psnr(ref, clean).mean()), float(_psnr(ours, clean).mean())


def _check_psnr(ic, images, name: str, severities, seeds: range, tol, scaling: str = "image") -> None:
    """Assert |ours - reference| <= tol (dB, one value or one per severity) per severity; print the figures."""
    tols = dict(zip(severities, tol)) if isinstance(tol, (tuple, list)) else dict.fromkeys(severities, tol)
    bad = []
    for s in severities:
        ref, ours = _psnr_pair(ic, images, name, s, seeds, scaling)
        print(f"{name} severity {s}: PSNR reference {ref:.2f} dB, ours {ours:.2f} dB ({ours - ref:+.2f})")
        if not abs(ours - ref) <= tols[s]:
            bad.append(f"severity {s}: reference {ref:.2f} dB, ours {ours:.2f} dB (tolerance {tols[s]} dB)")
    assert not bad, f"{name}: " + "; ".join(bad)


# ---- deterministic: pixels ----


def test_defocus_blur_pixels(ic, photos: np.ndarray) -> None:
    """Severities 1-3: mean |diff| <= 0.15 levels (measured 0.02-0.06: float32 rounding on both sides at the
    truncation). Severities 4-5 (radius 8 and 10) differ by a documented deviation: the reference's disk
    kernel is not renormalised after cv2.GaussianBlur, whose reflect-101 border adds mass at the kernel's
    edge (its sum is 1.013 at radius 8, 1.011 at 10), so the reference is ~1.2% brighter (measured mean
    |diff| 1.27 and 1.05 levels, <= 2 asserted); scaled by that sum, ours matches to <= 0.15 levels as well."""
    x = _tensor(photos)
    for s, (radius, alias) in enumerate(((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)), start=1):
        ref = _reference(ic, photos, "defocus_blur", s, 0).astype(np.float64)
        y = corrupt(x, "defocus_blur", severity=s)
        mad = np.abs(_levels(y) - ref).mean()
        ksum = float(ic.corruptions.disk(radius, alias_blur=alias).sum())
        mad_scaled = np.abs(_levels((y * ksum).clamp(0, 1)) - ref).mean()
        print(f"defocus_blur severity {s}: mean |diff| {mad:.3f} levels; reference kernel sum {ksum:.4f}, "
              f"ours scaled by it {mad_scaled:.3f}")
        assert mad <= (0.15 if s <= 3 else 2.0), (s, mad)
        assert mad_scaled <= 0.15, (s, mad_scaled)


def test_zoom_blur_pixels(ic, photos: np.ndarray) -> None:
    """Mean |diff| <= 0.2 levels at every severity (measured 0.06-0.11: the reference zooms the same crop by
    the same factors with scipy.ndimage.zoom(order=1), ours with torch's bilinear resize, whose sampling
    grids differ slightly)."""
    x = _tensor(photos)
    for s in range(1, 6):
        ref = _reference(ic, photos, "zoom_blur", s, 0).astype(np.float64)
        mad = np.abs(_levels(corrupt(x, "zoom_blur", severity=s)) - ref).mean()
        print(f"zoom_blur severity {s}: mean |diff| {mad:.3f} levels")
        assert mad <= 0.2, (s, mad)


def test_motion_blur_pixels_at_the_reference_angle(ic, photos: np.ndarray) -> None:
    """Motion blur is random only through its angle: given the reference's angle (its first draw after
    np.random.seed), our kernel gives the reference's pixels: mean |diff| <= 0.05 levels (measured <= 0.003:
    float rounding at the reference's truncation)."""
    from rcit_bench.data.corruptions.blur import _MOTION_BLUR

    x = _tensor(photos)
    for s in range(1, 6):
        radius, sigma = _MOTION_BLUR[s - 1]
        for seed in (0, 1):
            ref = _reference(ic, photos, "motion_blur", s, seed).astype(np.float64)
            np.random.seed(seed)
            angle = np.random.uniform(-45, 45)
            angles = torch.full((len(x),), angle, dtype=torch.float64)
            y = ops._motion_blur_batch(x, radius, sigma, angles, (-45, 45)).clamp(0, 1)
            mad = np.abs(_levels(y) - ref).mean()
            print(f"motion_blur severity {s}, angle {angle:.1f}: mean |diff| {mad:.3f} levels")
            assert mad <= 0.05, (s, seed, mad)


# ---- random: PSNR statistics ----


def test_motion_blur_psnr(ic, photos: np.ndarray) -> None:
    """Tolerance 0.5 dB: measured |diff| <= 0.23 dB (severity 1; the angles differ and the blur direction
    matters per photo: sampling noise over 4 photos x 5 seeds; the kernel itself is exact, see above)."""
    _check_psnr(ic, photos, "motion_blur", range(1, 6), range(5), 0.5)


def test_elastic_transform_psnr(ic, photos: np.ndarray) -> None:
    """Tolerance 0.5 dB: measured |diff| <= 0.12 dB (severity 5; other random displacement fields, bilinear
    sampling on both sides)."""
    _check_psnr(ic, photos, "elastic_transform", range(1, 6), range(5), 0.5)


def test_snow_psnr(ic, photos: np.ndarray) -> None:
    """WEATHER_PSNR_TOL: measured |diff| <= 0.42 dB (severity 1; other random snow layers)."""
    _check_psnr(ic, photos, "snow", range(1, 6), range(5), WEATHER_PSNR_TOL)


def test_fog_psnr(ic, photos: np.ndarray) -> None:
    """WEATHER_PSNR_TOL: measured |diff| <= 0.30 dB (severity 3; other random plasma fractals)."""
    _check_psnr(ic, photos, "fog", range(1, 6), range(5), WEATHER_PSNR_TOL)


def test_spatter_psnr(ic, photos: np.ndarray) -> None:
    """Mud (severities 4-5) follows the reference: WEATHER_PSNR_TOL (measured |diff| <= 0.05 dB). Water
    (severities 1-3) approximates the reference's Canny edges by the liquid region's morphological gradient
    (a documented deviation, see the weather module), which changes the drops' relief: measured -1.43, +1.65
    and +3.42 dB (ours milder at severities 2-3, harsher at 1), so 4 dB is asserted there: it catches a
    broken spatter (clean: infinite PSNR; other severities: 3-12 dB away) but not this deviation."""
    _check_psnr(ic, photos, "spatter", range(1, 6), range(5), (4.0, 4.0, 4.0, WEATHER_PSNR_TOL, WEATHER_PSNR_TOL))


def _frost_ids(seed: int, severity: int, per_photo: int) -> list[list[int]]:
    """For each of the 5 frost photographs, `per_photo` image ids whose frost draws that photograph (the first
    number of the image's generator), so that every photograph weighs the same on our side."""
    ids: list[list[int]] = [[] for _ in range(weather._FROST_DRAWN)]
    k = 0
    while min(len(v) for v in ids) < per_photo:
        i = int(torch.randint(weather._FROST_DRAWN, (), generator=ops._generators(seed, "frost", severity, [k])[0]))
        if len(ids[i]) < per_photo:
            ids[i].append(k)
        k += 1
    return ids


def _frost_seeds(per_photo: int, start: int = 0) -> list[int]:
    """numpy seeds (from `start` on) whose reference frost draws each of the 5 photographs `per_photo` times."""
    seeds: list[list[int]] = [[] for _ in range(5)]
    s = start
    while min(len(v) for v in seeds) < per_photo:
        np.random.seed(s)
        i = np.random.randint(5)
        if len(seeds[i]) < per_photo:
            seeds[i].append(s)
        s += 1
    return [s for v in seeds for s in v]


def _frost_psnr(ic, photos: np.ndarray, severity: int, per_photo: int = 3) -> tuple[float, float]:
    """(reference, ours) mean PSNR with every frost photograph drawn equally often on both sides (stratified:
    the five photographs differ by up to 5 dB, so a plain random draw would need hundreds of seeds). The
    reference's seeds differ per severity (as our generators do), so that one set of crops does not shift
    every severity the same way."""
    seeds = _frost_seeds(per_photo, start=1000 * severity)
    ref = np.concatenate([_reference(ic, photos, "frost", severity, s) for s in seeds])
    pr = _psnr(ref, np.concatenate([photos] * len(seeds))).mean()
    x = _tensor(photos)
    po = []
    for j in range(len(x)):  # photo j, every frost photograph per_photo times
        ids = [k for v in _frost_ids(0, severity, per_photo) for k in v]
        y = corrupt(x[j:j + 1].expand(len(ids), -1, -1, -1), "frost", severity=severity, image_ids=ids)
        po.append(_psnr(_levels(y), np.stack([photos[j]] * len(ids))))
    return float(pr), float(np.concatenate(po).mean())


def test_frost_draws_the_reference_photographs_uniformly() -> None:
    if frost_source() != "imagenet_c":
        pytest.skip("the ImageNet-C frost photographs are not installed")
    counts = np.bincount([int(torch.randint(5, (), generator=g)) for g in ops._generators(0, "frost", 3,
                                                                                       list(range(1000)))], minlength=5)
    assert len(counts) == 5 and counts.min() > 150  # 200 expected each (frost6 is never drawn, as the reference)


def test_frost_layer_is_the_reference_crop(ic) -> None:
    """On a black image the reference returns uint8(c1 * crop): given its photo index and crop corner (its
    first three draws after np.random.seed), our decoded, rescaled photograph gives the same pixels
    (measured: mean |diff| 0.000 levels, max 1: bicubic rounding), for every photograph."""
    if frost_source() != "imagenet_c":
        pytest.skip("the ImageNet-C frost photographs are not installed")
    key, photos = weather._frost_photos()
    black = np.zeros((224, 224, 3), np.uint8)
    for seed in _frost_seeds(1):
        np.random.seed(seed)
        i = np.random.randint(5)
        size = weather._frost_rescaled_size(tuple(photos[i].shape[-2:]), (224, 224))
        top, left = np.random.randint(0, size[0] - 224), np.random.randint(0, size[1] - 224)
        np.random.seed(seed)
        ref = ic.corrupt(black, corruption_name="frost", severity=5).astype(np.float64)
        crop = weather._frost_rescaled(key, i, size)[:, top:top + 224, left:left + 224].permute(1, 2, 0).double()
        ours = np.floor((0.75 * crop).clamp(0, 255).numpy() + 1e-6)
        diff = np.abs(ours - ref)
        assert diff.mean() <= 0.05 and diff.max() <= 2, (seed, i, diff.mean(), diff.max())


def test_frost_psnr_matches_the_reference(ic, photos: np.ndarray) -> None:
    """ImageNet-C frost (the photographs): WEATHER_PSNR_TOL at every severity (measured ours - reference:
    -0.00, +0.53, -0.03, -0.26, -0.21 dB for severities 1..5; the crops differ, the layers are exact, see
    above). The procedural fallback it replaced was 7-9 dB milder."""
    if frost_source() != "imagenet_c":
        pytest.skip("the ImageNet-C frost photographs are not installed")
    bad = []
    for s in range(1, 6):
        ref, ours = _frost_psnr(ic, photos, s)
        print(f"frost severity {s}: PSNR reference {ref:.2f} dB, ours {ours:.2f} dB ({ours - ref:+.2f})")
        if not abs(ours - ref) <= WEATHER_PSNR_TOL:
            bad.append((s, ref, ours))
    assert not bad


def test_procedural_frost_is_far_milder_than_the_reference(ic, photos: np.ndarray, monkeypatch) -> None:
    """Why the photographs: the fallback frost's PSNR is > 5 dB above the reference's at every severity
    (measured +6.9 to +8.5 dB: 16.5-19.5 dB against 9.5-12.3 dB)."""
    monkeypatch.setattr(weather, "_frost_photo_dir", lambda: None)
    monkeypatch.setattr(weather, "_FROST_FALLBACK_WARNED", True)  # quiet
    for s in range(1, 6):
        ref, ours = _frost_psnr(ic, photos, s, per_photo=1)
        print(f"procedural frost severity {s}: PSNR reference {ref:.2f} dB, procedural {ours:.2f} dB")
        assert ours - ref > 5, (s, ref, ours)


# Glass blur: ours is milder than the reference where it iterates (severities 1, 3-5: 2-3 passes), most at
# severity 3 (3 passes): measured at 224 px over 4 photos x 2 seeds, ours - reference = +0.55, +0.02, +1.67,
# +0.63, +0.24 dB for severities 1..5 (at 64 px 'published', 4 photos x 3 seeds: +0.14, -0.25, +0.85, +0.11,
# -0.09 dB; the slow test at 224 px, astronaut x 2 seeds: +0.39, +1.52, +0.17 dB at severities 1, 3, 5). One
# pass (severity 2) matches: the lattice sub-passes (see the blur module) perform the same number of swaps but
# chain them less than the reference's sequential loop, which compounds over passes. A known deviation: the
# tolerance is 1.0 dB, and 2.5 dB at severity 3, which catches a broken glass blur (no swaps: +3 to +5 dB;
# other severities: 3-4 dB away) but not this deviation.
GLASS_TOL = (1.0, 1.0, 2.5, 1.0, 1.0)


def test_glass_blur_psnr_at_64_px_published(ic) -> None:
    """The reference swaps pixels in a Python loop (~0.5 s per 224 px image here), so the fast test runs at
    64 px with scaling='published' (the 224 px constants at the image's own size, as the reference does)."""
    images = np.stack([_photo(n, 64) for n in PHOTOS])
    _check_psnr(ic, images, "glass_blur", range(1, 6), range(3), GLASS_TOL, scaling="published")


@pytest.mark.slow
def test_glass_blur_psnr_at_224_px(ic, photos: np.ndarray) -> None:
    """One photo, severities 1, 3, 5 at 224 px, 2 seeds (6 reference calls of ~0.5 s): GLASS_TOL."""
    _check_psnr(ic, photos[:1], "glass_blur", (1, 3, 5), range(2), (GLASS_TOL[0], GLASS_TOL[2], GLASS_TOL[4]))
