"""The line: refused callers are admitted oldest first, woken rather than polling, and a
dead waiter stops blocking it. Real Redis (the order is decided inside acquire.lua)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest
import redis

from celery_fleet import Fleet, Throttled
from celery_fleet.admission.line import LANE_SPAN, WAKE_GRACE_MS

MakeFleet = Callable[..., Fleet]


def _full(fleet: Fleet, limit: str = "m", n: int = 1) -> list[object]:
    held = [fleet.try_acquire(limit) for _ in range(n)]
    assert all(held)
    return held


def test_uncontended_admission_takes_no_ticket(make_fleet: MakeFleet, rclient: redis.Redis) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 2, "rpm": 600}})
    with fleet.slot("m") as slot:
        assert slot.attempts == 1
    keys = fleet.admission.keys("m")
    assert not rclient.exists(keys.line, keys.waiting)


def test_a_newcomer_does_not_pass_a_waiting_ticket(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    (held,) = _full(fleet)
    a = fleet.admission.try_acquire("m", lease_id="a" * 24, join=True)
    assert not a and a.reason == "in_flight" and a.ahead == 0
    fleet.release(held)  # a unit frees up: it is the waiter's, not the first to ask
    b = fleet.admission.try_acquire("m", lease_id="b" * 24)
    assert not b and b.reason == "queued" and b.ahead == 1
    a = fleet.admission.try_acquire("m", lease_id="a" * 24, join=True)
    assert a and a.lease_id and a.lease_id.endswith("." + "a" * 24) and a.line == 0
    assert fleet.line("m") == []


def test_tickets_are_served_by_age_not_by_arrival(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    (held,) = _full(fleet)
    now_ms = int(held.at_ms)  # type: ignore[attr-defined]
    young = fleet.admission.try_acquire("m", lease_id="y" * 24, since_ms=now_ms, join=True)
    old = fleet.admission.try_acquire("m", lease_id="o" * 24, since_ms=now_ms - 60_000, join=True)
    assert young.ahead == 0 and old.ahead == 0  # the old one went in front
    assert [t for t, _ in fleet.line("m")] == ["o" * 24, "y" * 24]
    assert fleet.line("m")[0][1] == now_ms - 60_000
    fleet.release(held)
    assert not fleet.admission.try_acquire("m", lease_id="y" * 24, since_ms=now_ms, join=True)
    assert fleet.admission.try_acquire("m", lease_id="o" * 24, since_ms=now_ms - 60_000, join=True)


def test_a_release_wakes_exactly_the_first_in_line(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    (held,) = _full(fleet)
    for t in ("1", "2"):
        fleet.admission.try_acquire("m", lease_id=t * 24, join=True)
    wake = fleet.admission.keys("m").wake  # + a ticket's first 8 characters: its process
    assert not rclient.exists(wake + "1" * 8)
    fleet.release(held)
    assert rclient.lrange(wake + "1" * 8, 0, -1) == [b"1" * 24]
    assert not rclient.exists(wake + "2" * 8)
    assert fleet.admission.wait_turn("m", "1" * 24, 0.5)  # the wake-up is there to take
    assert not rclient.exists(wake + "1" * 8)  # taken by the process's listener


def test_leaving_first_passes_the_turn_on(make_fleet: MakeFleet, rclient: redis.Redis) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    _full(fleet)
    for t in ("1", "2"):
        fleet.admission.try_acquire("m", lease_id=t * 24, join=True)
    assert fleet.admission.leave("m", "1" * 24)
    assert not fleet.admission.leave("m", "1" * 24)  # idempotent
    assert rclient.lrange(fleet.admission.keys("m").wake + "2" * 8, 0, -1) == [b"2" * 24]
    assert [t for t, _ in fleet.line("m")] == ["2" * 24]


def test_a_slot_that_gives_up_leaves_the_line(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    _full(fleet)
    with pytest.raises(Throttled):
        with fleet.slot("m", max_wait=0.3):
            pytest.fail("must not enter")
    assert fleet.line("m") == []
    with pytest.raises(Throttled):  # max_wait=0: asks once and never queues
        with fleet.slot("m", max_wait=0):
            pytest.fail("must not enter")
    assert fleet.line("m") == []


def test_waiters_are_woken_not_polling(make_fleet: MakeFleet) -> None:
    """Four waiters for a cap of 1 held 0.2 s each: each asks about twice, not ~40 times."""
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    slots = []

    def agent() -> None:
        with fleet.slot("m", max_wait=30) as slot:
            time.sleep(0.2)
        slots.append(slot)

    threads = [threading.Thread(target=agent) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(slots) == 4
    assert sum(s.attempts for s in slots) <= 4 * 3


def test_a_rate_limited_line_moves_on_admissions(make_fleet: MakeFleet) -> None:
    """No cap: nobody releases to wake the next in line; each admission wakes it."""
    fleet = make_fleet({"r": {"requests": "20/second", "burst": 0.05}})
    done: list[float] = []

    def agent() -> None:
        with fleet.slot("r", max_wait=30) as slot:
            done.append(slot.decision.at_ms)  # type: ignore[union-attr]

    threads = [threading.Thread(target=agent) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(done) == 12
    assert fleet.line("r") == []


def test_a_killed_waiter_stops_blocking_the_line(
    make_fleet: MakeFleet, redis_url: str, namespace: str
) -> None:
    """The first in line is SIGKILLed; when its turn comes it does not ask, and the
    second is admitted within the wake grace plus one ask, not the ticket TTL (30 s)."""
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    (held,) = _full(fleet)
    code = textwrap.dedent(
        f"""
        from celery_fleet import Fleet
        fleet = Fleet(redis_url={redis_url!r}, namespace={namespace!r},
                      limits={{"m": {{"max_in_flight": 1}}}})
        with fleet.slot("m", max_wait=120):
            pass
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while not fleet.line("m") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(fleet.line("m")) == 1, "the child never queued"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        result: list[object] = []

        def second() -> None:
            with fleet.slot("m", max_wait=20) as slot:
                result.append(slot)

        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        assert len(fleet.line("m")) == 2
        fleet.release(held)  # wakes the dead child's ticket
        waiter.join(timeout=25)
        assert result, "the second waiter was never admitted"
        assert result[0].waited_s < WAKE_GRACE_MS / 1000.0 + 4.0  # type: ignore[attr-defined]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_admissions_follow_ticket_order_across_processes(
    make_fleet: MakeFleet, redis_url: str, namespace: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Three processes x 4 threads contend for a cap of 1; each admission records its age
    and the Redis clock at admission. A caller admitted after waiting was never passed by
    a younger one that asked after it."""
    out = tmp_path / "adm"
    code = textwrap.dedent(
        f"""
        import sys, threading, time
        from celery_fleet import Fleet
        fleet = Fleet(redis_url={redis_url!r}, namespace={namespace!r},
                      limits={{"m": {{"max_in_flight": 1}}}})
        rows = []
        def agent():
            for _ in range(4):
                with fleet.slot("m", max_wait=120) as s:
                    rows.append((s.run.since_ms, s.decision.at_ms, s.attempts))
                    time.sleep(0.01)
        ts = [threading.Thread(target=agent) for _ in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        with open(sys.argv[1], "w") as f:
            f.write("\\n".join(f"{{a}} {{b}} {{c}}" for a, b, c in rows))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out) + str(i)]) for i in range(3)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    rows = []
    for i in range(3):
        for line in (tmp_path / f"adm{i}").read_text().splitlines():
            since, at, attempts = line.split()
            rows.append((float(since), float(at), int(attempts)))
    assert len(rows) == 48
    waited = sorted((r for r in rows if r[2] > 1), key=lambda r: r[1])
    assert len(waited) >= 24, "the test did not create contention"
    inversions = sum(
        1
        for i, (since_i, at_i, _) in enumerate(waited)
        for since_j, _at_j, _ in waited[i + 1 :]
        if since_j < since_i  # an older waiter admitted later...
        and since_j < at_i  # ...that was already waiting when the younger one got in
    )
    assert inversions == 0


