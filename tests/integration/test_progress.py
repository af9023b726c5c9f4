"""Real `celery worker` processes: a task that is throttled keeps its place in line and the
work it paid for (reschedule header, durable steps, wait_after_call, patience).

The worker (prefork, 4 processes, a queue and key namespace of its own) is the one of
test_worker.py; the tasks are in fleet_app.py. Every wait is on an event the tasks record
in Redis (bounded by a generous timeout), never on the speed of this machine.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery.result import AsyncResult

from celery_fleet.celery.task import THROTTLED
from celery_fleet.errors import ThrottledTooLong
from tests.integration import test_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The module-scoped worker of test_worker.py, started again for this module (own namespace).
worker = test_worker.worker

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def app_module(worker: Any) -> Iterator[Any]:
    """fleet_app as imported in this process; closes the Fleet's Redis client afterwards."""
    yield worker
    for client in (worker.fleet.store._client, worker.fleet.store._blocking):
        if client is not None:
            client.close()


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = TIMEOUT_S) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)


def count(app_module: Any, name: str) -> int:
    return int(app_module._probe.get(app_module.key(name)) or 0)


def reschedules_of(app_module: Any, task_id: str) -> int:
    """How often the worker rescheduled task ``task_id`` (task_rescheduled signal)."""
    return count(app_module, f"rescheduled:{task_id}")


def tag() -> str:
    return uuid.uuid4().hex[:8]


def test_a_rescheduled_task_is_admitted_before_a_later_one_waiting_in_place(
    app_module: Any,
) -> None:
    """R is refused (max_wait=0) and rescheduled; W, published after R's first ask, waits in
    line; R's copy asks again after W. With max_in_flight=1 freed, R goes first: its
    ``fleet`` header kept its first ask as its age in line."""
    m, fleet, probe = app_module, app_module.fleet, app_module._probe
    h, r, w = tag(), tag(), tag()
    holder = m.hold_one.delay(h)
    try:
        wait_for("the holder to take the only slot", lambda: probe.get(m.key(f"held:{h}")))
        rescheduled = m.in_line.delay(r, 0.0)
        wait_for("R's reschedule", lambda: reschedules_of(m, rescheduled.id) >= 1)
        later = m.in_line.delay(w, 60.0)
        wait_for("W to wait in line", lambda: len(fleet.line("one")) == 1)
        probe.rpush(m.key(f"go:{r}"), 1)  # now R's copy asks again

        def both_in_line() -> list[tuple[str, float]]:
            line = fleet.line("one")
            return line if len(line) == 2 else []

        line = wait_for("R's copy in line too", both_in_line)
    finally:
        probe.rpush(m.key(f"release:{h}"), 1)
    held_at = holder.get(timeout=TIMEOUT_S)
    r_out = rescheduled.get(timeout=TIMEOUT_S)
    w_out = later.get(timeout=TIMEOUT_S)

    assert r_out["reschedules"] == 1 and w_out["reschedules"] == 0
    assert reschedules_of(m, rescheduled.id) == 1
    # The premise: W asked after R's first ask, and before R's copy asked again.
    assert r_out["since_ms"] < w_out["since_ms"] < r_out["asked_ms"], (r_out, w_out)
    # R's copy kept its first ask as its age: from the header, into its slot's run.
    assert r_out["header_since_ms"] == r_out["since_ms"] > 0
    # In line R stood first, with its old age, although it joined last.
    assert [since for _, since in line] == [r_out["since_ms"], w_out["since_ms"]], line
    # And it was admitted first (Redis clock), both after the holder.
    assert held_at < r_out["admitted_ms"] < w_out["admitted_ms"], (held_at, r_out, w_out)


def test_a_step_runs_once_across_a_reschedule(app_module: Any) -> None:
    """The body's step ran; its later slot is refused (max_wait=0, wait_after_call=False), so
    it reschedules and runs again from the top: the step replays its stored result."""
    m, fleet = app_module, app_module.fleet
    t = tag()
    gate = fleet.try_acquire("gate")
    assert gate.allowed
    try:
        result = m.step_then_gate.delay(t)
        wait_for("two reschedules", lambda: reschedules_of(m, result.id) >= 2)
    finally:
        fleet.release(gate)
    out = result.get(timeout=TIMEOUT_S)
    assert out["plan"] == {"plan": f"plan-{t}", "steps": [1, 2, 3]}
    assert out["reschedules"] == reschedules_of(m, result.id) >= 2
    assert count(m, f"plan_calls:{t}") == 1


def test_a_step_runs_once_across_celery_retry(app_module: Any) -> None:
    m = app_module
    t = tag()
    result = m.step_then_retry.delay(t)
    out = result.get(timeout=TIMEOUT_S)
    assert out == {"plan": {"plan": f"plan-{t}", "steps": [1, 2, 3]}, "retries": 1, "id": result.id}
    assert count(m, f"plan_calls:{t}") == 1


