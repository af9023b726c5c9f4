"""The task path's lean case, a first run of an unkeyed task, and the messages that must
still take the full path."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Ignore

from celery_fleet import Fleet, FleetTask, fleet_task
from celery_fleet.admission.run import current_run
from celery_fleet.celery import idempotency
from celery_fleet.celery.reschedule import Rescheduling


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[Celery]:
    app = Celery("path", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(
        fleet_redis_url=redis_url,
        fleet_namespace=namespace,
        fleet_limits={"llm": {"rpm": 600, "tpm": 10_000, "max_in_flight": 4}},
    )
    yield app


def _as_worker(task: Any, call: Callable[[], Any], **request: Any) -> Any:
    """Run ``call`` under a request as a worker's tracer pushes it (not called directly)."""
    fields = {"id": str(uuid.uuid4()), "args": [], "kwargs": {}, "retries": 0}
    task.push_request(**{**fields, "delivery_info": {}, "called_directly": False, **request})
    try:
        return call()
    finally:
        task.pop_request()


def _refuse(*_: Any, **__: Any) -> Any:
    raise AssertionError("the lean path must not get here")


def test_a_first_run_of_an_unkeyed_task_skips_the_keyed_path(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    Fleet(app)
    runs: list[Any] = []

    @fleet_task(app=app, shared=False, limit="llm", max_throttled=60)
    def lean(n: int) -> int:
        runs.append(current_run.get())
        return n

    monkeypatch.setattr(idempotency, "claim_for", _refuse)
    monkeypatch.setattr(Rescheduling, "_drop_needless_backup", _refuse)
    monkeypatch.setattr(Rescheduling, "throttling", property(_refuse))
    assert lean.apply((1,)).get() == 1  # eager
    assert _as_worker(lean, lambda: lean(2), headers=None) == 2  # a worker's run
    for run in runs:  # a first run's (its age is its first ask's), with the task's options
        assert run.places == {} and run.deadline is not None and run.wait_after_call is True
        assert run.calls == 1  # its slot was released


def test_a_message_carrying_its_place_in_line_keeps_it(app: Celery) -> None:
    """The ``fleet`` header of a rescheduled copy, a request attribute as a worker reads
    protocol 2 (Celery before 5.7 has no ``request.headers`` beside it)."""
    Fleet(app)
    ages: list[int] = []

    @fleet_task(app=app, shared=False, limit="llm")
    def aged() -> None:
        run = current_run.get()
        assert run is not None
        ages.append(run.since_ms)

    header = {"since_ms": 1234, "reschedules": 2, "throttled_s": 3.0}
    _as_worker(aged, aged, fleet=header, headers={})
    assert ages == [1234]


@pytest.mark.parametrize("where", ["headers", "attribute"])
def test_a_message_carrying_an_idempotency_key_claims_it(app: Celery, where: str) -> None:
    """An ``apply_async(idempotency_key=...)`` of a task that has no key of its own: its
    message carries ``fleet_key``, and its runs still claim the key (the second replays)."""
    Fleet(app)
    bodies: list[int] = []

    @fleet_task(app=app, shared=False)
    def once(n: int) -> int:
        bodies.append(n)
        return n * 10

    key = f"per-call-{uuid.uuid4().hex[:8]}"
    for n in (1, 2):
        if where == "headers":
            assert once.apply((n,), headers={"fleet_key": key}).get() == 10
        else:
            assert _as_worker(once, lambda n=n: once(n), fleet_key=key, headers={}) == 10
    assert bodies == [1]


@pytest.mark.parametrize("where", ["headers", "attribute"])
def test_a_backup_whose_copy_was_published_does_not_run(app: Celery, where: str) -> None:
    fleet = Fleet(app)
    bodies: list[int] = []

    @fleet_task(app=app, shared=False)
    def copied() -> None:
        bodies.append(1)

    item = f"t-{uuid.uuid4().hex[:8]}:1"
    fleet.deferred.add(item, 0.0, b"{}")
    assert [i for i, _ in fleet.deferred.take(10)] == [item]
    fleet.deferred.ack([item])  # the pump published the copy
    request = {"headers": {"fleet_backup": item}} if where == "headers" else {"fleet_backup": item}
    with pytest.raises(Ignore):
        _as_worker(copied, copied, **{"headers": {}, **request})
    assert bodies == []


def test_a_fleet_task_subclass_keeps_the_lean_path_s_checks(app: Celery) -> None:
    """A base class that gives every task an idempotency key takes the keyed path."""
    Fleet(app)
    bodies: list[int] = []

    class Keyed(FleetTask):  # type: ignore[misc]
        fleet_idempotency_key = "sub:{n}"

    @fleet_task(app=app, shared=False, base=Keyed, name=f"path.sub-{uuid.uuid4().hex[:6]}")
    def sub(n: int) -> int:
        bodies.append(n)
        return n

    assert sub.apply((7,)).get() == 7
    assert sub.apply((7,)).get() == 7  # replayed from the ledger
    assert bodies == [7]
