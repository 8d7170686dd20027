"""Parsing MAC and latency budgets."""

from __future__ import annotations

import math
import re
from typing import Any

from fxprune.errors import InvalidBudgetError

__all__ = ["parse_mac_budget", "parse_latency_budget", "format_macs"]

_ACCEPTED_MACS = (
    "accepted forms: a fraction of the original MACs (0.5, '50%'), or an absolute number of MACs "
    "(1.8e9, '1.8G', '500M', '2.5e9', '1800000000'; suffixes K/M/G/T, optional 'MACs')"
)
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_mac_budget(value: Any, base_macs: int) -> int:
    """Turn a user budget into an absolute MAC count.

    A float in (0, 1] or a percentage string is a fraction of ``base_macs``; a number above 1 or a
    string with a K/M/G/T suffix is an absolute count. Raises ``InvalidBudgetError`` otherwise.
    """
    if isinstance(value, bool) or value is None:
        raise InvalidBudgetError(f"mac_budget={value!r} is not a budget; {_ACCEPTED_MACS}")
    if isinstance(value, (int, float)):
        try:
            v = float(value)
        except OverflowError:
            v = math.inf
        if not math.isfinite(v) or v <= 0:
            raise InvalidBudgetError(f"mac_budget={value!r:.40} must be a positive, finite number; {_ACCEPTED_MACS}")
        return int(math.floor(v * base_macs)) if v <= 1.0 else int(math.floor(v))
    if isinstance(value, str):
        text = value.strip().replace("_", "").replace(",", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*%", text)
        if m:
            pct = float(m.group(1))
            if not math.isfinite(pct):
                raise InvalidBudgetError(f"mac_budget={value!r:.40} is not a finite percentage; {_ACCEPTED_MACS}")
            if pct <= 0:
                raise InvalidBudgetError(f"mac_budget={value!r}: a percentage must be above 0; {_ACCEPTED_MACS}")
            return int(math.floor(pct / 100.0 * base_macs))
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)\s*(?:MACs?|macs?)?", text)
        if m:
            v = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
            if not math.isfinite(v):
                raise InvalidBudgetError(f"mac_budget={value!r:.40} is not a finite number of MACs; {_ACCEPTED_MACS}")
            if v <= 0:
                raise InvalidBudgetError(f"mac_budget={value!r} must be positive; {_ACCEPTED_MACS}")
            if not m.group(2) and v <= 1.0:
                return int(math.floor(v * base_macs))
            return int(math.floor(v))
    raise InvalidBudgetError(f"mac_budget={value!r} is not understood; {_ACCEPTED_MACS}")


_ACCEPTED_LAT = "accepted forms: '20ms', '1.5 ms', '500us', '0.02s', a number of milliseconds (20.0), or a fraction of the original's measured latency ('60%')"


def parse_latency_budget(value: Any, base_ms: float | None = None) -> float:
    """Turn a latency budget into milliseconds ('20ms', '500us', 20.0, '60%' of ``base_ms``)."""
    if isinstance(value, bool) or value is None:
        raise InvalidBudgetError(f"latency_budget={value!r} is not a budget; {_ACCEPTED_LAT}")
    if isinstance(value, (int, float)):
        try:
            v = float(value)
        except OverflowError:
            v = math.inf
        if not math.isfinite(v) or v <= 0:
            raise InvalidBudgetError(f"latency_budget={value!r:.40} must be positive and finite; {_ACCEPTED_LAT}")
        return v
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(ms|us|µs|s|%)?", text)
        if m and 0 < float(m.group(1)) < math.inf:
            v = float(m.group(1))
            unit = m.group(2) or "ms"
            if unit == "%":
                if base_ms is None:
                    raise InvalidBudgetError("a percentage latency budget needs the original's measured latency")
                return v / 100.0 * base_ms
            return v * {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[unit]
    raise InvalidBudgetError(f"latency_budget={value!r} is not understood; {_ACCEPTED_LAT}")


def format_macs(macs: float) -> str:
    """``4089184256`` -> ``'4.089 G'``."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(macs) >= scale:
            return f"{macs / scale:.3f} {unit}"
    return f"{macs:.0f}"
