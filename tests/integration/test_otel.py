"""OpenTelemetry traces across reschedules: a real `celery worker` traced by the real SDK and
opentelemetry-instrumentation-celery (tests/integration/otel_app.py), spans read back from
Redis.

The test process publishes each task under a span of its own (the SDK with an
InMemorySpanExporter), its context injected into the message's headers as the
instrumentation would; every span the worker exports for that task must be in that one
trace, across reschedules kept in Redis by the pump (``fleet_defer="redis"``) and sent as
countdown messages (``"countdown"``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.integration.test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 60.0


@pytest.fixture(
    scope="module",
    params=[("redis", "pool"), ("redis", "worker"), ("countdown", "worker")],
    ids=lambda p: f"defer={p[0]},traced={p[1]}",
)
def worker(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Any]:
    """A 2-process prefork worker: copies deferred in Redis or sent with a countdown, traced
    in its pool processes only or in its main process (the pump's) as well."""
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    defer, traced = request.param
    with start_worker(
        redis_url,
        broker,
        pool=("prefork", "2"),
        extra_env={"FLEET_IT_DEFER": defer, "FLEET_IT_OTEL": traced},
        module="tests.integration.otel_app",
    ) as app_module:
        yield app_module


@pytest.fixture
def publisher() -> Iterator[tuple[Any, InMemorySpanExporter]]:
    """A tracer of the real SDK for the test's own spans, kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test_otel"), exporter
    provider.shutdown()


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def spans(m: Any) -> list[dict[str, Any]]:
    return [json.loads(x) for x in m._probe.lrange(m.key("spans"), 0, -1)]


def publish_traced(m: Any, tracer: Any, task: Any, tag: str) -> tuple[Any, str]:
    """Publish ``task(tag)`` under a root span of the test; its trace id (hex)."""
    with tracer.start_as_current_span("publish-from-test") as root:
        headers: dict[str, str] = {}
        propagate.inject(headers)  # what the instrumentation's before_task_publish does
        result = task.apply_async((tag,), headers=headers)
    return result, f"{root.get_span_context().trace_id:032x}"


def test_a_task_refused_twice_then_run_is_one_trace(
    worker: Any, publisher: tuple[Any, InMemorySpanExporter]
) -> None:
    m, (tracer, exporter) = worker, publisher
    tag = uuid.uuid4().hex[:8]
    gate = m.fleet.try_acquire("gate")
    assert gate.allowed
    try:
        result, trace_id = publish_traced(m, tracer, m.gated, tag)
        wait_for("two reschedules", lambda: int(m._probe.get(m.key(f"rescheduled:{result.id}"))
                                                or 0) >= 2)  # fmt: skip
    finally:
        m.fleet.release(gate)
    out = result.get(timeout=TIMEOUT_S)
    assert out["reschedules"] >= 2 and out["id"] == result.id
    assert [s.name for s in exporter.get_finished_spans()] == ["publish-from-test"]

    def runs() -> list[dict[str, Any]]:
        found = [s for s in spans(m) if s["name"] == "run/tests.integration.otel_app.gated"]
        return found if len(found) >= out["reschedules"] + 1 else []

    ran = wait_for("a run span per attempt", runs)
    assert {s["trace_id"] for s in ran} == {trace_id}, json.dumps(spans(m), indent=1)
    # Each attempt is a descendant of the attempt that rescheduled it: a chain, as
    # Celery's retry() gives, whichever way the copy waited and who published it.
    by_id = {s["span_id"]: s for s in spans(m)}

    def previous_run(span: dict[str, Any]) -> str | None:
        parent = by_id.get(span["parent_id"] or "")
        while parent is not None and not parent["name"].startswith("run/"):
            parent = by_id.get(parent["parent_id"] or "")
        return None if parent is None else str(parent["span_id"])

    chain = sorted(previous_run(s) or "" for s in ran)
    assert chain[0] == "" and chain[1:] == sorted({*chain[1:]} - {""}), chain
    # Each attempt that rescheduled says so on its span, with why.
    events = [e for s in ran for e in s["events"] if e["name"] == "fleet.rescheduled"]
    assert len(events) == out["reschedules"], events
    assert {(e["fleet.limit"], e["fleet.reason"]) for e in events} == {("gate", "in_flight")}
    assert sorted(e["fleet.reschedules"] for e in events) == list(range(1, len(events) + 1))
    # The refusals are in the trace too, one fleet.admission span each, inside its run.
    refused = [s for s in spans(m) if s["name"] == "fleet.admission" and s["trace_id"] == trace_id]
    assert sum(s["attributes"]["fleet.outcome"] == "refused" for s in refused) >= 2, refused
    assert all(s["attributes"]["fleet.limit"] == "gate" for s in refused)
    assert {s["parent_id"] for s in refused} <= {s["span_id"] for s in ran}


def test_a_slot_that_waited_in_a_worker_has_an_admission_span(
    worker: Any, publisher: tuple[Any, InMemorySpanExporter]
) -> None:
    m, (tracer, _exporter) = worker, publisher
    tag = uuid.uuid4().hex[:8]
    gate = m.fleet.try_acquire("gate")
    assert gate.allowed
    try:
        result, trace_id = publish_traced(m, tracer, m.waits, tag)
        wait_for("the task to wait in line", lambda: len(m.fleet.line("gate")) == 1)
    finally:
        m.fleet.release(gate)
    assert result.get(timeout=TIMEOUT_S) >= 2
    found = wait_for(
        "the admission span",
        lambda: [
            s for s in spans(m) if s["name"] == "fleet.admission" and s["trace_id"] == trace_id
        ],
    )
    (span,) = found
    attrs = span["attributes"]
    assert attrs["fleet.limit"] == "gate"
    assert attrs["fleet.outcome"] == "admitted"
    assert attrs["fleet.reason"] in ("in_flight", "queued")
    assert attrs["fleet.wait_ms"] > 0
    # the task's span is exported when it ends, which can come after its result
    (run,) = wait_for(
        "the task's run span",
        lambda: [s for s in spans(m) if s["name"] == "run/tests.integration.otel_app.waits"
                 and s["trace_id"] == trace_id],
    )  # fmt: skip
    assert span["parent_id"] == run["span_id"]  # inside the task's own span
