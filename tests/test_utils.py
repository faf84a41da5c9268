import os

import pytest

from rcit_bench.utils import atomic_write_text, check_choice, did_you_mean, stable_hash


def test_check_choice_message_lists_choices_and_suggests():
    with pytest.raises(ValueError) as err:
        check_choice("name", "gausian_noise", ["gaussian_noise", "shot_noise"])
    msg = str(err.value)
    assert "`name`" in msg and "'gausian_noise'" in msg
    assert "'gaussian_noise', 'shot_noise'" in msg
    assert "Did you mean 'gaussian_noise'?" in msg
    check_choice("name", "shot_noise", ["gaussian_noise", "shot_noise"])  # no error


def test_did_you_mean_empty_when_nothing_close():
    assert did_you_mean("zzz", ["alpha", "beta"]) == ""


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new content")
    assert path.read_text() == "new content"
    assert os.listdir(path.parent) == ["r.json"]


def test_atomic_write_gives_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_text(path, "finished")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "half")
    assert path.read_text() == "finished"
    assert os.listdir(tmp_path) == ["r.json"]


def test_stable_hash_is_stable_and_distinct():
    assert stable_hash(0, "speckle", 0.6, 17) == stable_hash(0, "speckle", 0.6, 17)
    assert stable_hash(0, "speckle", 0.6, 17) != stable_hash(1, "speckle", 0.6, 17)
    assert 0 <= stable_hash("x") < 2**63
    # fixed value: the hash must not depend on the process (PYTHONHASHSEED) or machine
    assert stable_hash("a", 1) == int.from_bytes(__import__("hashlib").sha256(repr(("a", 1)).encode()).digest()[:8], "little") & (2**63 - 1)
