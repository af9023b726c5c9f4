"""Keys, lanes and runtime changes on one limit: three parts of issue 23 built side by
side meet in one ticket ("<id>~<priority>-k<hash>"), one acquire call and one peek. Real
Redis (the decisions are made inside acquire.lua)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from celery_fleet import Fleet
from celery_fleet.observability.status import limit_status

MakeFleet = Callable[..., Fleet]
LANES = {"interactive": {"priority": 0, "reserve": 0.5}, "batch": {"priority": 1}}
LIMIT = {"max_in_flight": 8, "keys": {"max_in_flight": 3}, "lanes": LANES}


def test_a_keyed_caller_is_held_to_its_lane_share_and_to_its_keys_cap(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"m": LIMIT})
    # batch may hold floor(8 * 0.5) = 4 in flight; each key 3
    acme = [fleet.try_acquire("m", key="acme", lane="batch") for _ in range(4)]
    assert [bool(d) for d in acme] == [True, True, True, False]
    assert acme[-1].reason == "key_in_flight"
    globex = fleet.try_acquire("m", key="globex", lane="batch")
    assert globex  # the 4th batch slot
    refused = fleet.try_acquire("m", key="initech", lane="batch")
    assert not refused and refused.reason == "in_flight"  # batch's share is used
    interactive = fleet.try_acquire("m", key="initech", lane="interactive")
    assert interactive and interactive.lease_id is not None
    assert "~0-k" in interactive.lease_id  # the lane's marker, then the key's

    status = limit_status(fleet, "m")
    lanes = {x.lane: (x.in_flight, x.cap) for x in status.lanes}
    assert lanes == {"interactive": (1, 8), "batch": (4, 4)}
    assert status.keys is not None
    busiest = {k.key: k.in_flight for k in status.keys}
    assert busiest == {"acme": 3, "globex": 1, "initech": 1}

    fleet.release(acme[0])
    # the key's and the lane's slot back (the interactive slot is not batch's)
    assert fleet.try_acquire("m", key="acme", lane="batch")
    assert fleet.try_acquire("m", key="initech", lane="batch").reason == "in_flight"


def test_a_cap_changed_at_runtime_reaches_keyed_callers_at_once(make_fleet: MakeFleet) -> None:
    """Each key's acquire is packed once and cached: a runtime change must drop those."""
    fleet = make_fleet({"m": {"max_in_flight": 2, "weights": {}}})
    held = [fleet.try_acquire("m", key=f"k{i}") for i in range(3)]
    assert [bool(d) for d in held] == [True, True, False]
    fleet.set_limit("m", max_in_flight=4)
    more = [fleet.try_acquire("m", key=f"k{i}") for i in range(3)]
    assert [bool(d) for d in more] == [True, True, False]  # same keys, new cap


def test_waiting_interactive_callers_of_every_key_go_before_batch(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"m": {"max_in_flight": 2, "weights": {}, "lanes": LANES}})
    first = fleet.try_acquire("m", key="a", lane="interactive")
    second = fleet.try_acquire("m", key="b", lane="interactive")
    assert first and second
    order: list[str] = []
    done = threading.Event()

    def wait(key: str, lane: str) -> None:
        with fleet.slot("m", key=key, lane=lane, max_wait=30):
            order.append(lane)

    batch = threading.Thread(target=wait, args=("a", "batch"))
    batch.start()
    for _ in range(200):  # the batch ticket is in line first
        if fleet.line("m"):
            break
        done.wait(0.01)
    urgent = threading.Thread(target=wait, args=("b", "interactive"))
    urgent.start()
    for _ in range(200):
        if len(fleet.line("m")) == 2:
            break
        done.wait(0.01)
    fleet.release(first)
    fleet.release(second)
    batch.join(30)
    urgent.join(30)
    assert order == ["interactive", "batch"]


def test_a_keys_interactive_call_does_not_send_other_keys_to_the_back_of_batch(
    make_fleet: MakeFleet,
) -> None:
    """Fair share is kept per lane: key "a" with a long batch queue asks once in the
    interactive lane; that admission must not move the batch lane's virtual time past
    a's queued tickets (three keys of 300/30/3 batch callers got 84/15/1.6% of a
    window, not a third each, with one light interactive caller of the big key)."""
    fleet = make_fleet(
        {
            "m": {
                "max_in_flight": 1,
                "weights": {},
                "lanes": {"interactive": {"priority": 0}, "batch": {"priority": 1}},
            }
        }
    )
    adm = fleet.admission

    def join(key: str, lane: str) -> str:
        ticket = adm.new_ticket("m", key, lane)
        assert not adm.try_acquire("m", 0, ticket, join=True)
        return ticket

    holder = fleet.try_acquire("m", key="h", lane="interactive")
    assert holder
    a_batch = [join("a", "batch") for _ in range(5)]
    a_urgent = join("a", "interactive")
    fleet.release(holder)
    urgent = adm.try_acquire("m", 0, a_urgent, join=True)
    assert urgent  # the interactive ticket goes first
    b = join("b", "batch")  # b arrives while a's batch queue waits
    order = [ticket for ticket, _ in fleet.line("m")]
    assert order.index(b) <= 1, order.index(b)  # b shares a's first turn, not the sixth
    assert [t for t in order if t in a_batch] == a_batch
    fleet.release(urgent)
