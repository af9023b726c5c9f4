"""The ``"quality"`` option of a limit, parsed once into a frozen :class:`QualityConfig`.

Example::

    fleet_limits = {"openai": {"rpm": 600, "quality": True}}
    fleet_limits = {"openai": {"rpm": 600, "quality": {
        "detectors": ["empty", "refusal", "json"], "window": 30, "ratio": 3.0,
        "min_rate": 0.05, "min_calls": 50, "on_degraded": "fallback:anthropic"}}}

The fallback targets are checked where every limit is known
(:func:`check_fallbacks`, called by :func:`celery_fleet.admission.config.parse_limits`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..checks import check_name, number, positive_int, reject_unknown
from ..errors import ConfigError

__all__ = [
    "QualityConfig",
    "check_detectors",
    "check_fallbacks",
    "parse_quality",
    "DETECTOR_NAMES",
    "ON_DEGRADED",
]

#: Every built-in detector, by the name ``detectors=[...]`` and a verdict's reasons use.
DETECTOR_NAMES = (
    "empty",
    "truncated",
    "refusal",
    "json",
    "schema",
    "repetition",
    "length_shift",
)
#: What a degraded limit does: see :class:`QualityConfig`.
ON_DEGRADED = ("flag", "pause", "fallback:<limit>")

_KEYS = frozenset(
    {"detectors", "window", "ratio", "min_rate", "min_calls", "on_degraded", "reset_timeout",
     "probes", "baseline_calls"}
)  # fmt: skip


@dataclass(frozen=True)
class QualityConfig:
    """When a limit's quality breaker opens, and what admission does while it is open.

    ``window_s``: the sliding window the garbage rate is counted over. It opens when, over
    that window, at least ``min_calls`` were judged, the garbage rate is at least
    ``min_rate`` and at least ``ratio`` times the rolling ``baseline`` (a slow average of
    the garbage rate, over about ``baseline_calls`` calls, learnt while closed): a steady
    base rate is normal, a jump is an incident. It half-opens ``reset_timeout_s`` after
    opening; the probes (the judged calls from then on) open it again when their garbage
    is too much for the baseline, and close it when it is too little for the incident's
    rate (by the exact binomial tail both ways: 10 clean probes after a 50% incident) or,
    after ``probes`` calls, below where degradation starts (docs/quality.md).
    ``on_degraded``: ``"flag"`` (events, metrics, status), ``"pause"`` (admission raises
    :class:`~celery_fleet.QualityDegraded`) or ``"fallback"`` to the limit ``fallback``
    (refused too while the fallback's own quality breaker is open; never chained).
    """

    detectors: tuple[str, ...] = DETECTOR_NAMES
    window_s: float = 30.0
    ratio: float = 3.0
    min_rate: float = 0.05
    min_calls: int = 50
    on_degraded: str = "flag"
    fallback: str | None = None
    reset_timeout_s: float = 10.0
    probes: int = 20
    baseline_calls: int = 1000

    @property
    def gates(self) -> bool:
        """Whether admission reads the breaker (``pause`` or ``fallback``; not ``flag``)."""
        return self.on_degraded != "flag"


def parse_quality(value: object, setting: str) -> QualityConfig | None:
    """``True``/a dict of options -> QualityConfig; ``None``/``False`` -> no quality breaker."""
    if value is None or value is False:
        return None
    if value is True:
        return QualityConfig()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{setting} must be True or a dict of quality options, got {value!r}")
    reject_unknown(value, _KEYS, setting)
    on_degraded, fallback = _on_degraded(value.get("on_degraded", "flag"), setting)
    return QualityConfig(
        detectors=_detectors(value.get("detectors", DETECTOR_NAMES), f"{setting}['detectors']"),
        window_s=number(value.get("window", 30.0), f"{setting}['window']", lo=0.1, hi=86_400),
        ratio=number(value.get("ratio", 3.0), f"{setting}['ratio']", lo=1.0, hi=1000),
        min_rate=number(value.get("min_rate", 0.05), f"{setting}['min_rate']", lo_open=0, hi=1),
        min_calls=positive_int(value.get("min_calls", 50), f"{setting}['min_calls']", hi=10**9),
        on_degraded=on_degraded,
        fallback=fallback,
        reset_timeout_s=number(
            value.get("reset_timeout", 10.0), f"{setting}['reset_timeout']", lo=0.01, hi=86_400
        ),
        probes=positive_int(value.get("probes", 20), f"{setting}['probes']", hi=100_000),
        baseline_calls=positive_int(
            value.get("baseline_calls", 1000), f"{setting}['baseline_calls']", hi=10**7
        ),
    )


def check_detectors(quality: QualityConfig | None, validate: object, setting: str) -> None:
    """``"detectors": []`` means "only the ``validate`` hook judges": a limit without one
    would count every call as fine and its breaker could never open, so that is refused."""
    if quality is not None and not quality.detectors and validate is None:
        raise ConfigError(
            f"{setting}['quality']['detectors'] is empty and the limit has no 'validate' "
            f"hook: no answer could ever be garbage. Use 'quality': False for no quality "
            f"breaker, or give the limit a 'validate' hook ('detectors': [] means only it "
            f"judges)"
        )


def _detectors(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ConfigError(f"{where} must be a list of detector names, got {value!r}")
    unknown = sorted(str(v) for v in value if v not in DETECTOR_NAMES)
    if unknown:
        raise ConfigError(f"{where}: unknown detector(s) {unknown}; known: {list(DETECTOR_NAMES)}")
    return tuple(name for name in DETECTOR_NAMES if name in value)


def _on_degraded(value: object, setting: str) -> tuple[str, str | None]:
    where = f"{setting}['on_degraded']"
    if value in ("flag", "pause"):
        return str(value), None
    if isinstance(value, str) and value.startswith("fallback:"):
        target = check_name(value[len("fallback:") :], f"{where} fallback limit", colon=False)
        return "fallback", target
    raise ConfigError(f"{where} must be one of {list(ON_DEGRADED)}, got {value!r}")


def check_fallbacks(qualities: Mapping[str, QualityConfig | None], setting: str) -> None:
    """Refuse a ``fallback:<limit>`` that names no limit, the limit itself, or closes a
    cycle (``a`` falls back to ``b``, ``b`` to ``a``): ``qualities`` maps every limit to
    its quality options. A chain (``a`` to ``b``, ``b`` to ``c``) is allowed; admission
    never follows it: a call of ``a`` goes to ``b`` or is refused, never to ``c``.
    """
    for name, cfg in qualities.items():
        target = cfg.fallback if cfg is not None else None
        if target is None:
            continue
        where = f"{setting}[{name!r}]['quality']['on_degraded']"
        if target == name or target not in qualities:
            raise ConfigError(
                f"{where} falls back to {target!r}, which is "
                f"{'the limit itself' if target == name else 'not a limit'} "
                f"(limits: {sorted(qualities)})"
            )
        path: list[str] = [name]
        at: str | None = target
        while at is not None and at not in path:
            path.append(at)
            nxt = qualities.get(at)
            at = nxt.fallback if nxt is not None else None
        if at == name:
            raise ConfigError(
                f"{where} falls back to {target!r}, and the fallbacks go round: "
                f"{' -> '.join([*path, name])}; a fallback must not lead back to its limit"
            )
