"""Fleet signals for users' own metrics, and one structured log line per reschedule,
breaker change and provider pause."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from celery import Celery
from celery.exceptions import Ignore

from celery_fleet import Fleet, Run, Throttled, fleet_task
from celery_fleet.celery.signals import slot_admitted, slot_refused, task_throttled

from .test_providers import status_error


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[Celery]:
    celery = Celery("signals", broker="memory://", backend="cache+memory://", set_as_current=False)
    limits = {"llm": {"max_in_flight": 1}, "b": {"breaker": True, "max_in_flight": 5}}
    celery.conf.update(fleet_redis_url=redis_url, fleet_namespace=namespace, fleet_limits=limits)
    yield celery


def refuse(task: Any, task_id: str, exc: Exception, raises: type[BaseException]) -> None:
    """Hand ``exc`` to ``task``'s backpressure path as a worker would (a request pushed)."""
    task.push_request(id=task_id, args=[], kwargs={}, retries=0, delivery_info={},
                      called_directly=False)  # fmt: skip
    try:
        with pytest.raises(raises):
            task._on_backpressure(exc, Run(since_ms=5))
    finally:
        task.pop_request()


@pytest.fixture
def seen() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    got: list[tuple[str, dict[str, Any]]] = []

    def admitted(sender: Any = None, **kw: Any) -> None:
        got.append(("admitted", {k: v for k, v in kw.items() if k != "signal"}))

    def refused(sender: Any = None, **kw: Any) -> None:
        got.append(("refused", {k: v for k, v in kw.items() if k != "signal"}))

    def throttled(sender: Any = None, exc: Any = None, action: str = "", **_: Any) -> None:
        got.append(("throttled", {"limit": exc.limit, "action": action}))

    slot_admitted.connect(admitted, weak=False)
    slot_refused.connect(refused, weak=False)
    task_throttled.connect(throttled, weak=False)
    yield got
    slot_admitted.disconnect(admitted)
    slot_refused.disconnect(refused)
    task_throttled.disconnect(throttled)


def test_slots_tell_admissions_refusals_and_provider_pushback(
    app: Celery, seen: list[tuple[str, dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    fleet = Fleet(app)
    caplog.set_level(logging.WARNING, logger="celery_fleet")
    with fleet.slot("llm"):
        with pytest.raises(Throttled):
            with fleet.slot("llm", max_wait=0):  # the cap (1) is held
                pass
    assert seen[0][0] == "admitted" and seen[0][1]["limit"] == "llm"
    assert seen[0][1]["attempts"] == 1 and 0 <= seen[0][1]["waited_s"] < 1
    assert seen[1][0] == "refused" and seen[1][1]["limit"] == "llm"
    assert seen[1][1]["reason"] == "in_flight"
    assert len(seen) == 2  # once each: the "waited" event (tracing.py) sends no signal
    seen.clear()
    with pytest.raises(Throttled):
        with fleet.slot("llm"):
            raise status_error(openai.RateLimitError, 429, {"retry-after": "2"}, {}, "slow down")
    assert seen[-1] == ("refused", {"limit": "llm", "reason": "provider 429", "wait_ms": 2000})
    assert "celery-fleet: pause limit=llm status=429 retry_after_ms=2000" in caplog.text


def test_a_breaker_change_is_one_log_line(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    fleet = Fleet(app)
    caplog.set_level(logging.WARNING, logger="celery_fleet")
    fleet.admission.notify("b", "open")
    assert "celery-fleet: breaker limit=b state=open" in caplog.text


def test_a_throttled_task_says_what_it_does(
    app: Celery, seen: list[tuple[str, dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    Fleet(app)
    caplog.set_level(logging.INFO, logger="celery_fleet")

    @fleet_task(app=app, shared=False, bind=True)
    def agent(self: Any) -> None: ...

    @fleet_task(app=app, shared=False, on_limit="fail")
    def strict() -> None: ...

    refuse(agent, "t-9", Throttled("llm", 1500, "in_flight"), Ignore)
    refuse(strict, "t-10", Throttled("llm", 10, "in_flight"), Throttled)
    assert [s for s in seen if s[0] == "throttled"] == [
        ("throttled", {"limit": "llm", "action": "reschedule"}),
        ("throttled", {"limit": "llm", "action": "fail"}),
    ]
    line = [r.getMessage() for r in caplog.records if "rescheduled task=" in r.getMessage()]
    assert len(line) == 1 and "id=t-9 limit=llm reason=in_flight wait_ms=1500" in line[0]
    assert "reschedules=1" in line[0]


def test_fleet_breaker_events_carry_the_worker_s_node_name(app: Celery) -> None:
    from contextlib import contextmanager

    from celery import signals as celery_signals

    from celery_fleet.celery import signals as fleet_signals

    sent: list[tuple[str | None, str, dict[str, Any]]] = []

    @contextmanager
    def dispatcher(hostname: str | None = None, **_: Any) -> Iterator[Any]:
        class D:
            def send(self, type_: str, **fields: Any) -> None:
                sent.append((hostname, type_, fields))

        yield D()

    class Worker:  # what worker_init sends: the WorkController, named by -n
        hostname = "agents-1@vm"

    app.events.default_dispatcher = dispatcher  # type: ignore[method-assign]
    try:
        celery_signals.worker_init.send(sender=Worker())
        fleet_signals.breaker_announcer(app)("b", "open")
    finally:
        fleet_signals._node[0] = None
    assert sent == [("agents-1@vm", "fleet-breaker", {"limit": "b", "state": "open"})]


def test_a_reschedule_shows_as_throttled_to_event_monitors(app: Celery) -> None:
    """With task events on, a reschedule sends task-throttled: Celery's event state (what
    Flower keeps) then says THROTTLED, with the reason and no traceback."""
    import time

    from celery.events.state import State

    Fleet(app)
    app.conf.worker_send_task_events = True
    events: list[tuple[str, dict[str, Any]]] = []

    @fleet_task(app=app, shared=False)
    def agent() -> None: ...

    agent.send_event = lambda type_, **fields: events.append((type_, fields))  # type: ignore[method-assign]
    refuse(agent, "t-11", Throttled("llm", 1500, "in_flight"), Ignore)
    assert [t for t, _ in events] == ["task-throttled"]
    fields = events[0][1]
    assert fields["exception"].startswith("THROTTLED: ") and fields["traceback"] == ""
    assert fields["limit"] == "llm" and fields["reason"] == "in_flight"
    assert fields["reschedules"] == 1 and 1.5 <= fields["countdown_s"] <= 2.0
    monitor, now = State(), time.time()
    for type_, extra in (("task-received", {"name": "agent"}), ("task-started", {}),
                         ("task-throttled", fields)):  # fmt: skip
        monitor.event({"type": type_, "uuid": "t-11", "hostname": "w@h", "timestamp": now,
                       "clock": 1, "local_received": now, **extra})  # fmt: skip
    task = monitor.tasks["t-11"]
    assert task.state == "THROTTLED" and task.exception.startswith("THROTTLED")