def test_a_step_runs_once_across_a_redelivery(app_module: Any) -> None:
    """acks_late + reject_on_worker_lost: the pool process is SIGKILLed after the step; the
    worker requeues the message at once (no visibility timeout involved) and the second
    delivery replays the step."""
    m = app_module
    t = tag()
    result = m.step_then_die.delay(t)
    out = result.get(timeout=TIMEOUT_S)
    assert out == {"plan": {"plan": f"plan-{t}", "steps": [1, 2, 3]}, "runs": 2, "id": result.id}
    assert count(m, f"plan_calls:{t}") == 1
    starts = [int(x) for x in m._probe.lrange(m.key(f"starts:{t}"), 0, -1)]
    assert len(starts) == 2, starts


def test_max_reschedules_fails_the_task_with_throttled_too_long(app_module: Any) -> None:
    m, fleet = app_module, app_module.fleet
    t = tag()
    breaker = fleet.breaker("broken")
    breaker.force_open()
    try:
        result = m.never_admitted.delay(t)
        exc = result.get(timeout=TIMEOUT_S, propagate=False)
    finally:
        breaker.reset()
    assert result.state == "FAILURE"
    assert isinstance(exc, ThrottledTooLong), repr(exc)
    assert isinstance(result.result, ThrottledTooLong)
    assert exc.reschedules == 2
    assert exc.limit == "broken" and exc.reason == "circuit_open"
    assert reschedules_of(m, result.id) == 2
    assert count(m, f"never_admitted:{t}") == 0


def test_a_rescheduled_task_is_throttled_until_it_runs(app_module: Any) -> None:
    """While its countdown runs the result backend says THROTTLED with the header as meta;
    the body then sees its reschedule count in self.request.fleet / self.throttling."""
    m, fleet = app_module, app_module.fleet
    t = tag()
    spent = fleet.try_acquire("sparse")  # the bucket's one call: the next waits ~4 s
    assert spent.allowed
    fleet.release(spent)
    result = m.sparse_call.delay(t)

    def state() -> str:
        found: str = AsyncResult(result.id, app=m.app).state
        return "" if found == "PENDING" else found

    assert wait_for("a state other than PENDING", state) == THROTTLED
    info = AsyncResult(result.id, app=m.app).info
    assert isinstance(info, dict), info
    assert {"reschedules", "throttled_s", "limit", "reason", "since_ms"} <= set(info), info
    assert info["reschedules"] >= 1
    assert info["limit"] == "sparse" and info["reason"] == "requests/4s"
    assert info["throttled_s"] > 0 and info["since_ms"] > 0
    out = result.get(timeout=TIMEOUT_S)
    assert result.state == "SUCCESS"
    times = reschedules_of(m, result.id)
    assert times >= 1
    assert out["reschedules"] == times
    assert out["header"]["reschedules"] == times
    assert out["header"]["since_ms"] == info["since_ms"]


def test_after_a_paid_call_a_refused_slot_waits_in_place_by_default(app_module: Any) -> None:
    """wait_after_call (default True): the second slot, refused, waits in line (although the
    task's max_wait is 0) instead of rescheduling, so the first call is not paid again."""
    m, fleet = app_module, app_module.fleet
    t = tag()
    gate = fleet.try_acquire("gate2")
    assert gate.allowed
    try:
        result = m.two_calls.delay(t)
        wait_for(
            "the task to wait in line for gate2 (or be rescheduled)",
            lambda: len(fleet.line("gate2")) == 1 or reschedules_of(m, result.id),
        )
        assert reschedules_of(m, result.id) == 0, "rescheduled instead of waiting in place"
    finally:
        fleet.release(gate)
    out = result.get(timeout=TIMEOUT_S)
    assert out["reschedules"] == 0 and reschedules_of(m, result.id) == 0
    assert count(m, f"calls:{t}") == 1


def test_without_wait_after_call_a_refused_slot_reschedules_and_pays_again(
    app_module: Any,
) -> None:
    """The same body with wait_after_call=False: the refused second slot reschedules the task
    and its re-run makes the first call again."""
    m, fleet = app_module, app_module.fleet
    t = tag()
    gate = fleet.try_acquire("gate2")
    assert gate.allowed
    try:
        result = m.two_calls_restart.delay(t)
        wait_for(
            "a re-run's first call (or the task waiting in line)",
            lambda: count(m, f"calls:{t}") >= 2 or len(fleet.line("gate2")),
        )
        assert count(m, f"calls:{t}") >= 2, "waited in place instead of rescheduling"
    finally:
        fleet.release(gate)
    out = result.get(timeout=TIMEOUT_S)
    times = reschedules_of(m, result.id)
    assert out["reschedules"] == times >= 1
    assert count(m, f"calls:{t}") == times + 1 > 1
