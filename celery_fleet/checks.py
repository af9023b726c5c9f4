"""Small validators shared by the configuration parsers; each raises a ConfigError naming
``where`` (the setting and key the value came from)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from .errors import ConfigError

__all__ = ["check_name", "number", "positive_int", "reject_unknown"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/@+\-]+$")


def check_name(name: object, what: str, colon: bool = True) -> str:
    """Validate a limit name or namespace: it becomes part of a Redis hash tag.

    The tag is ``{namespace:limit}``, so a limit name may not contain ``:`` (``colon=False``):
    otherwise ``("a:b", "c")`` and ``("a", "b:c")`` would share keys.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or (not colon and ":" in name):
        chars = "_.:/@+-" if colon else "_./@+-"
        raise ConfigError(
            f"{what} must be a non-empty string of letters, digits and {chars} "
            f"(no spaces or braces), got {name!r}"
        )
    return name


def reject_unknown(options: Iterable[str], known: AbstractSet[str], where: str) -> None:
    """Raise naming every option of ``options`` not in ``known`` (a typo fails at start-up)."""
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{where} has unknown option(s) {unknown}; known: {sorted(known)}")


def positive_int(value: object, where: str) -> int:
    """``value`` as a positive int (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where} must be a positive int, got {value!r}")
    return value


def number(
    value: object,
    where: str,
    lo: float | None = None,
    lo_open: float | None = None,
    hi: float | None = None,
    hi_open: float | None = None,
) -> float:
    """``value`` as a float within the given closed (lo, hi) or open (lo_open, hi_open) bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    v = float(value)
    bad = (
        (lo is not None and v < lo)
        or (lo_open is not None and v <= lo_open)
        or (hi is not None and v > hi)
        or (hi_open is not None and v >= hi_open)
        or not math.isfinite(v)
    )
    if bad:
        bounds = " ".join(
            s
            for s in (
                f">= {lo}" if lo is not None else "",
                f"> {lo_open}" if lo_open is not None else "",
                f"<= {hi}" if hi is not None else "",
                f"< {hi_open}" if hi_open is not None else "",
            )
            if s
        )
        raise ConfigError(f"{where} must be {bounds}, got {value!r}")
    return v
