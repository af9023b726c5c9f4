"""A limit with fields changed at runtime: which may change, and the validated result.

``fleet.set_limit("openai", rpm=900, max_in_flight=16)`` names only what changes. The
new :class:`LimitConfig` is the configured one with those fields replaced, parsed by the
same :func:`~celery_fleet.admission.config.parse_limit` as at start-up (so a bad value
is the same :class:`~celery_fleet.ConfigError` naming the field), from the configured
limit written back as options (:func:`runtime_spec`) with the fields set over it.

Fields a limit may change at runtime (:data:`RUNTIME_FIELDS`): its budgets (``rpm``,
``tpm``, ``rate``, ``requests``, ``tokens``), ``max_in_flight``, ``headroom`` and
``burst``. A budget given replaces the configured budgets of its dimension (``rpm=900``
replaces ``"requests": "500/minute;10000/day"``: both of its windows); ``None`` removes
one (``tpm=None``: no token budget, ``max_in_flight=None``: no cap). Not at runtime:
``lease`` (each process's lease keeper times its renewals by it), the adaptive and
breaker parameters and ``validate`` (code, not a number every process can read).

Example::

    base = parse_limit("openai", {"rpm": 500, "max_in_flight": 8}, "fleet_limits['openai']")
    merged = merge_fields({}, {"rpm": 900})
    cfg = with_fields(base, merged)        # 900 requests/60s, still max_in_flight 8

This module does no I/O; :mod:`celery_fleet.admission.runtime` stores and polls the fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .config import DEFAULT_BURST, REQUESTS, LimitConfig, Window, parse_limit

__all__ = ["RUNTIME_FIELDS", "check_fields", "merge_fields", "runtime_spec", "with_fields"]

#: The options of a limit that ``set_limit`` may change, each with the options it replaces.
_GROUPS: dict[str, frozenset[str]] = {
    **dict.fromkeys(("rpm", "rate", "requests"), frozenset({"rpm", "rate", "requests"})),
    **dict.fromkeys(("tpm", "tokens"), frozenset({"tpm", "tokens"})),
    "max_in_flight": frozenset({"max_in_flight"}),
    "headroom": frozenset({"headroom"}),
    "burst": frozenset({"burst"}),
}
RUNTIME_FIELDS = frozenset(_GROUPS)


def check_fields(name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a ``set_limit`` call as a dict; a :class:`ConfigError` naming any field
    that cannot change at runtime, or when there is none."""
    where = f"fleet.set_limit({name!r})"
    if not fields:
        raise ConfigError(
            f"{where} changes nothing: give at least one of {', '.join(sorted(RUNTIME_FIELDS))}"
        )
    unknown = sorted(str(k) for k in fields if k not in RUNTIME_FIELDS)
    if unknown:
        raise ConfigError(
            f"{where} cannot change {unknown} at runtime; it changes only "
            f"{', '.join(sorted(RUNTIME_FIELDS))} (restart with a new fleet_limits for the rest)"
        )
    return dict(fields)


def merge_fields(current: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The override after setting ``new`` over the ``current`` one: a field replaces the
    fields of its group (``rpm`` replaces a ``rate`` set before)."""
    merged = dict(current)
    for key in new:
        for other in _GROUPS[key]:
            merged.pop(other, None)
    merged.update(new)
    return merged


def _rates(windows: list[Window], shorthand: str) -> dict[str, Any]:
    if len(windows) == 1 and windows[0].period_s == 60:
        return {shorthand: windows[0].declared}
    key = "requests" if shorthand == "rpm" else "tokens"
    return {key: ";".join(f"{w.declared}/{w.period_s} second" for w in windows)}


def runtime_spec(cfg: LimitConfig) -> dict[str, Any]:
    """The options that :func:`parse_limit` turns back into ``cfg``'s budgets, cap,
    headroom, burst, lease and adaptive parameters (what a runtime change is merged with)."""
    spec: dict[str, Any] = {"headroom": cfg.headroom, "lease": cfg.lease_s}
    requests = [w for w in cfg.windows if w.dimension == REQUESTS]
    tokens = [w for w in cfg.windows if w.dimension != REQUESTS]
    if requests:
        spec.update(_rates(requests, "rpm"))
    if tokens:
        spec.update(_rates(tokens, "tpm"))
    if cfg.max_in_flight is not None:
        spec["max_in_flight"] = cfg.max_in_flight
    if cfg.burst != DEFAULT_BURST:  # the default keeps a request window's one-request floor
        spec["burst"] = cfg.burst
    a = cfg.adaptive
    if a is not None:
        spec.update(
            adaptive=True,
            min_in_flight=a.min_in_flight,
            initial_in_flight=a.initial_in_flight,
            increase=a.increase,
            decrease=a.decrease,
            latency_target=a.latency_target_s,
            probe_interval=a.probe_interval_s,
        )
    return spec


def with_fields(base: LimitConfig, fields: Mapping[str, Any]) -> LimitConfig:
    """``base`` (the configured limit) with ``fields`` set, validated as at start-up.

    Raises :class:`ConfigError` naming the field and its bad value; ``base`` is returned
    unchanged for no fields. What the fields do not cover (breaker, validate, the adaptive
    parameters) stays as configured; an adaptive limit's starting cap is kept within a
    narrowed ``max_in_flight``.
    """
    if not fields:
        return base
    spec = merge_fields(runtime_spec(base), fields)
    cap = spec.get("max_in_flight")
    if base.adaptive is not None and isinstance(cap, int) and not isinstance(cap, bool):
        low = base.adaptive.min_in_flight
        spec["initial_in_flight"] = max(low, min(base.adaptive.initial_in_flight, cap))
    parsed = parse_limit(base.name, spec, f"fleet.set_limit({base.name!r})")
    return dataclasses.replace(
        base,
        windows=parsed.windows,
        max_in_flight=parsed.max_in_flight,
        headroom=parsed.headroom,
        burst=parsed.burst,
        adaptive=parsed.adaptive,
    )