def test_order_keys_leave_room_for_lanes() -> None:
    # ms since the epoch until 2109 stay below one lane, and 1024 lanes stay exact in a double
    assert time.time() * 1000 < LANE_SPAN
    assert float(1023 * LANE_SPAN + LANE_SPAN - 1) == 1023 * LANE_SPAN + LANE_SPAN - 1


def test_line_invariants_under_random_operations(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    """Random joins, asks, releases and leaves: the line and its expiry set hold the same
    tickets, the cap holds, and nobody is admitted past an older waiting ticket."""
    fleet = make_fleet({"m": {"max_in_flight": 2}})
    adm = fleet.admission
    keys = adm.keys("m")
    for seed in range(4):
        rng = random.Random(seed)
        held: list[str] = []
        ages: dict[str, int] = {}
        base = int(adm.try_acquire("m").at_ms)
        second = adm.try_acquire("m")
        if second.lease_id:
            adm.release("m", second.lease_id)
        for step in range(150):
            op = rng.random()
            if op < 0.5:
                ticket = rng.choice([*ages, f"n{seed}-{step}"]) if ages else f"n{seed}-{step}"
                since = ages.setdefault(ticket, base + rng.randrange(0, 10_000))
                line = {t.decode(): s for t, s in rclient.zrange(keys.line, 0, -1, withscores=True)}
                older = sum(1 for t, s in line.items() if s < since and t != ticket)
                free = 2 - adm.in_flight("m")
                d = adm.try_acquire("m", lease_id=ticket, since_ms=since, join=rng.random() < 0.8)
                if d:
                    assert older < free, (seed, step, older, free)
                    held.append(ticket)
                    ages.pop(ticket, None)
            elif op < 0.8 and held:
                adm.release("m", held.pop(rng.randrange(len(held))))
            elif ages:
                ticket = rng.choice(list(ages))
                adm.leave("m", ticket)
                ages.pop(ticket)
            assert adm.in_flight("m") <= 2
            assert set(rclient.zrange(keys.line, 0, -1)) == set(rclient.zrange(keys.waiting, 0, -1))
        for t in held:
            adm.release("m", t)
        for t in ages:
            adm.leave("m", t)


def test_a_line_too_long_for_max_wait_is_logged_once_per_limit(
    make_fleet: MakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    _full(fleet)
    for i in range(8):  # eight waiters; the mean hold time is unknown (200 ms assumed)
        fleet.admission.try_acquire("m", lease_id=f"{i:024d}", join=True)
    caplog.set_level("WARNING", logger="celery_fleet")
    for _ in range(2):
        with pytest.raises(Throttled) as info:
            with fleet.slot("m", max_wait=0.2):
                pytest.fail("must not enter")
        assert info.value.reason == "queued"
    warnings = [r for r in caplog.records if "callers in line" in r.getMessage()]
    assert len(warnings) == 1
    assert "'m' has 9 callers in line" in warnings[0].getMessage()
    assert "max_wait=0.2 s" in warnings[0].getMessage()

    other = make_fleet({"m": {"max_in_flight": 1}})  # another Fleet in this process: its own
    caplog.clear()
    with pytest.raises(Throttled):
        with other.slot("m", max_wait=0.2):
            pass
    assert len([r for r in caplog.records if "callers in line" in r.getMessage()]) == 1


def test_a_newcomer_of_the_same_millisecond_does_not_pass_either(make_fleet: MakeFleet) -> None:
    """Order keys are whole ms: a tie goes to the ticket already waiting."""
    fleet = make_fleet({"m": {"max_in_flight": 1}})
    (held,) = _full(fleet)
    at = int(held.at_ms)  # type: ignore[attr-defined]
    fleet.admission.try_acquire("m", lease_id="w" * 24, since_ms=at, join=True)
    fleet.release(held)
    tie = fleet.admission.try_acquire("m", lease_id="n" * 24, since_ms=at)
    assert not tie and tie.reason == "queued" and tie.ahead == 1
