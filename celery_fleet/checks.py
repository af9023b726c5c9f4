"""Small validators shared by the configuration parsers; each raises a ConfigError naming
``where`` (the setting and key the value came from)."""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = [
    "check_port",
    "check_lease_id",
    "MAX_LEASE_ID",
    "check_name",
    "check_max_wait",
    "number",
    "positive_int",
    "reject_unknown",
    "suggest",
    "MAX_UNITS",
    "MAX_SECONDS",
    "Number",
    "Count",
    "OneOf",
    "Check",
    "number_text",
]

_NAME_RE = re.compile(r"[A-Za-z0-9_.:/@+\-]+")
#: Limit names and namespaces become part of every Redis key: keep them short.
MAX_NAME_LENGTH = 100
#: The largest count (requests, tokens, calls) anything accepts: 2**53, the largest integer
#: a Lua number (a double) holds exactly, so the scripts never round or overflow.
MAX_UNITS = 2**53
#: The longest duration in seconds a setting accepts (a year): longer is a typo, and
#: Redis's millisecond expiries must stay far from overflow.
MAX_SECONDS = 366 * 86_400


def check_name(name: object, what: str, colon: bool = True) -> str:
    """Validate a limit name or namespace: it becomes part of a Redis hash tag.

    The tag is ``{namespace:limit}``, so a limit name may not contain ``:`` (``colon=False``):
    otherwise ``("a:b", "c")`` and ``("a", "b:c")`` would share keys.
    """
    if (
        not isinstance(name, str)
        or len(name) > MAX_NAME_LENGTH
        or not _NAME_RE.fullmatch(name)
        or (not colon and ":" in name)
    ):
        chars = "_.:/@+-" if colon else "_./@+-"
        raise ConfigError(
            f"{what} must be a non-empty string of at most {MAX_NAME_LENGTH} letters, digits "
            f"and {chars} (no spaces, newlines or braces), got {name!r}"
        )
    return name


