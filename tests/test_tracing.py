"""OpenTelemetry spans of admission waits (observability/tracing.py), with the real SDK.

Each test records into its own ``TracerProvider`` with an ``InMemorySpanExporter`` (the
global provider is left alone), through the watcher a Fleet installs by default, here
given that provider. Real Redis, real waits: a slot held by the test process, a caller
waiting in line for it. tests/integration/test_otel.py has the same in a real worker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from celery_fleet import ConfigError, Fleet, Throttled
from celery_fleet.observability import tracing
from celery_fleet.settings import load_settings

MakeFleet = Callable[..., Fleet]


class Traced:
    """A provider of the real SDK whose finished spans stay in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test_tracing")

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]


@pytest.fixture
def traced() -> Iterator[Traced]:
    t = Traced()
    yield t
    t.provider.shutdown()


def traced_fleet(make_fleet: MakeFleet, traced: Traced, mode: str = "waits") -> Fleet:
    fleet = make_fleet({"x": {"max_in_flight": 1}})
    watcher = tracing.admission_watcher(mode, traced.provider)
    assert watcher is not None
    fleet.admission.watchers.append(watcher)
    return fleet


def wait_until(check: Callable[[], Any], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_slot_that_waited_records_one_admission_span_in_the_callers_trace(
    make_fleet: MakeFleet, traced: Traced
) -> None:
    fleet = traced_fleet(make_fleet, traced)
    held = fleet.try_acquire("x")
    assert held.allowed
    seen: dict[str, Any] = {}

    def caller() -> None:
        with traced.tracer.start_as_current_span("agent-step") as parent:
            seen["parent"] = parent.get_span_context()
            with fleet.slot("x", max_wait=20) as slot:
                seen["attempts"], seen["waited_s"] = slot.attempts, slot.waited_s

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        wait_until(lambda: len(fleet.line("x")) == 1)
    finally:
        fleet.release(held)
    thread.join(30)
    assert seen["attempts"] >= 2
    (span,) = traced.named(tracing.SPAN_NAME)
    attrs = dict(span.attributes or {})
    assert attrs["fleet.limit"] == "x"
    assert attrs["fleet.reason"] in ("in_flight", "queued")
    assert attrs["fleet.wait_ms"] == pytest.approx(seen["waited_s"] * 1000, abs=1.0)
    assert attrs["fleet.wait_ms"] > 0
    assert attrs["fleet.outcome"] == "admitted"
    assert attrs["fleet.attempts"] == seen["attempts"]
    assert span.parent is not None and span.parent.span_id == seen["parent"].span_id
    assert span.context is not None and span.context.trace_id == seen["parent"].trace_id
    assert span.end_time is not None and span.start_time is not None
    assert (span.end_time - span.start_time) / 1e6 == pytest.approx(attrs["fleet.wait_ms"], abs=1)


def test_admission_at_once_records_nothing_unless_asked_and_a_refusal_records_why(
    make_fleet: MakeFleet, traced: Traced
) -> None:
    fleet = traced_fleet(make_fleet, traced)
    with fleet.slot("x"):
        pass
    assert traced.named(tracing.SPAN_NAME) == []  # the hot path: no span
    with fleet.slot("x"), pytest.raises(Throttled):  # refused at once (max_wait=0)
        with fleet.slot("x", max_wait=0):
            pass
    (refused,) = traced.named(tracing.SPAN_NAME)
    attrs = dict(refused.attributes or {})
    assert attrs["fleet.outcome"] == "refused"
    assert attrs["fleet.reason"] == "in_flight"
    assert attrs["fleet.attempts"] == 1
    assert attrs["fleet.retry_after_ms"] > 0
    assert refused.status.status_code == StatusCode.UNSET  # backpressure, not an error

    spans = Traced()
    every = traced_fleet(make_fleet, spans, "all")  # fleet_trace_admissions = "all"
    with every.slot("x"):
        pass
    (span,) = spans.named(tracing.SPAN_NAME)
    assert dict(span.attributes or {})["fleet.outcome"] == "admitted"
    assert dict(span.attributes or {})["fleet.attempts"] == 1


def test_an_async_slot_that_waited_records_its_span_in_the_coroutines_trace(
    make_fleet: MakeFleet, traced: Traced
) -> None:
    fleet = traced_fleet(make_fleet, traced)
    held = fleet.try_acquire("x")
    assert held.allowed

    async def main() -> tuple[int, int]:
        async def let_go() -> None:
            while len(fleet.line("x")) < 1:
                await asyncio.sleep(0.01)
            fleet.release(held)

        with traced.tracer.start_as_current_span("async-step") as parent:
            releasing = asyncio.ensure_future(let_go())
            async with fleet.aslot("x", max_wait=20) as slot:
                attempts = slot.attempts
            await releasing
            await fleet.aclose()  # this loop's connections, before it ends
            return parent.get_span_context().span_id, attempts

    parent_id, attempts = asyncio.run(main())
    assert attempts >= 2
    (span,) = traced.named(tracing.SPAN_NAME)
    assert span.parent is not None and span.parent.span_id == parent_id
    assert dict(span.attributes or {})["fleet.wait_ms"] > 0
    assert dict(span.attributes or {})["fleet.outcome"] == "admitted"


def test_a_context_carried_in_headers_is_the_parent_where_they_are_published(
    traced: Traced,
) -> None:
    headers: dict[str, Any] = {"fleet": {"reschedules": 1}}
    tracing.inject_context(headers)
    assert "traceparent" not in headers  # no current span: nothing written
    with traced.tracer.start_as_current_span("attempt-1") as attempt:
        tracing.inject_context(headers)
        tracing.add_event("fleet.rescheduled", {"fleet.limit": "x"})
    assert headers["traceparent"].split("-")[2] == f"{attempt.get_span_context().span_id:016x}"
    with tracing.context_from(headers):  # the pump's thread: no span of its own
        with traced.tracer.start_as_current_span("apply_async") as publish:
            pass
    assert publish.parent is not None
    assert publish.parent.span_id == attempt.get_span_context().span_id
    (finished,) = traced.named("attempt-1")
    assert [e.name for e in finished.events] == ["fleet.rescheduled"]
    # A header someone mangled (or none at all) publishes as a new trace, never fails.
    for bad in ({"traceparent": "00-garbage"}, {"traceparent": 7}, None):
        with tracing.context_from(bad), traced.tracer.start_as_current_span("root") as root:
            assert root.parent is None


def test_settings_and_a_process_without_opentelemetry(redis_url: str) -> None:
    conf = {"fleet_redis_url": redis_url}
    with pytest.raises(ConfigError, match="fleet_trace_admissions.*'spans'"):
        load_settings({**conf, "fleet_trace_admissions": "spans"})
    assert load_settings({**conf, "fleet_trace_admissions": "all"}).trace_admissions == "all"
    assert load_settings(conf).trace_admissions is None  # "waits" when installed
    # OpenTelemetry made unimportable: no watcher, the slot works; asking for spans by
    # name is a ConfigError that names the extra.
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from celery import Celery\n"
        "from celery_fleet import Fleet, ConfigError\n"
        "from celery_fleet.observability import tracing\n"
        f"f = Fleet(redis_url={redis_url!r}, namespace='tracing-{os.getpid()}',\n"
        "          limits={'x': {'max_in_flight': 1}})\n"
        "assert not tracing.available() and len(f.admission.watchers) == 1\n"
        "with f.slot('x'):\n"
        "    pass\n"
        "app = Celery('t'); app.conf.fleet_trace_admissions = 'all'\n"
        f"app.conf.fleet_redis_url = {redis_url!r}\n"
        "try:\n"
        "    Fleet(app)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'celery-fleet[otel]'" in out.stdout
