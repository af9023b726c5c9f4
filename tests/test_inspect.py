"""Who holds each slot: the task ids, names and ages ``celery inspect fleet`` shows.

The lease keeper asks, as each slot is taken, which task runs there (Celery's current
task, through the hook the Celery binding sets), and the presence record carries that to
the worker's main process for a prefork pool. Real workers answering ``inspect fleet``
(threads and prefork) are in ``tests/integration/test_inspect_worker.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_fleet import Fleet, fleet_task
from celery_fleet.observability.metrics import held_slots
from celery_fleet.resilience.presence import Presence, held_key


class HandClock:
    """Monotonic time moved by the test only."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[Celery]:
    app = Celery("held", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.fleet_redis_url = redis_url
    app.conf.fleet_namespace = namespace
    app.conf.fleet_limits = {"llm": {"max_in_flight": 5, "tpm": 100_000}}
    yield app


def test_a_slot_taken_in_a_task_names_the_task_and_how_long_it_is_held(app: Celery) -> None:
    clock = HandClock()
    fleet = Fleet(app, clock=clock)

    @app.task(bind=True, shared=False)
    def research(self: Any) -> list[dict[str, object]]:
        with fleet.slot("llm", tokens=3):
            clock.now += 12.5
            return held_slots(fleet)

    result = research.apply()
    [slot] = result.get()
    assert (slot["task_id"], slot["task"]) == (result.id, research.name)
    assert slot["holder"] == f"{research.name}[{result.id}]"
    assert slot["held_s"] == 12.5 and slot["tokens"] == 3


def test_a_slot_taken_outside_any_task_says_no_task(app: Celery) -> None:
    fleet = Fleet(app)
    got: list[list[dict[str, object]]] = []

    @app.task(shared=False)
    def starts_a_thread() -> None:
        # a thread the task starts runs no task of Celery's: its slot is no task's
        def hold() -> None:
            with fleet.slot("llm"):
                got.append(held_slots(fleet))

        t = threading.Thread(target=hold)
        t.start()
        t.join()

    with fleet.slot("llm"):
        [outside] = held_slots(fleet)
    starts_a_thread.apply().get()
    [in_thread] = got[0]
    for slot in (outside, in_thread):
        assert (slot["task_id"], slot["task"], slot["holder"]) == (None, None, "no task")


def test_an_async_slot_in_an_async_task_names_the_task(app: Celery) -> None:
    fleet = Fleet(app)

    @fleet_task(app=app, shared=False, bind=True)
    async def agent(self: Any) -> list[list[dict[str, object]]]:
        seen: list[list[dict[str, object]]] = []

        async def one() -> None:
            async with fleet.aslot("llm"):
                await asyncio.sleep(0)  # both held at once
                seen.append(held_slots(fleet))

        await asyncio.gather(one(), one())
        return seen

    result = agent.apply()
    seen = result.get()
    assert max(len(s) for s in seen) == 2
    assert {(s["task_id"], s["task"]) for held in seen for s in held} == {(result.id, agent.name)}


def test_a_task_called_directly_is_named_without_an_id(app: Celery) -> None:
    fleet = Fleet(app)

    @app.task(shared=False)
    def direct() -> list[dict[str, object]]:
        with fleet.slot("llm"):
            return held_slots(fleet)

    [slot] = direct()
    assert (slot["task_id"], slot["task"], slot["holder"]) == (None, direct.name, direct.name)


def test_the_presence_record_carries_the_holder_to_another_process(
    app: Celery, namespace: str, rclient: Any
) -> None:
    """What a prefork child records at its renewal is what the main process reads back
    (by pid), with the record's age, and ``held_s`` brought up to the reading."""
    fleet = Fleet(app)
    # a record of its own: the fleet's counters thread renews the fleet's at any time
    presence = Presence(fleet.store, f"{namespace}-b", held=fleet.keeper.describe)
    key = held_key(presence.namespace)

    @app.task(bind=True, shared=False)
    def hold(self: Any) -> None:
        with fleet.slot("llm", tokens=2):
            assert presence.renew() is not None

    result = hold.apply()
    result.get()
    record = json.loads(rclient.hget(key, presence.process_id))
    record["at"] -= 5.0  # recorded 5 s ago, as the main process may read it
    rclient.hset(key, presence.process_id, json.dumps(record))
    [slot] = presence.held_by([os.getpid()])[os.getpid()]
    assert (slot["task_id"], slot["task"], slot["tokens"]) == (result.id, hold.name, 2)
    assert 5.0 <= slot["recorded_s_ago"] < 60
    assert slot["held_s"] >= 5.0 + record["slots"][0]["held_s"] - 0.001
    # and a record of the older shape (a bare list) still reads
    old = [{"limit": "llm", "lease": "x", "tokens": 1}]
    rclient.hset(key, presence.process_id, json.dumps(old))
    assert presence.held_by([os.getpid()])[os.getpid()] == old
