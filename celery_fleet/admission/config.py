"""Parse and validate ``fleet_limits`` once, into frozen value objects.

Nothing downstream of :func:`parse_limits` sees a raw dict: the admission script's
arguments are computed from :class:`LimitConfig` and every error names the setting
and the bad value. This module owns every configuration object of a limit (its windows,
:class:`AdaptiveConfig`, :class:`BreakerConfig`; its priority lanes are parsed by
:mod:`~celery_fleet.admission.lanes`) and every parser; it imports nothing of the package
but ``errors``, ``checks`` and ``lanes``, so the rest can read top-down.

Example::

    limits = parse_limits({
        "openai": {"rpm": 500, "tpm": 200_000, "max_in_flight": 20, "headroom": 0.1},
        "search-api": {"rate": "100/minute", "max_in_flight": 5},
        "daily": {"requests": "500/minute;10000/day", "tokens": "200000/minute;5000000/day"},
    })
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..checks import (
    MAX_SECONDS,
    MAX_UNITS,
    check_name,
    import_object,
    number,
    positive_int,
    reject_unknown,
)
from ..errors import ConfigError
from ..quality.config import QualityConfig, check_detectors, check_fallbacks, parse_quality
from .discover import DiscoverConfig, check_discover, parse_discover
from .lanes import Lanes, parse_lanes
from .tenancy import KeysConfig, WeightsConfig, parse_weights

__all__ = [
    "Window",
    "LimitConfig",
    "AdaptiveConfig",
    "BreakerConfig",
    "parse_limits",
    "parse_limit",
    "parse_adaptive",
    "parse_breaker",
    "parse_validate",
    "DEFAULT_BURST",
]

REQUESTS = "requests"
TOKENS = "tokens"

DEFAULT_LEASE_S = 60.0
#: The fraction of a window's budget that may go at once from a full bucket, by default.
#: Small, because providers that count a sliding window (or enforce a per-minute limit in
#: short quanta) refuse what a full token bucket would let through right after idle: in any
#: span of one period the fleet admits at most ``(1 + burst) * budget``. A request window's
#: default burst is never below one request.
DEFAULT_BURST = 0.1
ADAPTIVE_KEYS = frozenset(
    {
        "adaptive",
        "min_in_flight",
        "initial_in_flight",
        "increase",
        "decrease",
        "latency_target",
        "probe_interval",
    }
)
_BREAKER_KEYS = frozenset(
    {"failure_rate", "min_calls", "window", "reset_timeout", "count_rate_limits"}
)
_KNOWN_KEYS = (
    frozenset(
        {
            "rpm",
            "tpm",
            "rate",
            "requests",
            "tokens",
            "max_in_flight",
            "headroom",
            "lease",
            "burst",
            "breaker",
            "validate",
            "lanes",
            "keys",
            "weights",
            "discover",
            "quality",
        }
    )
    | ADAPTIVE_KEYS
)


@dataclass(frozen=True)
class AdaptiveConfig:
    """AIMD parameters of one limit (bounds: ``min_in_flight`` .. the declared max).

    See :mod:`celery_fleet.admission.adaptive` for what the fleet does with them.
    """

    min_in_flight: int
    initial_in_flight: int
    increase: float
    decrease: float
    latency_target_s: float | None
    probe_interval_s: float


@dataclass(frozen=True)
class BreakerConfig:
    """When a limit's circuit breaker opens and how long it stays open.

    See :mod:`celery_fleet.admission.breaker` for the shared state and the half-open probe.
    """

    failure_rate: float = 0.5
    min_calls: int = 10
    window_s: float = 30.0
    reset_timeout_s: float = 10.0
    count_rate_limits: bool = False


@dataclass(frozen=True)
class Window:
    """One budget of one dimension, e.g. 200,000 tokens per 60 s.

    ``budget`` is what the fleet may use after headroom; ``burst`` is how many units
    may be admitted at once from a full bucket (GCRA's delay tolerance, in units).
    """

    dimension: str
    declared: int
    period_s: int
    budget: float
    burst: float

    @property
    def field(self) -> str:
        """The key of this window's state in the limit's Redis hash (``r:60``, ``t:86400``)."""
        return f"{self.dimension[0]}:{self.period_s}"

    @property
    def emission_ms(self) -> float:
        """Milliseconds one unit occupies: GCRA's emission interval T."""
        return self.period_s * 1000.0 / self.budget

    @property
    def tolerance_ms(self) -> float:
        """GCRA's delay tolerance tau = burst * T."""
        return self.burst * self.emission_ms

    def describe(self) -> str:
        return f"{self.declared} {self.dimension}/{self.period_s}s"


@dataclass(frozen=True)
class LimitConfig:
    """A validated limit: its windows, in-flight cap, headroom, lease TTL, and optionally
    adaptive (AIMD) parameters, a circuit breaker and an output ``validate`` hook."""

    name: str
    windows: tuple[Window, ...]
    max_in_flight: int | None
    headroom: float
    lease_s: float
    burst: float
    adaptive: AdaptiveConfig | None = None
    breaker: BreakerConfig | None = None
    validate: Callable[[Any], object] | None = None
    #: priority lanes (None: one line, every caller alike); see admission/lanes.py
    lanes: Lanes | None = None
    #: every key's own sub-limit (``"keys"``) and fair-share weights (``"weights"``)
    keys: KeysConfig | None = None
    weights: WeightsConfig | None = None
    #: capacity discovery above the declared rate (``"discover"``); see admission/discover.py
    discover: DiscoverConfig | None = None
    #: the quality breaker (garbage detection; see celery_fleet/quality/)
    quality: QualityConfig | None = None

    @property
    def keyed(self) -> bool:
        """Whether callers are admitted by key (sub-limits, fair share): see tenancy.py."""
        return self.keys is not None or self.weights is not None

    @property
    def token_windows(self) -> tuple[Window, ...]:
        return tuple(w for w in self.windows if w.dimension == TOKENS)

    @functools.cached_property
    def max_tokens_per_call(self) -> int | None:
        """The largest ``tokens`` one call can ever be admitted with (None: no token budget).
        Computed once: the windows of a frozen config never change (every ``slot()``
        checks its tokens against it)."""
        bursts = [w.burst for w in self.token_windows]
        return int(min(bursts)) if bursts else None

    def check_tokens(self, tokens: object, what: str = "tokens") -> int:
        """Validate a token estimate for this limit and return it as an int.

        Rejects negative and non-integer values, tokens on a limit that has no token
        budget, and estimates larger than a full bucket (they could never be admitted).
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise ConfigError(f"{what} must be a non-negative int, got {tokens!r}")
        if tokens < 0:
            raise ConfigError(f"{what} must be a non-negative int, got {tokens!r}")
        if tokens == 0:
            return 0
        ceiling = self.max_tokens_per_call
        if ceiling is None:
            raise ConfigError(
                f"{what}={tokens} but limit {self.name!r} has no token budget "
                f"(set 'tpm' or 'tokens' in fleet_limits[{self.name!r}], or pass tokens=0)"
            )
        if tokens > ceiling:
            raise ConfigError(
                f"{what}={tokens} can never be admitted by limit {self.name!r}: "
                f"at most {ceiling} tokens fit in its bucket (burst {self.burst}, "
                f"headroom {self.headroom}); raise fleet_limits[{self.name!r}]['burst'] "
                f"(the fraction of a window that may go at once) to admit larger calls"
            )
        return tokens

    def check_usage(self, tokens: object, what: str = "tokens") -> int:
        """Validate an actual token usage reported after a call (``settle``).

        Unlike an estimate it may exceed a full bucket (the call is already paid for); it
        must be a non-negative int that Redis's Lua numbers hold exactly.
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens:
            raise ConfigError(f"{what} must be a non-negative int, got {tokens!r}")
        if tokens > MAX_UNITS:
            raise ConfigError(
                f"{what}={tokens} is not a plausible token count for limit {self.name!r} "
                f"(at most {MAX_UNITS})"
            )
        return tokens


def parse_limits(raw: object, setting: str = "fleet_limits") -> dict[str, LimitConfig]:
    """Parse the whole ``fleet_limits`` mapping; raise :class:`ConfigError` on any bad entry."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{setting} must be a dict of limit name -> options, got {raw!r}")
    limits = {
        check_name(name, f"{setting} key", colon=False): parse_limit(
            name, spec, f"{setting}[{name!r}]"
        )
        for name, spec in raw.items()
    }
    # a quality fallback names another limit of these, and never leads back
    check_fallbacks({name: cfg.quality for name, cfg in limits.items()}, setting)
    return limits


def parse_limit(name: str, spec: object, setting: str) -> LimitConfig:
    """Parse one limit's options (see the module docstring for the accepted keys)."""
    if isinstance(spec, LimitConfig):
        lanes = spec.lanes and dataclasses.replace(spec.lanes, limit=name)
        return dataclasses.replace(spec, name=name, lanes=lanes)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{setting} must be a dict of options, got {spec!r}")
    reject_unknown(spec, _KNOWN_KEYS, setting)
    headroom = number(spec.get("headroom", 0.0), f"{setting}['headroom']", lo=0.0, hi_open=1.0)
    explicit_burst = spec.get("burst") is not None
    burst = number(spec.get("burst", DEFAULT_BURST), f"{setting}['burst']", lo_open=0.0, hi=1.0)
    lease_s = number(
        spec.get("lease", DEFAULT_LEASE_S), f"{setting}['lease']", lo=1.0, hi=MAX_SECONDS
    )
    max_in_flight = spec.get("max_in_flight")
    if max_in_flight is not None:
        max_in_flight = positive_int(max_in_flight, f"{setting}['max_in_flight']", hi=1_000_000)

    specs = [
        (REQUESTS, _dimension(spec, "rpm", ("rate", "requests"), setting)),
        (TOKENS, _dimension(spec, "tpm", ("tokens",), setting)),
    ]
    windows: list[Window] = []
    for dimension, (key, rates) in specs:
        periods = [period_s for _, period_s in rates]
        if len(set(periods)) != len(periods):
            raise ConfigError(f"{setting}[{key!r}] gives a budget for the same period twice")
        for declared, period_s in rates:
            budget = declared * (1.0 - headroom)
            units = budget * burst
            if dimension == REQUESTS and not explicit_burst:
                units = min(budget, max(units, 1.0))  # the default never forbids one request
            window = Window(dimension, declared, period_s, budget, units)
            if dimension == REQUESTS and window.burst < 1.0:
                raise ConfigError(
                    f"{setting}[{key!r}]: {window.describe()} with headroom {headroom} and burst "
                    f"{burst} leaves a bucket smaller than one request"
                )
            windows.append(window)
    if not windows and max_in_flight is None:
        raise ConfigError(
            f"{setting} limits nothing: give at least one of rpm, tpm, rate, requests, "
            f"tokens, max_in_flight"
        )
    cfg = LimitConfig(
        name,
        tuple(windows),
        max_in_flight,
        headroom,
        lease_s,
        burst,
        adaptive=parse_adaptive(spec, setting, max_in_flight),
        breaker=parse_breaker(spec.get("breaker"), f"{setting}['breaker']"),
        validate=parse_validate(spec.get("validate"), f"{setting}['validate']"),
        lanes=parse_lanes(spec.get("lanes"), name, f"{setting}['lanes']"),
        keys=_parse_keys(name, spec.get("keys"), f"{setting}['keys']"),
        weights=parse_weights(spec.get("weights"), f"{setting}['weights']"),
        discover=parse_discover(spec.get("discover"), f"{setting}['discover']"),
        quality=parse_quality(spec.get("quality"), f"{setting}['quality']"),
    )
    check_discover(cfg, setting)
    check_detectors(cfg.quality, cfg.validate, setting)
    return cfg


#: What a key's sub-limit may set: windows and a cap, in the limit's own format.
_KEY_OPTIONS = frozenset({"rpm", "tpm", "rate", "requests", "tokens", "max_in_flight", "burst"})


def _parse_keys(name: str, value: object, setting: str) -> KeysConfig | None:
    """``"keys": {"rpm": 200, "max_in_flight": 4}``: every key's own budgets."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{setting} must be a dict of options, got {value!r}")
    reject_unknown(value, _KEY_OPTIONS, setting)
    sub = parse_limit(name, value, setting)
    return KeysConfig(sub.windows, sub.max_in_flight)


def _dimension(
    spec: Mapping[str, Any], shorthand: str, long_keys: tuple[str, ...], setting: str
) -> tuple[str, list[tuple[int, int]]]:
    """Return (setting key used, [(amount, period_s)]) for one dimension."""
    present = [k for k in (shorthand, *long_keys) if spec.get(k) is not None]
    if len(present) > 1:
        raise ConfigError(f"{setting} sets {present} for the same budget; use only one")
    if not present:
        return shorthand, []
    key = present[0]
    value = spec[key]
    where = f"{setting}[{key!r}]"
    if key == shorthand or isinstance(value, int):
        return key, [(positive_int(value, where, hi=MAX_UNITS), 60)]
    return key, _rate_string(value, where)


def _rate_string(value: object, where: str) -> list[tuple[int, int]]:
    from limits import parse_many  # parsing only; limits' storage is not used

    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a rate string like '500/minute', got {value!r}")
    try:
        items = parse_many(value)
    except ValueError as exc:
        raise ConfigError(
            f"{where}: cannot parse {value!r} as rates like '500/minute;10000/day' ({exc})"
        ) from None
    out = []
    for item in items:
        if item.amount <= 0:
            raise ConfigError(f"{where}: {value!r} allows nothing; amounts must be positive")
        if item.amount > MAX_UNITS:
            raise ConfigError(f"{where}: {value!r} is more than {MAX_UNITS} per window")
        out.append((int(item.amount), int(item.get_expiry())))
    return out


def parse_adaptive(
    spec: Mapping[str, Any], setting: str, max_in_flight: int | None
) -> AdaptiveConfig | None:
    """The AdaptiveConfig of a limit's options, or None when ``adaptive`` is not set."""
    enabled = spec.get("adaptive", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{setting}['adaptive'] must be True or False, got {enabled!r}")
    extra = sorted(k for k in ADAPTIVE_KEYS - {"adaptive"} if k in spec)
    if not enabled:
        if extra:
            raise ConfigError(f"{setting} sets {extra} but not adaptive=True")
        return None
    if max_in_flight is None:
        raise ConfigError(f"{setting}: adaptive=True needs max_in_flight (the upper bound)")
    low = positive_int(spec.get("min_in_flight", 1), f"{setting}['min_in_flight']")
    if low > max_in_flight:
        raise ConfigError(
            f"{setting}['min_in_flight'] = {low} is above max_in_flight = {max_in_flight}"
        )
    initial = positive_int(
        spec.get("initial_in_flight", max(low, max_in_flight // 2)),
        f"{setting}['initial_in_flight']",
    )
    if not low <= initial <= max_in_flight:
        raise ConfigError(
            f"{setting}['initial_in_flight'] must be between min_in_flight and max_in_flight"
        )
    target = spec.get("latency_target")
    return AdaptiveConfig(
        min_in_flight=low,
        initial_in_flight=initial,
        increase=number(
            spec.get("increase", 1.0), f"{setting}['increase']", lo_open=0.0, hi=max_in_flight
        ),
        decrease=number(
            spec.get("decrease", 0.9), f"{setting}['decrease']", lo_open=0.0, hi_open=1.0
        ),
        latency_target_s=None
        if target is None
        else number(target, f"{setting}['latency_target']", lo_open=0.0, hi=MAX_SECONDS),
        probe_interval_s=number(
            spec.get("probe_interval", 5.0), f"{setting}['probe_interval']", lo=0.001, hi=3600
        ),
    )


def parse_breaker(value: object, setting: str) -> BreakerConfig | None:
    """``True``/a dict of options -> BreakerConfig; ``None``/``False`` -> no breaker."""
    if value is None or value is False:
        return None
    if value is True:
        return BreakerConfig()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{setting} must be True or a dict of breaker options, got {value!r}")
    reject_unknown(value, _BREAKER_KEYS, setting)
    count = value.get("count_rate_limits", False)
    if not isinstance(count, bool):
        raise ConfigError(f"{setting}['count_rate_limits'] must be True or False, got {count!r}")
    return BreakerConfig(
        failure_rate=number(
            value.get("failure_rate", 0.5), f"{setting}['failure_rate']", lo_open=0.0, hi=1.0
        ),
        min_calls=positive_int(value.get("min_calls", 10), f"{setting}['min_calls']", hi=MAX_UNITS),
        window_s=number(value.get("window", 30.0), f"{setting}['window']", lo=0.001, hi=86_400),
        reset_timeout_s=number(
            value.get("reset_timeout", 10.0), f"{setting}['reset_timeout']", lo=0.001, hi=86_400
        ),
        count_rate_limits=count,
    )


def parse_validate(value: object, setting: str) -> Callable[[Any], object] | None:
    """The ``validate`` hook: a callable taking the call's result, falsy (or raising) = garbage.

    A string names it (``"proj.checks.has_content"`` or ``"proj.checks:has_content"``) and is
    imported now, so a typo fails at start-up.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = import_object(value)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"{setting}: cannot import {value!r} ({exc})") from None
    if not callable(value):
        raise ConfigError(f"{setting} must be a callable result -> bool, got {value!r}")
    return value
