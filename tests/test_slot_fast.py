"""The fast path of an admitted ``fleet.slot()``: no second round of checks, no generator
machinery, no lock or poll on a lone caller's wire; and everything else still taken by
the sans-IO steps (outages, a dropped connection, waits). Real Redis."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis

from celery_fleet import Fleet, Run, running
from celery_fleet.admission import core
from celery_fleet.admission.decision import Decision
from celery_fleet.errors import ConfigError, StoreUnavailable
from celery_fleet.store import combiner as combiner_module
from celery_fleet.store import wire as wire_module

MakeFleet = Callable[..., Fleet]
LIMIT = {"max_in_flight": 4, "rpm": 10**6}


def test_an_admitted_slot_runs_no_generator_steps(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = make_fleet({"llm": LIMIT})
    with fleet.slot("llm"):
        pass  # first ask: starts the runtime watch (through the steps)
    driven: list[object] = []
    real = core.drive

    def drive(steps: Any, store: Any) -> Any:
        driven.append(steps)
        return real(steps, store)

    monkeypatch.setattr(core, "drive", drive)
    for _ in range(5):
        with fleet.slot("llm", tokens=0) as slot:
            assert slot.lease_id
    assert driven == []
    with fleet.slot("llm", max_wait=0.01):  # a deadline nearer than the health deadline:
        pass  # the checked path, as before
    assert driven
    assert fleet.admission.in_flight("llm") == 0


def test_a_lone_caller_takes_no_wait_lock_and_no_poll_on_a_busy_wire(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = make_fleet({"llm": LIMIT})
    with fleet.slot("llm"):
        pass
    combiner = fleet.store.combiner
    combiner.flush_s = 60.0
    polls: list[int] = []
    locks: list[int] = []
    real_stale, real_wait = combiner._stale, combiner_module._Call.wait_here

    def stale(conn: Any) -> bool:
        polls.append(1)
        return real_stale(conn)

    def wait_here(call: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            locks.append(1)  # (the fleet's background calls may really contend)
        return real_wait(call)

    monkeypatch.setattr(combiner, "_stale", stale)
    monkeypatch.setattr(combiner_module._Call, "wait_here", wait_here)
    monkeypatch.setattr(wire_module, "STALE_CHECK_S", 3600.0)
    for _ in range(20):
        with fleet.slot("llm"):
            pass
    # a lock only to wait behind a background call of the fleet's (presence, runtime)
    assert polls == [] and len(locks) <= 2
    monkeypatch.setattr(wire_module, "STALE_CHECK_S", 0.0)  # idle: checked again
    fleet.admission.in_flight("llm")
    assert polls


def test_a_run_with_a_bad_age_is_refused_on_the_fast_path_too(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": LIMIT})
    with fleet.slot("llm"):
        pass
    for bad in (-5, 2**42, 1.5e20):
        with running(Run(since_ms=bad)), pytest.raises(ConfigError, match="since_ms"):  # type: ignore[arg-type]
            fleet.slot("llm").acquire()
    assert fleet.admission.in_flight("llm") == 0


def test_an_ask_whose_reply_a_dropped_connection_lost_is_not_charged_twice(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"llm": LIMIT})
    with fleet.slot("llm"):
        pass
    store, real = fleet.store, fleet.store.send
    lost: list[Any] = []

    def send(*commands: tuple[str, bytes]) -> list[Any]:
        if not lost and commands[0][0] == "acquire":
            lost.append(real(*commands))  # Redis ran it; the reply is lost
            raise StoreUnavailable(store.safe_url, "connection dropped", dropped=True)
        return real(*commands)

    store.send = send  # type: ignore[method-assign]
    with fleet.slot("llm") as slot:
        assert lost
        first = fleet.admission.decision("llm", 0, lost[0][0])  # (whatever the reply shape)
        assert slot.lease_id == first.lease_id  # the first ask's lease
        leases = rclient.zrange(fleet.admission.keys("llm").leases, 0, -1)
        assert leases == [slot.lease_id.encode()]  # type: ignore[union-attr]
    assert fleet.admission.in_flight("llm") == 0


def test_an_ask_redis_does_not_answer_is_owed_and_answered_by_the_policy(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"llm": LIMIT}, store_down="local")
    fleet.expected_processes = 1
    with fleet.slot("llm"):
        pass
    store, real = fleet.store, fleet.store.send

    def send(*commands: tuple[str, bytes]) -> list[Any]:
        if commands[0][0] == "acquire":
            raise StoreUnavailable(store.safe_url, "frozen", dropped=False)
        return real(*commands)

    store.send = send  # type: ignore[method-assign]
    with fleet.slot("llm") as slot:
        assert fleet.store_down.down and fleet.store_down.owns(slot.lease_id)
        owed = [(o.kind, o.limit) for o in fleet.admission.replays.take()]
        assert ("ask", "llm") in owed  # looked up when Redis answers (and its place left)


def test_a_decision_made_on_the_fast_path_is_a_plain_frozen_decision(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"llm": LIMIT})
    d = fleet.try_acquire("llm", tokens=0)
    same = Decision(**{f.name: getattr(d, f.name) for f in dataclasses.fields(Decision)})
    assert d == same and hash(d) == hash(same) and repr(d) == repr(same)
    assert d.place == 0.0 and d.ahead == 0 and d.allowed
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.allowed = False  # type: ignore[misc]
    fleet.release(d)
