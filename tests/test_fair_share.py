"""Fair share between the keys of a limit, on a real Redis: the line's order between keys
(start-time fair queueing, weighted, FIFO inside a key), then threads of three keys with
300, 30 and 3 callers behind one in-flight cap getting max-min fair shares."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from celery_fleet import Fleet, Throttled
from celery_fleet.admission.tenancy import lease_key_hash

LIMIT = "llm"


def _join(fleet: Fleet, key: str) -> str:
    """One refused ask that takes a ticket in line; the ticket."""
    adm = fleet.admission
    ticket = adm.new_ticket(LIMIT, key)
    decision = adm.try_acquire(LIMIT, 0, ticket, join=True)
    assert not decision, decision
    return ticket


def test_the_line_alternates_between_keys_and_keeps_order_inside_one(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet({LIMIT: {"max_in_flight": 1, "weights": {}}})
    holder = fleet.try_acquire(LIMIT, key="h")
    assert holder
    a = [_join(fleet, "a") for _ in range(5)]  # a's five join first
    b = [_join(fleet, "b") for _ in range(5)]
    order = [ticket for ticket, _ in fleet.line(LIMIT)]
    # served in turns: a and b share each turn (equal tags), whoever joined first
    for i in range(5):
        assert set(order[2 * i : 2 * i + 2]) == {a[i], b[i]}, (i, order)
    # FIFO inside a key
    assert [t for t in order if t in a] == a and [t for t in order if t in b] == b
    fleet.release(holder)


def test_weights_give_turns_in_proportion(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet({LIMIT: {"max_in_flight": 1, "weights": {"gold": 3}}})
    holder = fleet.try_acquire(LIMIT, key="h")
    assert holder
    gold = {_join(fleet, "gold") for _ in range(9)}
    plain = {_join(fleet, "plain") for _ in range(9)}
    order = [ticket for ticket, _ in fleet.line(LIMIT)]
    first_eight = order[:8]
    # three turns of gold for one of plain
    assert sum(t in gold for t in first_eight) == 6
    assert sum(t in plain for t in first_eight) == 2
    fleet.release(holder)


def test_a_key_that_comes_back_does_not_hoard_credit(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet({LIMIT: {"max_in_flight": 1, "weights": {}}})
    # busy key "a" is served 20 times while "b" is idle
    for _ in range(20):
        d = fleet.try_acquire(LIMIT, key="a")
        assert d
        fleet.release(d)
    holder = fleet.try_acquire(LIMIT, key="a")
    a = [_join(fleet, "a") for _ in range(4)]
    b = [_join(fleet, "b") for _ in range(4)]
    order = [ticket for ticket, _ in fleet.line(LIMIT)]
    # b returns at the virtual time now (a's holder's turn): its first ticket goes next,
    # then the two alternate; with credit for its idle time all four would go first
    assert order[0] == b[0]
    assert sum(t in b for t in order[:3]) == 2 and sum(t in a for t in order[:5]) >= 2
    fleet.release(holder)


def _shares(
    fleet: Fleet, callers: dict[str, int], hold_s: float, pause_s: dict[str, float], run_s: float
) -> Counter[str]:
    """Threads per key loop on slots for ``run_s``; admissions per key in the last 2/3."""
    stop = threading.Event()
    counting = threading.Event()
    admitted: Counter[str] = Counter()
    lock = threading.Lock()
    started = threading.Barrier(sum(callers.values()) + 1)

    def worker(key: str) -> None:
        started.wait()
        while not stop.is_set():
            try:
                with fleet.slot(LIMIT, key=key or None, max_wait=30):
                    if counting.is_set():
                        with lock:
                            admitted[key] += 1
                    time.sleep(hold_s)
            except Throttled:
                continue
            if pause_s.get(key):
                time.sleep(pause_s[key])

    threads = [
        threading.Thread(target=worker, args=(key,), daemon=True)
        for key, n in callers.items()
        for _ in range(n)
    ]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(run_s / 3)  # the line fills, every key gets going
    counting.set()
    time.sleep(run_s * 2 / 3)
    counting.clear()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return admitted


def _jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def test_three_keys_of_300_30_and_3_callers_get_fair_shares(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet({LIMIT: {"max_in_flight": 6, "weights": {}, "lease": 30}})
    admitted = _shares(fleet, {"big": 300, "mid": 30, "small": 3}, 0.02, {}, 9.0)
    total = sum(admitted.values())
    shares = {key: admitted[key] / total for key in ("big", "mid", "small")}
    assert total > 150, admitted
    for key, share in shares.items():
        assert abs(share - 1 / 3) <= 0.05, (key, shares, admitted)
    assert _jain([s * 3 for s in shares.values()]) >= 0.99, shares


def test_an_idle_keys_share_goes_to_the_others(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet({LIMIT: {"max_in_flight": 4, "weights": {"gold": 2}, "lease": 30}})
    # "light" asks rarely (1 caller that works 0.2 s between calls): it gets all it asks,
    # the rest is shared 2:1 by gold and plain
    admitted = _shares(fleet, {"gold": 20, "plain": 20, "light": 1}, 0.02, {"light": 0.2}, 6.0)
    light_demand = 4.0 / (0.2 + 0.02)  # at most this many in 4 s
    assert admitted["light"] >= 0.6 * light_demand, admitted
    rest = admitted["gold"] + admitted["plain"]
    assert abs(admitted["gold"] / rest - 2 / 3) <= 0.05, admitted
    # work-conserving: the cap stays busy (4 slots of 20 ms: about 200 a second at most)
    assert rest + admitted["light"] > 0.4 * 4 * 4 / 0.02, admitted


def test_lease_key_hash_reads_the_key_of_a_ticket() -> None:
    assert lease_key_hash("1700000000000000.1.0.abcd1234abcd1234abcd1234-k0123456789abcdef") == (
        "0123456789abcdef"
    )
    assert lease_key_hash("1700000000000000.1.0.abcd1234abcd1234abcd1234") == "_"


def test_a_call_asking_again_with_a_new_ticket_keeps_its_place_in_its_key(
    make_fleet: Callable[..., Fleet],
) -> None:
    """A task that gave up waiting and was rescheduled asks with a new ticket: the place
    its run kept (the ``fleet`` header carries it) puts it before its key's younger ones."""
    import json

    from celery_fleet.admission.run import Run, Throttling

    fleet = make_fleet({LIMIT: {"max_in_flight": 1, "weights": {}}})
    adm = fleet.admission
    holder = fleet.try_acquire(LIMIT, key="h")
    assert holder
    run = Run()
    first = adm.new_ticket(LIMIT, "a")
    refused = adm.try_acquire(LIMIT, 0, first, adm.order_of(LIMIT, run), join=True)
    adm.remember_place(LIMIT, run, refused)
    assert not refused and run.places == {LIMIT: refused.place}
    younger = [_join(fleet, "a") for _ in range(3)]
    others = [_join(fleet, "b") for _ in range(3)]
    assert adm.leave(LIMIT, first)  # gives up: the task reschedules
    header = json.loads(json.dumps(Throttling(places=dict(run.places)).as_header()))
    again = Run(places=Throttling.from_header(header).places)
    ticket = adm.new_ticket(LIMIT, "a")
    back = adm.try_acquire(LIMIT, 0, ticket, adm.order_of(LIMIT, again), join=True)
    adm.remember_place(LIMIT, again, back)
    assert not back and back.place == refused.place
    newer = _join(fleet, "a")  # the key's next call still goes after all of its others
    order = [t for t, _ in fleet.line(LIMIT)]
    mine = [ticket, *younger, newer]
    assert [t for t in order if t in mine] == mine, order
    # its key did not move on for it: the others keep their turns
    assert order.index(others[0]) <= 1
    # admitted: the run's next call is a new one, with no place kept
    fleet.release(holder)
    for t in order:
        d = adm.try_acquire(LIMIT, 0, t, join=True)
        if t == ticket:
            adm.remember_place(LIMIT, again, d)
            assert d and again.places == {}
            fleet.release(d)
            break
        assert d
        fleet.release(d)


def test_a_key_at_its_own_cap_leaves_the_rest_to_the_others(
    make_fleet: Callable[..., Fleet],
) -> None:
    """Every key may hold 1 of the limit's 4 slots: the waiting callers of key "capped"
    do not block the line, and the callers without a key (the default key has no
    sub-limit) get the other 3 (about three admissions for each of "capped")."""
    fleet = make_fleet(
        {LIMIT: {"max_in_flight": 4, "keys": {"max_in_flight": 1}, "weights": {}, "lease": 30}}
    )
    admitted = _shares(fleet, {"capped": 20, "": 20}, 0.03, {}, 6.0)
    ratio = admitted[""] / max(1, admitted["capped"])
    assert 2.4 <= ratio <= 3.6, admitted
    # work-conserving: the 4 slots stay busy (30 ms holds: ~133 a second at most)
    assert sum(admitted.values()) > 0.5 * 4 * 4 / 0.03, admitted
