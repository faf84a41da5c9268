"""The `rcit-bench corrupt` preview: labelled rows and columns, the rows/columns the flags pick, the format the
--out suffix picks, and one-line errors for bad flags, all before any corruption runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from rcit_bench import cli
from rcit_bench.data.corruptions import (
    GRID_MAX_TOTAL_PIXELS, RATE_CORRUPTIONS, SEVERITY_CORRUPTIONS, check_grid_budget, corruption_grid,
)
from rcit_bench.data.corruptions import preview as P
from rcit_bench.errors import UserError


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A 32 x 48 (H x W) image with structure, so corruptions change it."""
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 48), indexing="ij")
    base = torch.stack([x, y, (x + y) / 2])
    return (0.8 * base + 0.2 * torch.rand(3, 32, 48, generator=g)).clamp(0, 1)


def _picture(tmp_path: Path, width: int = 48, height: int = 32) -> Path:
    path = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a corruption ran")

    monkeypatch.setattr(P, "corruption_grid", boom)


def _error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("rcit-bench corrupt: error: ")]
    assert len(lines) == 1, err
    return lines[0][len("rcit-bench corrupt: error: "):]


# ---- the plan: defaults keep the preview's old content ----


def test_default_plan_is_every_severity_corruption_at_every_severity() -> None:
    plan = P.plan_preview()
    assert plan.severity_names == SEVERITY_CORRUPTIONS and plan.severities == (1, 2, 3, 4, 5)
    assert plan.rate_names == () and plan.tiles == 19 * 6


def test_rates_add_the_rate_rows_and_only_picks_rows_of_either_mode() -> None:
    plan = P.plan_preview(rates=(0.2, 0.6))
    assert plan.severity_names == SEVERITY_CORRUPTIONS and plan.rate_names == RATE_CORRUPTIONS
    assert plan.tiles == 19 * 6 + 2 * 3
    plan = P.plan_preview(only=("speckle", "fog"), severities=(1, 5))
    assert (plan.severity_names, plan.severities, plan.rate_names, plan.rates) == (("fog",), (1, 5), ("speckle",),
                                                                                    (0.6,))
    assert [s[2] for s in plan.sections()] == [["clean", "s1", "s5"], ["clean", "rate 0.6"]]


def test_flag_parsing() -> None:
    assert P.parse_only(["fog,snow", " frost ", "fog"]) == ("fog", "snow", "frost")
    assert P.parse_severities("5, 1,3,3") == (1, 3, 5)
    assert P.parse_rates("0.6,0.2,1") == (0.2, 0.6, 1.0)
    assert P.parse_only(None) is P.parse_severities(None) is P.parse_rates(None) is None


# ---- the mosaic ----