def check_port(value: object, what: str) -> int | None:
    """None (off) or a TCP port 1-65535."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{what} must be a TCP port (1-65535) or None, got {_short(value)}")
    return value


#: Longest lease id a caller may name (it travels in every release and renewal).
MAX_LEASE_ID = 200


def check_lease_id(lease_id: object, longest: int = MAX_LEASE_ID) -> str:
    """A lease (or ticket) id a caller names: a non-empty str of at most ``longest``
    characters, else :class:`ConfigError` before anything reaches Redis."""
    if isinstance(lease_id, str) and 0 < len(lease_id) <= longest:
        return lease_id
    raise ConfigError(
        f"a lease id must be a non-empty str of at most {longest} characters, "
        f"got {_short(lease_id)}"
    )


def reject_unknown(options: Iterable[str], known: AbstractSet[str], where: str) -> None:
    """Raise naming every option of ``options`` not in ``known`` and the closest known one
    (a typo fails at start-up, not silently at 02:00)."""
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"{where} has unknown option(s) {suggest(unknown, known)}; known: {sorted(known)}"
        )


def suggest(unknown: Iterable[str], known: Iterable[str]) -> str:
    """``'tokns' (did you mean 'tokens'?), 'x'``: each unknown name with its closest match."""
    import difflib  # only a mistake needs it, and every import of the package reads this module

    choices = list(known)
    return ", ".join(
        f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
        for name in unknown
        for close in [difflib.get_close_matches(str(name).lower(), choices, n=1)]
    )


def check_max_wait(max_wait: object, what: str = "max_wait") -> float:
    """Validate a ``max_wait`` in seconds: ``>= 0``, at most a year, or ``math.inf`` (no
    deadline)."""
    if isinstance(max_wait, float) and max_wait == math.inf:
        return max_wait
    return number(max_wait, what, lo=0.0, hi=MAX_SECONDS)


def positive_int(value: object, where: str, hi: int = MAX_UNITS) -> int:
    """``value`` as a positive int no larger than ``hi`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where} must be a positive int, got {_short(value)}")
    if value > hi:
        raise ConfigError(f"{where} must be a positive int <= {hi}, got {_short(value)}")
    return value


def _short(value: object) -> str:
    """``repr(value)``, cut short: a 400-digit number makes an unreadable message."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"


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
        raise ConfigError(f"{where} must be a number, got {_short(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond any float, e.g. 10**400
        v = math.inf
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
        raise ConfigError(f"{where} must be {bounds} (finite), got {_short(value)}")
    return v


def import_object(path: str) -> Any:
    """The object a dotted path names: ``"pkg.mod:attr"`` or ``"pkg.mod.attr"`` (as Celery
    and kombu read them), imported now so that a typo fails where it is configured."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not a 'module.attribute' path")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# -- rules of the settings table (celery_fleet.settings) -------------------------------
#
# Each rule is called as ``rule(value, where, parsed)``: ``where`` is the name an error
# gives, ``parsed`` the settings checked before this one (by setting name), and
# ``describe()`` says in the settings reference what the rule accepts.


@dataclass(frozen=True)
class Number:
    """A finite number within closed (``lo``, ``hi``) or open (``lo_open``) bounds.

    ``at_most`` names settings (earlier in the table) whose values bound this one from
    above too; ``capped_by`` names settings whose values it is lowered to when above them;
    ``whole`` keeps the int part (a byte count).
    """

    lo: float | None = None
    lo_open: float | None = None
    hi: float | None = None
    at_most: tuple[str, ...] = ()
    capped_by: tuple[str, ...] = ()
    whole: bool = False

    def __call__(self, value: object, where: str, parsed: Mapping[str, Any]) -> float:
        bounds = [b for b in (self.hi, *(parsed[n] for n in self.at_most)) if b is not None]
        hi = min(bounds, default=None)
        checked = number(value, where, lo=self.lo, lo_open=self.lo_open, hi=hi)
        checked = min([checked, *(parsed[n] for n in self.capped_by)])
        return int(checked) if self.whole else checked

    def describe(self) -> str:
        parts = [f">= {number_text(self.lo)}" if self.lo is not None else ""]
        parts.append(f"> {number_text(self.lo_open)}" if self.lo_open is not None else "")
        parts.append(f"<= {number_text(self.hi)}" if self.hi is not None else "")
        parts += [f"<= `{n}`" for n in self.at_most]
        text = ", ".join(p for p in parts if p)
        for name in self.capped_by:
            text += f"; a value above `{name}` counts as `{name}`"
        return text


def number_text(value: float) -> str:
    """``30`` for 30.0, ``0.05`` for 0.05: a bound or default as the docs show it."""
    return str(int(value)) if float(value).is_integer() else repr(value)


@dataclass(frozen=True)
class Count:
    """An int (not a bool) within ``lo``..``hi``, or None (unset)."""

    lo: float
    hi: float

    def __call__(self, value: object, where: str, parsed: Mapping[str, Any]) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an int, got {value!r}")
        return int(number(value, where, lo=self.lo, hi=self.hi))

    def describe(self) -> str:
        return f"an int >= {number_text(self.lo)}, <= {number_text(self.hi)}, or None"


@dataclass(frozen=True)
class OneOf:
    """One of a few strings."""

    choices: tuple[str, ...]

    def __call__(self, value: object, where: str, parsed: Mapping[str, Any]) -> str:
        if value not in self.choices:
            raise ConfigError(f"{where} must be one of {self.choices}, got {value!r}")
        return str(value)

    def describe(self) -> str:
        return "one of " + ", ".join(f"`{c!r}`" for c in self.choices)


@dataclass(frozen=True)
class Check:
    """A check of its own (``check(value, where)``), described in words for the docs.

    ``check=None``: the value is taken as given here and checked together with the
    settings it depends on (the Redis connection settings).
    """

    check: Callable[[Any, str], Any] | None
    text: str

    def __call__(self, value: object, where: str, parsed: Mapping[str, Any]) -> Any:
        return value if self.check is None else self.check(value, where)

    def describe(self) -> str:
        return self.text
