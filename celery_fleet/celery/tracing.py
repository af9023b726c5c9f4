"""The trace of a rescheduled task: its copies stay in the trace of its first publish.

opentelemetry-instrumentation-celery injects the current span's context into each message's
headers as it is published (``before_task_publish``) and makes the task's ``run/<task>``
span a child of it (``task_prerun``). A copy published from inside the task (a countdown
reschedule, a broker backup) is therefore traced already: its ``apply_async`` span is a
child of the attempt that rescheduled it. A copy kept in Redis is published later by the
pump, on a thread with no current span: its ``apply_async`` span would start a new trace.

So the reschedule path writes the running attempt's context into the copy's headers
(:func:`carry_trace`), and the pump publishes each copy inside the context its headers
carry (:func:`publish_in_trace`). Every attempt of a task is then a child of the attempt
before it (through that copy's ``apply_async`` span where the publishing process is
instrumented), the shape Celery's own ``retry()`` gives, whether the copy waited in Redis
or as a countdown and whether the pump's process is instrumented or not. The attempt that
rescheduled gets a ``fleet.rescheduled`` span event saying why and for how long.

Nothing here loads OpenTelemetry when it is not installed (observability/tracing.py).
"""

from __future__ import annotations

from typing import Any

from ..admission.run import Throttling
from ..errors import Backpressure
from ..observability import tracing

__all__ = ["carry_trace", "note_reschedule", "publish_in_trace"]


def carry_trace(headers: dict[str, Any]) -> None:
    """Write the running attempt's trace context into a copy's ``headers`` (the context of
    the message it came with stays when no span is current here)."""
    tracing.inject_context(headers)


def note_reschedule(exc: Backpressure, state: Throttling, via: str) -> None:
    """A ``fleet.rescheduled`` event on the running attempt's span: why, and until when."""
    tracing.add_event(
        "fleet.rescheduled",
        {
            "fleet.limit": exc.limit,
            "fleet.reason": exc.reason,
            "fleet.retry_after_ms": int(exc.wait_ms),
            "fleet.countdown_s": state.countdown_s,
            "fleet.reschedules": state.reschedules,
            "fleet.via": via,
        },
    )


def publish_in_trace(signature: Any) -> None:
    """Publish a deferred copy inside the trace context its headers carry."""
    headers = (signature.options or {}).get("headers")
    with tracing.context_from(headers if isinstance(headers, dict) else None):
        signature.apply_async()