def test_mosaic_is_labelled_and_its_tiles_are_the_grids(image: torch.Tensor) -> None:
    plan = P.plan_preview(only=("gaussian_noise", "fog", "salt_pepper"), severities=(2, 5), rates=(0.3,))
    lay = P._layout(plan, 32, 48, 2)
    labelled = np.array(P.preview_mosaic(image, plan, seed=3))
    blank = np.array(P.preview_mosaic(image, plan, seed=3, labels=False))
    assert labelled.shape == blank.shape == (lay.height, lay.width, 3)
    assert (labelled.shape[1], labelled.shape[0]) == P.preview_size(plan, 32, 48)
    # the label column and the header band carry text (not constant, and not what the unlabelled one has)
    column, header = labelled[:, :lay.label_w], labelled[:lay.header_h, lay.label_w:]
    assert column.min() < 100 and column.max() == 255 and header.min() < 100
    assert not np.array_equal(column, blank[:, :lay.label_w])
    assert not np.array_equal(header, blank[:lay.header_h, lay.label_w:])
    assert (blank[:, :lay.label_w] == 255).all()
    # the tiles are corruption_grid's, rounded to 8 bits as save_image does, where the layout puts them
    sev = corruption_grid(image, severities=(2, 5), names=("gaussian_noise", "fog"), padding=0, seed=3)
    want = sev.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    dy, dx = (lay.cell_h - 32) // 2, (lay.cell_w - 48) // 2
    for r in range(2):
        for k in range(3):
            y, x = lay.header_h + r * (lay.cell_h + 2) + dy, lay.label_w + k * (lay.cell_w + 2) + dx
            assert np.array_equal(labelled[y:y + 32, x:x + 48], want[r * 32:(r + 1) * 32, k * 48:(k + 1) * 48])
    assert np.array_equal(labelled[lay.header_h + dy:lay.header_h + dy + 32, lay.label_w + dx:lay.label_w + dx + 48],
                          (image * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())  # clean


def test_layout_counts_rows_and_columns() -> None:
    """Width follows the most columns of a section, height the rows and the sections."""
    h, w = 120, 160  # tiles larger than their labels: cells are the tiles
    full = P._layout(P.plan_preview(), h, w, 2)
    assert (full.cell_w, full.cell_h, full.cols) == (w, h, 6)
    assert full.width == full.label_w + 6 * w + 5 * 2 and full.height == full.header_h + 19 * h + 18 * 2
    few = P._layout(P.plan_preview(only=("fog", "snow"), severities=(3,)), h, w, 2)
    assert few.width == few.label_w + 2 * w + 2 and few.height == few.header_h + 2 * h + 2
    both = P._layout(P.plan_preview(only=("fog", "speckle"), severities=(3,), rates=(0.1, 0.5, 0.9)), h, w, 2)
    assert both.cols == 4 and both.height == 2 * (both.header_h + h) + both.margin


def test_tiny_tiles_grow_their_cells_to_fit_the_labels(image: torch.Tensor) -> None:
    plan = P.plan_preview(only=("fog",), severities=(1,), rates=None)
    lay = P._layout(plan, 8, 8, 2)
    assert lay.cell_w > 8 and lay.cell_h > 8 and not lay.two_lines
    assert P.preview_mosaic(image[:, :8, :8], plan).size == (lay.width, lay.height)


def test_old_pillow_falls_back_to_the_bitmap_font(image: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    bitmap = getattr(ImageFont, "load_default_imagefont", None)
    if bitmap is None:
        pytest.skip("this Pillow has only the bitmap default font")

    def old_load_default(**kw: Any) -> ImageFont.ImageFont:
        if kw:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap()

    monkeypatch.setattr(P.ImageFont, "load_default", old_load_default)
    plan = P.plan_preview(only=("fog",), severities=(1,))
    mosaic = np.array(P.preview_mosaic(image, plan))
    lay = P._layout(plan, 32, 48, 2)
    assert mosaic[:, :lay.label_w].min() < 100  # text drawn


# ---- the command line ----


@pytest.mark.parametrize("suffix,fmt", [(".jpg", "JPEG"), (".JPEG", "JPEG"), (".png", "PNG")])
def test_out_suffix_picks_the_format(tmp_path: Path, suffix: str, fmt: str) -> None:
    out = tmp_path / "sub" / f"grid{suffix}"
    rc = cli.main(["corrupt", str(_picture(tmp_path)), "--out", str(out), "--size", "0", "--only", "fog,speckle",
                   "--severities", "1,5", "--rates", "0.2,0.6"])
    assert rc == 0
    plan = P.plan_preview(only=("fog", "speckle"), severities=(1, 5), rates=(0.2, 0.6))
    with Image.open(out) as im:
        assert im.format == fmt and im.mode == "RGB" and im.size == P.preview_size(plan, 32, 48)


def test_jpeg_is_much_smaller_than_png(image: torch.Tensor, tmp_path: Path) -> None:
    mosaic = P.preview_mosaic(image, P.plan_preview(only=("gaussian_noise", "snow")))
    png, jpg = P.save_preview(mosaic, tmp_path / "m.png"), P.save_preview(mosaic, tmp_path / "m.jpg")
    assert jpg < png / 2 and png == (tmp_path / "m.png").stat().st_size
    with Image.open(tmp_path / "m.png") as im:  # PNG is lossless
        assert np.array_equal(np.array(im), np.array(mosaic))


def test_the_rows_and_columns_follow_the_flags(tmp_path: Path) -> None:
    base = ["corrupt", str(_picture(tmp_path)), "--size", "0"]
    sizes = {}
    for key, args in {"fog": ["--only", "fog"], "two": ["--only", "fog", "--only", "snow"],
                      "sev": ["--only", "fog,snow", "--severities", "2"],
                      "rate": ["--only", "fog,snow,speckle", "--severities", "2", "--rates", "0.1,0.5,0.9"]}.items():
        assert cli.main([*base, "--out", str(tmp_path / f"{key}.png"), *args]) == 0
        with Image.open(tmp_path / f"{key}.png") as im:
            sizes[key] = im.size
    assert sizes["two"][0] == sizes["fog"][0] and sizes["two"][1] > sizes["fog"][1]  # one more row
    assert sizes["sev"][0] < sizes["two"][0] and sizes["sev"][1] == sizes["two"][1]  # fewer columns
    assert sizes["rate"][0] > sizes["sev"][0] and sizes["rate"][1] > sizes["sev"][1]  # a section of 4 columns
    plan = P.plan_preview(only=("fog", "snow", "speckle"), severities=(2,), rates=(0.1, 0.5, 0.9))
    assert sizes["rate"] == P.preview_size(plan, 32, 48)


@pytest.mark.parametrize("args,says", [
    (["--only", "gausian_noise"],
     "--only got unknown corruption 'gausian_noise'; the corruptions are gaussian_noise, shot_noise, "),
    (["--only", ","], "--only needs a comma-separated list, but got ','."),
    (["--severities", "0,3"], "--severities must be comma-separated severities from 1 to 5 (e.g. 1,3,5), but got "
                              "'0,3': '0' is not one."),
    (["--severities", "2.5"], "--severities must be comma-separated severities from 1 to 5 (e.g. 1,3,5), but got "
                              "'2.5': '2.5' is not one."),
    (["--rates", "0,0.5"], "--rates must be comma-separated noise rates (fractions of pixels) in (0, 1] (e.g. "
                           "0.2,0.6), but got '0,0.5': '0' is not one (rate 0 is the clean column, always shown)."),
    (["--rates", "0.2,nan"], "--rates must be comma-separated noise rates (fractions of pixels) in (0, 1] (e.g. "
                             "0.2,0.6), but got '0.2,nan': 'nan' is not one."),
    (["--rates", "1.5"], "--rates must be comma-separated noise rates (fractions of pixels) in (0, 1] (e.g. "
                         "0.2,0.6), but got '1.5': '1.5' is not one."),
    (["--only", "fog", "--rates", "0.2"], "--rates applies to the noise-rate corruptions (speckle, salt_pepper), but "
                                          "--only picked none of them (fog); drop --rates, or add one to --only."),
    (["--only", "speckle", "--severities", "2"], "--severities applies to the severity-mode corruptions, but --only "
                                                 "picked none of them (speckle); drop --severities, or use --rates."),
])
def test_bad_flags_are_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch, args: list[str], says: str) -> None:
    _must_not_run(monkeypatch)
    out = tmp_path / "grid.png"
    msg = _error(capsys, cli.main(["corrupt", str(_picture(tmp_path)), "--out", str(out), *args]))
    assert msg.startswith(says) if says.endswith(" ") else msg == says
    assert not out.exists()


def test_unknown_name_suggests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = _error(capsys, cli.main(["corrupt", str(_picture(tmp_path)), "--out", str(tmp_path / "g.png"),
                                   "--only", "fog,gausian_noise"]))
    assert "salt_pepper." in msg and msg.endswith("Did you mean 'gaussian_noise'?")


@pytest.mark.parametrize("name,says", [
    ("grid.gif", "suffix '.gif'"), ("grid", "no suffix"), ("grid.webp", "suffix '.webp'"),
])
def test_unknown_out_suffix_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch, name: str, says: str) -> None:
    _must_not_run(monkeypatch)
    out = tmp_path / name
    msg = _error(capsys, cli.main(["corrupt", str(_picture(tmp_path)), "--out", str(out)]))
    assert msg == (f"--out '{out}' has {says}; the preview is written as PNG or JPEG by the suffix: use one of .png, "
                   f".jpg, .jpeg.")
    assert not out.exists()


