"""Small helpers shared across the suite: name checking with suggestions, atomic writes, stable hashes."""

from __future__ import annotations

import difflib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def check_choice(arg: str, value: object, choices: Iterable[str]) -> None:
    """Raise ValueError naming `arg`, the bad value and the valid choices unless value is one of them."""
    choices = list(choices)
    if value in choices:
        return
    listed = ", ".join(f"'{c}'" for c in choices)
    raise ValueError(
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
            f"device {dev}\n# command: python {' '.join(sys.argv)}")


def stable_hash(*parts: object) -> int:
    """A 63-bit integer from the sha256 of the parts' reprs: stable across processes and machines."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
