"""The Celery app test_otel.py runs in a real `celery worker`, traced by OpenTelemetry.

Set up as the instrumentation's documentation says: the SDK and
``CeleryInstrumentor().instrument()`` in each pool process (``worker_process_init``), so the
worker's main process, where the deferred-task pump publishes, is not instrumented. Each
finished span is written, as one JSON line, to a Redis list the test reads
(:class:`RedisSpanExporter`, a real SDK exporter behind a ``SimpleSpanProcessor``).
With ``FLEET_IT_OTEL=worker`` the main process is traced too (``worker_init``), as
``opentelemetry-instrument celery worker`` does. Configured from environment variables set
by the test (broker, namespace, queue, defer, where tracing is set up).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_init, worker_process_init
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from celery_fleet import Fleet, FleetTask, fleet_task
from celery_fleet.celery.signals import task_rescheduled

BROKER = os.environ.get("FLEET_IT_BROKER", "redis://127.0.0.1:6379/10")
NAMESPACE = os.environ.get("FLEET_IT_NS", "otel")

app = Celery("fleet_otel", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_IT_REDIS", BROKER),
    fleet_namespace=NAMESPACE,
    fleet_limits={"gate": {"max_in_flight": 1}},  # held shut by the test
    fleet_defer=os.environ.get("FLEET_IT_DEFER", "redis"),
    fleet_pump_period=0.2,
    fleet_backoff_base=0.1,
    fleet_backoff_max=0.5,
    task_default_queue=os.environ.get("FLEET_IT_QUEUE", "fleet-otel"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
fleet = Fleet(app)
_probe = redis.Redis.from_url(os.environ.get("FLEET_IT_REDIS", BROKER))


def key(name: str) -> str:
    return f"{NAMESPACE}:probe:{name}"


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """What the test reads of a finished span."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, **dict(e.attributes or {})} for e in span.events],
        "pid": os.getpid(),
    }


class RedisSpanExporter(SpanExporter):
    """Each span as a JSON line on a Redis list (one client per process, made lazily)."""

    def __init__(self, url: str, list_key: str) -> None:
        self.url, self.list_key = url, list_key
        self._client: redis.Redis | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
        self._client.rpush(self.list_key, *(json.dumps(span_record(s)) for s in spans))
        return SpanExportResult.SUCCESS


def init_tracing(**_: Any) -> None:
    """The SDK, exporting to Redis, and the Celery instrumentation, in this process."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    provider = TracerProvider(resource=Resource.create({"service.name": "fleet-otel-it"}))
    exporter = RedisSpanExporter(os.environ.get("FLEET_IT_REDIS", BROKER), key("spans"))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()


if os.environ.get("FLEET_IT_OTEL") == "worker":
    # The whole worker, main process included (where the pump publishes), as
    # `opentelemetry-instrument celery worker` does; pool processes inherit it.
    worker_init.connect(init_tracing, weak=False)
else:  # as the instrumentation's docs say: in each pool process only
    worker_process_init.connect(init_tracing, weak=False)


@fleet_task(app=app, shared=False, bind=True, max_wait=0)
def gated(self: FleetTask, tag: str) -> dict[str, Any]:
    """Refused (and rescheduled) while the test holds 'gate' shut; runs once let in."""
    _probe.incr(key(f"runs:{tag}"))
    with self.fleet.slot("gate"):
        pass
    return {"reschedules": self.throttling.reschedules, "id": self.request.id}


@fleet_task(app=app, shared=False, bind=True)
def waits(self: FleetTask, tag: str) -> int:
    """Waits in place (up to 30 s) for the slot the test holds."""
    with self.fleet.slot("gate", max_wait=30) as slot:
        return int(slot.attempts)


@task_rescheduled.connect
def _count_reschedule(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is not None and request.id:
        _probe.incr(key(f"rescheduled:{request.id}"))