def test_a_mosaic_too_tall_for_jpeg_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _must_not_run(monkeypatch)
    image = _picture(tmp_path, 1024, 4096)  # 19 rows of 4096 px
    w, h = P.preview_size(P.plan_preview(), 4096, 1024)
    msg = _error(capsys, cli.main(["corrupt", str(image), "--out", str(tmp_path / "g.jpg"), "--size", "0"]))
    assert msg == (f"--out '{tmp_path / 'g.jpg'}': the mosaic would be {w}x{h} px (width x height), over JPEG's 65500 "
                   f"px a side; write a .png, or pass a smaller --size or fewer rows/columns (--only, --severities, "
                   f"--rates).")


def test_budget_counts_the_chosen_tiles(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The full built-in grid at 4 Mpx is the budget: fewer tiles pass, more (the rate rows) are refused."""
    check_grid_budget(2048, 2048, tiles=114)
    check_grid_budget(2048, 2048, tiles=2)
    with pytest.raises(UserError, match=r"too large for a corruption grid of 118 tiles: 494,927,872 px in all, over "
                                        r"the budget of 478,150,656 px"):
        check_grid_budget(2048, 2048, tiles=118)
    assert GRID_MAX_TOTAL_PIXELS == 114 * 2048 * 2048
    _must_not_run(monkeypatch)
    image = _picture(tmp_path, 20, 20)
    msg = _error(capsys, cli.main(["corrupt", str(image), "--out", str(tmp_path / "g.png"), "--size", "2048",
                                   "--rates", "0.6"]))
    assert msg == (f"image '{image}' (20x20 px, width x height) is too large for a preview of 118 tiles: --size 2048 "
                   f"makes it 2048x2048 px, 494,927,872 px in all, over its budget of 478,150,656 px (the full "
                   f"built-in grid of 114 tiles at 4,194,304 px); pass a smaller --size, at most 2012, or fewer "
                   f"rows/columns (--only, --severities, --rates).")
    assert 118 * 2012 ** 2 <= GRID_MAX_TOTAL_PIXELS < 118 * 2013 ** 2
    with pytest.raises(UserError, match="too large for a corruption grid of 118 tiles"):
        P.preview_mosaic(torch.zeros(3, 2048, 2048), P.plan_preview(rates=(0.6,)))


def test_corruption_grid_takes_rows_of_either_mode(image: torch.Tensor) -> None:
    grid = corruption_grid(image, severities=(1,), names=("fog", "speckle"), rates=(0.2, 0.6), padding=0)
    assert grid.shape == (3, 2 * 32, 3 * 48)  # 1 + the most levels of a row
    assert grid[:, :32, 2 * 48:].eq(1).all()  # fog has one severity: the rest of its row is white
    assert not torch.equal(grid[:, 32:, 2 * 48:], image)
    with pytest.raises(ValueError, match=r"Argument `rate` must be a number in \[0, 1\]"):
        corruption_grid(image, names=("speckle",), rates=(2.0,))
