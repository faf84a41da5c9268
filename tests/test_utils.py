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


_HEAP_PROBE = """
import ctypes, json, sys
from rcit_bench.utils import allocator_note, keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else None


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
blocks = [libc.malloc(20_000_000) for _ in range(3)]  # three live 20 MB blocks, as a corruption's tensors are
for b in blocks:
    libc.free(b)
print(json.dumps({"applied": applied, "free_heap": libc.mallinfo2().fordblks, "note": allocator_note()}))
"""


def _heap_probe(mode: str, env: dict | None = None) -> dict:
    import ctypes
    import json
    import subprocess
    import sys

    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018 - glibc >= 2.33
    except AttributeError:
        pytest.skip("needs glibc's mallinfo2")
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_keep_freed_memory_keeps_freed_tensors_for_reuse():
    kept = _heap_probe("keep")
    default = _heap_probe("default")
    assert kept["applied"] is True and "keeps freed memory" in kept["note"]
    assert kept["free_heap"] >= 60_000_000  # the three freed blocks stay in the heap: no page faults next time
    assert default["free_heap"] < 20_000_000  # glibc's default hands them back to the kernel
    assert default["note"] == "system default malloc"


def test_keep_freed_memory_leaves_a_user_tuned_allocator_alone():
    tuned = _heap_probe("keep", {"MALLOC_TRIM_THRESHOLD_": "1000000"})
    assert tuned["applied"] is False and tuned["note"] == "malloc tuned by environment"
    assert _heap_probe("keep", {"RCIT_BENCH_SYSTEM_MALLOC": "1"})["applied"] is False
