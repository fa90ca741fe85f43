"""Byte sizes and durations: parsing user text and formatting figures. Pure.

GiB is 1024**3 bytes, GB is 1000**3 bytes; both are accepted, and figures are shown in binary units.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """'24GiB' -> 25769803776, '512MB' -> 512000000, 1024 -> 1024. Raises ValueError with the reason."""
    if isinstance(text, bool):
        raise ValueError("expected a size such as 24GiB, 512MB or a number of bytes")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("a size cannot be negative")
        _not_absurd(text, text)
        return text
    if isinstance(text, float):
        if not math.isfinite(text) or text < 0 or text != int(text):
            raise ValueError("a size in bytes must be a whole, non-negative number")
        _not_absurd(text, text)
        return int(text)
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 24GiB, 512MiB, 80GB or bytes")
    number, unit = match.groups()
    if not unit and math.isfinite(float(number)) and not float(number).is_integer():
        raise ValueError(
            f"{text!r} has no unit and is not a whole number of bytes; write e.g. {number}GiB"
        )
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"unknown unit {unit!r} in {text!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
        )
    value = float(number) * factor
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite size")
    _not_absurd(value, text)
    return round(value)


#: no machine has this much memory (1 EiB): a larger size is a typo
ABSURD_BYTES = 1024**6


def _not_absurd(value: float, text: object) -> None:
    if value >= ABSURD_BYTES:
        raise ValueError(f"{text!r} is more memory than any machine has; use e.g. 80GiB")


@dataclass(frozen=True)
class MemorySize:
    """A memory amount given either in bytes or as a fraction of the device's capacity."""

    bytes: int | None = None
    fraction: float | None = None

    def resolve(self, capacity_bytes: int) -> int:
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return int(self.fraction * capacity_bytes)

    def __str__(self) -> str:
        if self.bytes is not None:
            return format_bytes(self.bytes)
        return f"{self.fraction:g} of capacity"


def parse_memory_size(value: str | int | float) -> MemorySize:
    """A byte size ('24GiB', 8000000000) or a fraction of capacity (0.9, '90%')."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 24GiB or a fraction such as 0.9")
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"cannot read {value!r} as a percentage") from None
        value = pct / 100.0
        if not 0 < value <= 1:
            raise ValueError(f"a percentage of capacity must be in (0%, 100%], got {pct:g}%")
        return MemorySize(fraction=value)
    if isinstance(value, float) and value <= 1:
        if not 0 < value <= 1:
            raise ValueError(f"a fraction of capacity must be in (0, 1], got {value:g}")
        return MemorySize(fraction=value)
    if isinstance(value, str):
        try:
            as_float = float(value)
        except ValueError:
            as_float = None
        if as_float is not None and 0 < as_float <= 1 and "." in value:
            return MemorySize(fraction=as_float)
    plain = not isinstance(value, str) or not any(c.isalpha() for c in value)
    try:
        number = float(value)
    except ValueError:
        number = None
    if plain and number is not None and 1 < number < 1024**2:
        raise ValueError(
            f"{value!r} is ambiguous: write a fraction of capacity as 0.9 or 90%, and a size "
            "with its unit, as 1.5GiB or 512MiB (a plain number is bytes: at least 1 MiB)"
        )
    size = parse_bytes(value)
    if size <= 0:
        raise ValueError("a memory size must be positive")
    return MemorySize(bytes=size)


def format_bytes(n: int | float | None) -> str:
    """Binary units, three significant figures: 1.50 GiB, 512 MiB, 980 B."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            value = n / factor
            digits = 2 if value < 10 else 1 if value < 100 else 0
            return f"{sign}{value:.{digits}f} {unit}"
    return f"{sign}{int(n)} B"


def format_seconds(s: float | None) -> str:
    """Human durations: 12.3 ms, 4.56 s, 3 min 20 s, 2 h 05 min, 3.2 days."""
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 60:
        return f"{s:.3g} s"
    if s < 3600:
        minutes, seconds = divmod(round(s), 60)
        return f"{minutes} min {seconds:02d} s"
    if s < 86400 * 2:
        hours, rest = divmod(round(s), 3600)
        return f"{hours} h {rest // 60:02d} min"
    return f"{s / 86400:.1f} days"


def format_count(x: float | None) -> str:
    """Rates and counts with k / M suffixes: 1.23k, 45.6M."""
    if x is None:
        return "-"
    # by the rounded value: 999.7 is "1k", not "1e+03"
    for suffix, factor in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(float(f"{x:.3g}")) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"
