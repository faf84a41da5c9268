"""The corruption registry: every corruption, built-in or a user's, is one decorated function.

    @register_corruption("vignette", family="digital", random=False, suite="user")
    def vignette(x, s, gens):  # x (B, C, H, W) float in [0, 1]; s = severity - 1 (0..4); gens: one per image
        ...

A corruption function ``fn(x, level, gens) -> Tensor`` gets the images as float (B, C, H, W) (C = 3, or 1 for
grey images unless ``colour``), the severity index 0..4 (``mode="severity"``) or the rate in [0, 1]
(``mode="rate"``), and one CPU ``torch.Generator`` per image (an empty list when ``random=False``). It must
not write to ``x`` and returns the same shape; `corrupt` clamps the result to [0, 1] unless ``in_range``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from rcit_bench.utils import did_you_mean

__all__ = ["CorruptionInfo", "register_corruption", "corruption_info", "list_corruptions", "check_level", "MODES"]

MODES: tuple[str, ...] = ("severity", "rate")
# list_corruptions order: severity mode before rate mode; within a mode, these suites first, in this order,
# then any other suite; within a suite, registration order
_SUITE_ORDER: tuple[str, ...] = ("imagenet_c", "held_out", "rcit")


@dataclass(frozen=True)
class CorruptionInfo:
    """What the registry knows about one corruption.

    name: the name passed to `corrupt`. family: 'noise', 'blur', 'weather', 'digital' (or a user's own).
    mode: 'severity' (an int 1..5; the function gets severity - 1) or 'rate' (a float in [0, 1]).
    colour: needs RGB (grey images are expanded to RGB and converted back with the ITU-R 709 luma).
    random: draws random numbers (deterministic ones get no generators: cheaper).
    in_range: the output is in [0, 1] by construction (no clamp). suite: 'imagenet_c' (the 15 ImageNet-C
    corruptions), 'held_out' (its 4 held-out ones), 'rcit' (the RCIT rate-mode ones) or a user's own.
    fn: fn(x, level, gens) -> Tensor. source: optional ``() -> str`` naming what the pixels come from when
    that can differ between installations (frost: 'imagenet_c' photographs or the 'procedural' fallback); the
    runner records it in the result files of the corruption's cells."""

    name: str
    family: str
    mode: str
    colour: bool
    random: bool
    in_range: bool
    suite: str
    fn: Callable[..., Tensor]
    source: Callable[[], str] | None = None


_REGISTRY: dict[str, CorruptionInfo] = {}  # registration order


def register_corruption(
    name: str,
    *,
    family: str,
    mode: str = "severity",
    colour: bool = False,
    random: bool = True,
    in_range: bool = False,
    suite: str = "user",
    source: Callable[[], str] | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator registering ``fn(x, level, gens) -> Tensor`` as corruption `name` (see CorruptionInfo).

    Returns the function unchanged. A name registered twice is an error (ValueError)."""
    for arg, value in (("name", name), ("family", family), ("suite", suite)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"Argument `{arg}` must be a non-empty string, but got {value!r}.")
    if mode not in MODES:
        listed = ", ".join(f"'{m}'" for m in MODES)
        raise ValueError(f"Argument `mode` must be one of {listed}, but got {mode!r}.{did_you_mean(str(mode), MODES)}")

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if not callable(fn):
            raise ValueError(f"register_corruption({name!r}) must decorate a function, but got {type(fn).__name__}.")
        if name in _REGISTRY:
            old = _REGISTRY[name].fn
            raise ValueError(f"Corruption {name!r} is already registered by "
                             f"{getattr(old, '__module__', '?')}.{getattr(old, '__qualname__', repr(old))}.")
        _REGISTRY[name] = CorruptionInfo(name=name, family=family, mode=mode, colour=bool(colour),
                                         random=bool(random), in_range=bool(in_range), suite=suite, fn=fn,
                                         source=source)
        return fn

    return decorate


def list_corruptions() -> list[str]:
    """Every registered name: severity mode first (the 15 ImageNet-C, the 4 held-out, then any other suite),
    then rate mode (the 2 RCIT names first); registration order within a suite."""
    index = {n: i for i, n in enumerate(_REGISTRY)}

    def key(info: CorruptionInfo) -> tuple[int, int, int]:
        suite = _SUITE_ORDER.index(info.suite) if info.suite in _SUITE_ORDER else len(_SUITE_ORDER)
        return MODES.index(info.mode), suite, index[info.name]

    return [info.name for info in sorted(_REGISTRY.values(), key=key)]


def corruption_info(name: str) -> CorruptionInfo:
    """The CorruptionInfo of `name`; ValueError listing the names (with a suggestion) when unknown."""
    info = _REGISTRY.get(name) if isinstance(name, str) else None
    if info is None:
        names = list_corruptions()
        listed = ", ".join(f"'{n}'" for n in names)
        raise ValueError(
            f"Argument `name` must be one of {listed}, but got {name!r}.{did_you_mean(str(name), names)}"
        )
    return info


def _kind(info: CorruptionInfo) -> str:
    if info.mode == "rate":
        return "an RCIT noise-rate corruption" if info.suite == "rcit" else "a rate-mode corruption"
    return "an ImageNet-C corruption" if info.suite in ("imagenet_c", "held_out") else "a severity-mode corruption"


def check_level(name: str, severity: int | None = None, rate: float | None = None) -> int | float:
    """The one severity-or-rate rule: validate the pair for corruption `name`, return the level (the int
    severity or the float rate; it seeds the random numbers).

    Severity-mode corruptions take an int severity in 1..5 and no rate; rate-mode ones a rate (fraction of
    pixels) in [0, 1] and no severity. ValueError (naming the argument and the bad value) otherwise, or when
    `name` is unknown."""
    info = corruption_info(name)
    if severity is not None and rate is not None:
        raise ValueError(
            f"Pass exactly one of `severity` or `rate`, but got severity={severity!r} and rate={rate!r}."
        )
    if info.mode == "rate":
        if severity is not None:
            raise ValueError(
                f"Corruption {name!r} is {_kind(info)}: pass `rate` (fraction of pixels in "
                f"[0, 1]) instead of `severity` (got severity={severity!r})."
            )
        if rate is None:
            raise ValueError(f"Corruption {name!r} needs `rate` (fraction of pixels in [0, 1]), but got rate=None.")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"Argument `rate` must be a number in [0, 1], but got {rate!r}.")
        return float(rate)
    if rate is not None:
        rate_names = [n for n in list_corruptions() if _REGISTRY[n].mode == "rate"]
        raise ValueError(
            f"Corruption {name!r} is {_kind(info)}: pass `severity` (1..5) instead of `rate` "
            f"(got rate={rate!r}); rate mode is for {', '.join(repr(n) for n in rate_names)}."
        )
    if severity is None:
        raise ValueError(f"Corruption {name!r} needs `severity` (an int in 1..5), but got severity=None.")
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"Argument `severity` must be an int in 1..5, but got {severity!r}.")
    return int(severity)
