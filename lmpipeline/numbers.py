"""Numbers the way people read them, in log lines, summaries, tables and chart axes (one rule everywhere).

    10730.4  -> 10,730        large values: whole, with thousands separators
    2.3917   -> 2.392         ordinary values: 4 significant digits
    0.0015   -> 0.0015
    5.468e-9 -> 5.47e-09      tiny values (learning rates): 3 significant digits, scientific
    5e-4     -> 5e-04         (trailing zeros of the mantissa dropped, so axis ticks stay short)
    1073.4   -> 1,073
    1000     -> 1,000         integers: separators from 1,000 on

Files meant for programs (metrics.jsonl, run.json, results.json) keep full precision; this is display only.
"""

from __future__ import annotations

import math

LARGE = 1e3  # from here on a value's fraction is noise to a reader (tokens/s, token counts)
TINY = 1e-3  # below this, fixed notation hides the digits that matter (learning rates)


def fmt_number(value) -> str:
    """`value` for display; anything that is not a number comes back as str(value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1000 else str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= LARGE:
        return f"{value:,.0f}"
    if magnitude < TINY:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"
    return f"{value:.4g}"


def fmt_pairs(values: dict, skip=()) -> str:
    """`key=value key=value` of a metrics record, each number through fmt_number."""
    return " ".join(f"{k}={fmt_number(v)}" for k, v in values.items() if k not in skip)
