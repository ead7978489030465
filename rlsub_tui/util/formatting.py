"""Numbers for people: percentages with sensible digits, counts as 1.2M, sizes and durations."""

from __future__ import annotations

import math


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage; more digits near 0% and 100% so 99.97% does not read as 100.0%, and a value
    closer still is bounded (>99.999%), so only exactly 0 and 1 print as 0.0% and 100.0%. Every percentage the
    tree, the strip, the tables and the CLI print goes through here."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    v = 100 * x
    if 0 < v < 10 ** -digits or 100 - 10 ** -digits < v < 100:
        fine = digits + 2
        text = f"{v:.{fine}f}"
        if float(text) in (0.0, 100.0):  # still rounds to an end: never print 0.000% or 100.000% for what is not
            return f"<{10 ** -fine:.{fine}f}%" if v < 50 else f">{100 - 10 ** -fine:.{fine}f}%"
        return f"{text}%"
    return f"{v:.{digits}f}%"


def count(n: int | float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def duration(seconds: float) -> str:
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def ratio(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def sci(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.3g}"
