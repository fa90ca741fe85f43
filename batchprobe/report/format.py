"""Number and unit formatting shared by the views: pure functions of figures."""

from __future__ import annotations

import math
from collections.abc import Sequence

from batchprobe.search import Outcome

OUTCOME_STYLE = {
    Outcome.FIT: "green",
    Outcome.OOM: "red",
    Outcome.LIMIT: "yellow",
    Outcome.ERROR: "bold red",
}


def percent(part: int | float | None, whole: int | float | None) -> str:
    if part is None or not whole:
        return "-"
    return f"{100.0 * part / whole:.1f}%"


def time_unit(values: Sequence[float | None]) -> tuple[str, float]:
    """A unit for a column of durations: (label, divisor)."""
    known = [v for v in values if v is not None]
    top = max(known) if known else 0.0
    if top < 1:
        return "ms", 1e-3
    if top < 120:
        return "s", 1.0
    if top < 2 * 3600:
        return "min", 60.0
    if top < 3 * 86400:
        return "h", 3600.0
    return "days", 86400.0


def byte_unit(values: Sequence[int | None]) -> tuple[str, float]:
    known = [v for v in values if v is not None]
    top = max(known) if known else 0
    return ("GiB", 1024.0**3) if top >= 10 * 1024**3 else ("MiB", 1024.0**2)


def num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    if magnitude >= digits:
        return f"{x:,.0f}"
    return f"{x:.{max(0, digits - 1 - magnitude)}f}"


def lr_column(values: Sequence[float | None]) -> list[str]:
    """Learning rates of one column in one notation: plain (0.2, 0.0125) when all of them read
    well that way (>= 0.01), else all in exponent notation (1.3e-3, 1.1e-2)."""
    known = [v for v in values if v is not None]
    plain = all(1e-2 <= v < 100 for v in known)
    out = []
    for v in values:
        if v is None:
            out.append("-")
        elif plain:
            out.append(f"{v:.3g}")
        else:
            mantissa, exponent = f"{v:.1e}".split("e")
            out.append(f"{mantissa}e{int(exponent)}")
    return out


def plural(n: int, word: str) -> str:
    """ "1 probe", "3 probes"."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def bar(value: float, top: float, width: int) -> str:
    """A horizontal bar of `value` out of `top` in `width` cells, to an eighth of a cell."""
    if top <= 0:
        return ""
    eighths = round(8 * width * value / top)
    full, part = divmod(eighths, 8)
    return "█" * full + ("▏▎▍▌▋▊▉"[part - 1] if part else "")
