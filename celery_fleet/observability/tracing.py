"""OpenTelemetry: a span for each admission wait, and the trace context of rescheduled copies.

OpenTelemetry is optional (the ``otel`` extra) and imported lazily: without it nothing
here is loaded past one ``find_spec`` when a Fleet is made, and no watcher sits on the
admission path. With it, a Fleet adds :func:`admission_watcher` to its slot watchers (it
imports OpenTelemetry at its first span, not before):

- a slot that waited for its turn (admitted after a refusal) or gave up (``Throttled``,
  ``CircuitOpen``) records one ``fleet.admission`` span over the wait, a child of the
  caller's current span (a Celery task's ``run/<task>`` span under
  opentelemetry-instrumentation-celery), with ``fleet.limit``, ``fleet.reason`` (the last
  refusal's: ``in_flight``, ``queued``, ``requests/60s``, ``circuit_open``...),
  ``fleet.wait_ms`` (how long this slot waited), ``fleet.outcome`` (``admitted``,
  ``refused``, ``error``), ``fleet.attempts`` and ``fleet.ahead``; a refusal adds
  ``fleet.retry_after_ms`` (the wait the fleet named). A slot admitted at once records
  nothing, unless ``fleet_trace_admissions = "all"``.
- :func:`inject_context` and :func:`context_from` carry a trace through a message kept
  aside: the reschedule path writes the current span's context into a copy's headers, and
  the pump publishes the copy inside that context, so every attempt of a task is in the
  trace its first publisher started (celery_fleet/celery/reschedule.py, pump.py).

Example (what the Fleet does; a plain process gets the same)::

    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())       # the user's SDK setup
    fleet = Fleet(redis_url=..., limits=...)          # fleet.admission spans from now on
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigError
from ..settings import TRACE_MODES

__all__ = [
    "MODES",
    "SPAN_NAME",
    "available",
    "admission_watcher",
    "inject_context",
    "context_from",
    "add_event",
]

#: The values of ``fleet_trace_admissions``: spans for waits and refusals only (default),
#: for every admission, or none.
MODES = TRACE_MODES
#: The name of the span of an admission wait.
SPAN_NAME = "fleet.admission"
#: The instrumentation scope of the fleet's spans.
SCOPE = "celery_fleet"

_available: bool | None = None

Watcher = Callable[[str, str, dict[str, Any]], None]


def available() -> bool:
    """Whether the OpenTelemetry API can be imported (looked up once per process)."""
    global _available
    if _available is None:
        try:
            _available = importlib.util.find_spec("opentelemetry.trace") is not None
        except (ImportError, ValueError):  # a parent package set to None, or no __spec__
            _available = False
    return _available


def admission_watcher(mode: str | None = None, tracer_provider: Any = None) -> Watcher | None:
    """A slot watcher (``Admission.watchers``) that records ``fleet.admission`` spans, or
    None when there is nothing to record.

    ``mode`` is ``fleet_trace_admissions`` (:data:`MODES`); None (the default) is
    ``"waits"`` when OpenTelemetry is installed and off when it is not, while a mode asked
    for by name without it raises :class:`~celery_fleet.errors.ConfigError` naming the
    extra. ``tracer_provider`` defaults to the global one (set by the user's SDK setup,
    also after this is called).

    Example::

        fleet.admission.watchers.append(admission_watcher("all", provider))
    """
    if mode is not None and mode not in MODES:
        raise ConfigError(f"fleet_trace_admissions must be one of {MODES}, got {mode!r}")
    if mode == "off" or (mode is None and not available()):
        return None
    if not available():
        raise ConfigError(
            f"fleet_trace_admissions={mode!r} needs OpenTelemetry: pip install 'celery-fleet[otel]'"
        )
    every = mode == "all"
    tracers: list[Any] = []  # made at the first span: a Fleet alone imports no OpenTelemetry

    def record(limit: str, fields: Mapping[str, Any]) -> None:
        from opentelemetry import trace

        if not tracers:
            tracers.append(trace.get_tracer(SCOPE, tracer_provider=tracer_provider))
        tracer = tracers[0]
        end_ns = time.time_ns()
        waited_s = float(fields.get("waited_s") or 0.0)
        attributes: dict[str, Any] = {
            "fleet.limit": limit,
            "fleet.reason": str(fields.get("reason") or ""),
            "fleet.wait_ms": round(waited_s * 1000.0, 3),
            "fleet.outcome": str(fields.get("outcome", "admitted")),
            "fleet.attempts": int(fields.get("attempts") or 1),
            "fleet.ahead": int(fields.get("ahead") or 0),
        }
        if "wait_ms" in fields:  # a refusal: the wait the fleet named
            attributes["fleet.retry_after_ms"] = int(fields["wait_ms"])
        span = tracer.start_span(
            SPAN_NAME,
            start_time=end_ns - int(waited_s * 1e9),
            attributes=attributes,
        )
        if attributes["fleet.outcome"] == "error":
            span.set_status(trace.StatusCode.ERROR, str(fields.get("error", "")))
        span.end(end_time=end_ns)

    def watch(event: str, limit: str, fields: dict[str, Any]) -> None:
        if event == "waited":
            record(limit, fields)
        elif every and event == "admitted" and int(fields.get("attempts") or 1) <= 1:
            record(limit, {**fields, "outcome": "admitted"})

    return watch


def inject_context(headers: MutableMapping[str, Any]) -> None:
    """Write the current span's context into ``headers`` (``traceparent``, ``tracestate``
    with the default propagators): nothing without OpenTelemetry or a current span, and an
    earlier context in ``headers`` is then kept."""
    if not available():
        return
    from opentelemetry import propagate

    propagate.inject(headers)


@contextmanager
def context_from(headers: Mapping[str, Any] | None) -> Iterator[None]:
    """Run the block in the trace context ``headers`` carry (from :func:`inject_context` or
    an instrumented publisher); the current context when they carry none."""
    if not available() or not headers:
        yield
        return
    from opentelemetry import context, propagate

    found = propagate.extract({str(k): v for k, v in headers.items() if isinstance(v, str)})
    token = context.attach(found)
    try:
        yield
    finally:
        context.detach(token)


def add_event(name: str, attributes: Mapping[str, Any]) -> None:
    """Add an event to the current span, if it records (nothing without OpenTelemetry)."""
    if not available():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, dict(attributes))
