"""Small helpers shared across the suite: name checking with suggestions, atomic writes, stable hashes, the
allocator setting the suite runs with, the padding token id."""

from __future__ import annotations

import difflib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from rcit_bench.errors import UserError

#: Token id of ``<pad>`` in the suite's word vocabulary (``rcit_bench.data.vocab.Vocabulary``), which pads every
#: caption batch; the text encoders' embedding ``padding_idx`` and the pointing game's captions default to it.
#: Here, not in ``rcit_bench.data``, so that ``rcit_bench.models`` can use it without importing the data layer.
PAD_ID = 0


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def format_table(rows: Sequence[Sequence[str]], right: Iterable[int] = (), rule: bool = False) -> list[str]:
    """Rows of strings as aligned plain-text lines (two spaces between columns; the columns in `right`
    right-aligned, for numbers), with a dashed rule under the first row when `rule`."""
    right = set(right)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def check_choice(arg: str, value: object, choices: Iterable[str]) -> None:
    """Raise ValueError naming `arg`, the bad value and the valid choices unless value is one of them."""
    choices = list(choices)
    if value in choices:
        return
    listed = ", ".join(f"'{c}'" for c in choices)
    raise UserError(
        f"Argument `{arg}` must be one of {listed}, but got {value!r}.{did_you_mean(str(value), choices)}"
    )


def _current_umask() -> int:
    """The process umask, read without changing it (/proc on Linux): setting it to read it would, for a moment,
    give files that other threads create mode 0666."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; results are shared like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for the machine line of benchmark output."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown cpu"


def proc_status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM), -1 where there is none (not Linux): for the speed
    scripts' memory figures."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak_rss() -> bool:
    """Reset VmHWM (the peak resident memory) to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_header(device: str = "cpu") -> str:
    """Two lines naming the machine and the command, which every benchmark table starts with."""
    import platform
    import sys

    import torch

    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(0)})"
    return (f"# machine: {platform.system()} {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}, "
            f"device {dev}, {allocator_note()}\n# command: python {' '.join(sys.argv)}")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_FREED_MEMORY_KEPT = False


def keep_freed_memory(trim_mb: int = 512, mmap_mb: int = 64) -> bool:
    """Ask glibc to keep up to `trim_mb` of freed heap for reuse, and to serve blocks below `mmap_mb` from it.

    Why: torch's CPU allocator caches nothing, and by default glibc hands a freed heap top back to the kernel
    once it exceeds twice the largest block freed so far. An op chain with several live 10 MB tensors then
    page-faults all of its memory in again on every call; on virtual machines, where a fault costs several
    microseconds, that made some batched corruptions 2-3x slower in some runs (`benchmarks/corruption_speed.py
    --system-malloc` shows it). Same idea as the jemalloc/tcmalloc advice for PyTorch on CPU, without a
    preload. The `rcit-bench` command and the data loader workers call it; library users may too.

    Leaves the allocator alone, returning False, where the C library is not glibc, where the user already
    tunes it through the MALLOC_* environment variables (or GLIBC_TUNABLES), or where RCIT_BENCH_SYSTEM_MALLOC=1
    asks for glibc's defaults. Returns True when applied."""
    if os.environ.get("RCIT_BENCH_SYSTEM_MALLOC", "0") not in ("", "0") or _malloc_tuned_by_env():
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError where the C library is not glibc
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_mb << 20) == 1 or mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    ok = bool(ok and mallopt(_M_TRIM_THRESHOLD, trim_mb << 20) == 1)
    global _FREED_MEMORY_KEPT
    _FREED_MEMORY_KEPT = _FREED_MEMORY_KEPT or ok
    return ok


def _malloc_tuned_by_env() -> bool:
    return any(v in os.environ for v in _MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def allocator_note() -> str:
    """How this process's allocator is set, for benchmark headers."""
    if _FREED_MEMORY_KEPT:
        return "glibc keeps freed memory (keep_freed_memory)"
    if _malloc_tuned_by_env():
        return "malloc tuned by environment"
    return "system default malloc"


def stable_hash(*parts: object) -> int:
    """A 63-bit integer from the sha256 of the parts' reprs: stable across processes and machines."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
