"""The command line: a user's mistake is one line (exit 2, the traceback only with -v); a bug shows its
traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from rcit_bench import cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"


def _bad_spec(tmp_path: Path) -> Path:
    text = SMOKE.read_text().replace("method: vsepp", "method: vsep", 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_spec_mistake_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["bench", str(_bad_spec(tmp_path)), "--results-dir", str(tmp_path / "runs"), "--no-wandb"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("rcit-bench bench: error: Spec key `entries[0].method` must be one of")
    assert "Did you mean 'vsepp'" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_verbose_shows_the_traceback_of_a_mistake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["-v", "bench", str(_bad_spec(tmp_path)), "--results-dir", str(tmp_path / "runs"), "--no-wandb"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err and "validate_spec" in err
    assert err.rstrip().splitlines()[-1].startswith("rcit-bench bench: error: Spec key `entries[0].method`")


def test_missing_image_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["corrupt", str(tmp_path / "nope.png"), "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "not found: pass an image file or one of astronaut" in err and "Traceback" not in err


def test_a_bug_deep_inside_is_not_turned_into_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A ValueError from inside training (a shape bug, say) is not the user's mistake: it propagates with its
    traceback instead of becoming `error: ...`."""
    from rcit_bench.bench import runner

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("mat1 and mat2 shapes cannot be multiplied (32x64 and 32x32)")

    monkeypatch.setattr(runner, "run_spec", broken)
    with pytest.raises(ValueError, match="shapes cannot be multiplied"):
        cli.main(["bench", str(SMOKE), "--results-dir", str(tmp_path / "runs"), "--no-wandb"])
