"""One way to print a number: the terminal, the HTML report and the explain page spell it alike.

The page's JavaScript port is ``formatNumber`` in ``explain/static/math.js``; the browser tests
check it against :func:`format_number` on :func:`format_vectors`.
"""

from __future__ import annotations

import math

#: From this magnitude on, numbers are printed in scientific notation.
SCIENTIFIC_FROM = 1e6


def format_number(value: float | int | None, digits: int = 4) -> str:
    """The text of ``value`` with ``digits`` decimals.

    ``None`` -> ``"n/a"``; an ``int`` -> its digits; NaN -> ``"nan"``; infinities -> ``"inf"``,
    ``"-inf"``; ``|value| < 1e6`` -> fixed point (``"14.0242"``); larger -> scientific with
    ``digits`` decimals and a two-digit exponent (``"5.8956e+06"``). Zero is never ``"-0.0000"``.

    Examples:
        >>> format_number(14.02421), format_number(5895600.2072), format_number(None), format_number(856)
        ('14.0242', '5.8956e+06', 'n/a', '856')
        >>> format_number(float("inf")), format_number(-1e-9, 2)
        ('inf', '0.00')
    """
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if abs(value) < SCIENTIFIC_FROM:
        text = f"{value:.{digits}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text
    return f"{value:.{digits}e}"


def format_vectors() -> list[dict]:
    """``[{"value", "digits", "text"}]``: cases for checking the page's port against :func:`format_number`
    (values chosen away from exact decimal ties, where JavaScript and Python round differently)."""
    values = (0.0, -1e-9, 1.0, 2.718281828, 14.02421, 123.456789, -3.14159265, 999999.4, 1e6, 5895600.2072, 1.234e17)
    values += (-2.6e7, float("inf"), float("-inf"))
    return [{"value": v, "digits": d, "text": format_number(v, d)} for v in values for d in (0, 2, 4)]
