"""Affinity queues, the core: the hash ring, bounded rendezvous homes, leases on real Redis,
the steal planner's hysteresis, and the distribution settings."""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from celery_fleet import ConfigError, Fleet
from celery_fleet.clock import SystemClock
from celery_fleet.distribution import (
    DistributionConfig,
    Homes,
    StealPlanner,
    affinity_queue_index,
    affinity_queue_name,
    assign,
    queue_of,
    queues_of,
)

MakeFleet = Callable[..., Fleet]


def _workers(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"w{i}@host/{rng.getrandbits(32):08x}" for i in range(n)]


# -- the ring ---------------------------------------------------------------------------


@pytest.mark.fast
def test_queue_of_is_stable_and_spreads_keys() -> None:
    # Fixed values: a salted hash() would change them from one process to the next.
    # (BLAKE2b of the key: the same numbers in every process, Python version and run)
    assert [queue_of(f"customer:{i}", 32) for i in range(5)] == [23, 18, 11, 1, 4]
    assert queue_of("customer:42", 32) == 4
    counts = Counter(queue_of(f"customer:{i}", 32) for i in range(32_000))
    assert len(counts) == 32 and max(counts.values()) < 1.15 * 1000


@pytest.mark.fast
def test_queue_names_round_trip() -> None:
    assert affinity_queue_name("fleet", 7) == "fleet.affinity.7"
    assert affinity_queue_index("fleet", "fleet.affinity.7") == 7
    assert affinity_queue_index("fleet", "celery") is None
    assert affinity_queue_index("fleet", "other.affinity.7") is None
    config = DistributionConfig("steal", 8, namespace="fleet")
    assert config.index_of("fleet.affinity.8") is None  # beyond this fleet's queues
    assert config.queue_for("customer:42") == f"fleet.affinity.{queue_of('customer:42', 8)}"


@pytest.mark.fast
@pytest.mark.parametrize("bad", [None, 3, b"x"])
def test_queue_of_refuses_a_key_that_is_not_a_str(bad: Any) -> None:
    with pytest.raises(ConfigError, match="affinity key"):
        queue_of(bad, 32)


# -- homes: pure assignment ---------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10])
def test_homes_are_balanced_by_count(n: int) -> None:
    for seed in range(20):
        workers = _workers(n, seed)
        homes = assign(workers, 32)
        load = Counter(homes)
        assert set(load) == set(workers)  # every worker is home of some queue
        assert max(load.values()) <= math.ceil(32 / n)
        assert max(load.values()) - min(load.values()) <= 1


@pytest.mark.fast
def test_every_process_computes_the_same_homes() -> None:
    workers = _workers(5)
    shuffled = random.Random(1).sample(workers, len(workers))
    assert assign(workers, 32) == assign(shuffled, 32)
    by_worker = [queues_of(w, workers, 32) for w in workers]
    assert sorted(q for qs in by_worker for q in qs) == list(range(32))  # a partition


@pytest.mark.fast
@pytest.mark.parametrize("n", [2, 3, 4, 6, 8])
def test_a_join_or_a_leave_moves_about_one_nth_of_the_queues(n: int) -> None:
    queues = 64
    joins, leaves = [], []
    for seed in range(30):
        workers = _workers(n, seed)
        before = assign(workers, queues)
        after_join = assign([*workers, f"new@host/{seed}"], queues)
        after_leave = assign(workers[1:], queues)
        joins.append(sum(a != b for a, b in zip(before, after_join, strict=True)))
        leaves.append(sum(a != b for a, b in zip(before, after_leave, strict=True)))
    # Ideal: queues/(n+1) move to the newcomer; queues/n move off the leaver. The cap
    # moves a few more; a rehash of everything (mod n) would move ~ (1 - 1/n) of them.
    assert sum(joins) / len(joins) <= 2.0 * queues / (n + 1)
    assert sum(leaves) / len(leaves) <= 2.0 * queues / n


def _moves(before: list[str | None], after: list[str | None]) -> int:
    return sum(a != b for a, b in zip(before, after, strict=True))


@pytest.mark.fast
@pytest.mark.parametrize("n", range(2, 11))
def test_queues_stay_with_their_live_holders_so_a_join_or_leave_moves_the_fewest(n: int) -> None:
    """Given the holders, a join moves about queues/(n+1) queues (to the newcomer) and a
    leave only the leaver's: a queue stays with its live holder while that one is within
    the cap. Plain bounded rendezvous moved 2.3-3.1 times the ideal with 32 queues."""
    queues = 32
    joins = []
    for seed in range(30):
        workers = _workers(n, seed)
        now = assign(workers, queues)
        for step in range(3):  # from a plain assignment, then from the kept ones
            newcomer = f"new{step}@host/{seed}"
            joined = assign([*workers, newcomer], queues, now)
            joins.append(_moves(now, joined))
            assert _moves(now, joined) <= math.ceil(queues / (n + 1)) + 1, (n, seed, step)
            load = Counter(joined)
            assert max(load.values()) - min(load.values()) <= 1 and len(load) == n + 1
            leaver = random.Random(seed + step).choice(workers)
            rest = [w for w in [*workers, newcomer] if w != leaver]
            left = assign(rest, queues, joined)
            theirs = joined.count(leaver)
            assert _moves(joined, left) <= theirs + 1, (n, seed, step, theirs)
            load = Counter(left)
            assert max(load.values()) - min(load.values()) <= 1 and len(load) == n
            assert leaver not in load
            workers, now = rest, left
    assert sum(joins) / len(joins) <= 1.1 * queues / (n + 1)


@pytest.mark.fast
def test_every_process_computes_the_same_homes_from_the_same_holders() -> None:
    workers = _workers(5)
    holders = assign(workers[:3], 32)
    shuffled = random.Random(1).sample(workers, len(workers))
    assert assign(workers, 32, holders) == assign(shuffled, 32, holders)
    by_worker = [queues_of(w, workers, 32, holders) for w in workers]
    assert sorted(q for qs in by_worker for q in qs) == list(range(32))  # a partition


@pytest.mark.fast
def test_no_workers_no_homes() -> None:
    assert assign([], 4) == [None] * 4


# -- homes: leases on Redis ----------------------------------------------------------------


class _Clock(SystemClock):
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def _homes(fleet: Fleet, name: str, queues: int = 8, lease_s: float = 1.0) -> Homes:
    config = DistributionConfig("dedicated", queues, lease_s=lease_s, namespace=fleet.namespace)
    return Homes(fleet.store, config, name)


def _round(homes: Homes) -> set[int]:
    return homes.claim(homes.wanted(homes.announce()))


def test_each_queue_has_exactly_one_home(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({})
    a, b, c = (_homes(fleet, n) for n in ("a@h", "b@h", "c@h"))
    _round(a)
    assert a.held == set(range(8))  # alone: every queue
    for _ in range(3):  # b and c join; a gives queues up as it sees them
        for homes in (b, c, a):
            _round(homes)
    held = [a.held, b.held, c.held]
    assert sorted(q for h in held for q in h) == list(range(8))  # a partition, none twice
    assert all(2 <= len(h) <= 3 for h in held)
    assert a.read_holders() == [
        next(h.worker_id for h in (a, b, c) if q in h.held) for q in range(8)
    ]


def test_workers_with_another_number_of_queues_leave_no_queue_homeless(
    make_fleet: MakeFleet,
) -> None:
    """Two workers with 8 queues and one with 5 (started at once, so none was refused):
    each side leaves the others out of its assignment, so every queue of the 8-queue side
    still gets a home; counting the odd worker in would leave the queues it "should" have
    (in the 8-queue view) with none."""
    fleet = make_fleet({})
    a, b, odd = _homes(fleet, "a@h"), _homes(fleet, "b@h"), _homes(fleet, "odd@h", queues=5)
    for homes in (a, b, odd):
        homes.announce()
    for _ in range(3):
        for homes in (odd, a, b):
            _round(homes)
    assert [w.split("@")[0] for w in a.strangers(a.announce())] == ["odd"]
    assert all(a.read_holders()), a.read_holders()  # every queue has a home


def test_a_held_queue_is_not_taken_and_a_stalled_owner_cannot_take_it_back(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({})
    a, b = _homes(fleet, "a@h", lease_s=0.6), _homes(fleet, "b@h", lease_s=0.6)
    assert a.claim({0, 1}) == {0, 1}
    assert b.claim({0, 1, 2}) == {2}  # a's leases hold
    deadline = time.monotonic() + 5
    while b.claim({0, 1, 2}) != {0, 1, 2}:  # a stalls: its leases lapse on Redis's clock
        assert time.monotonic() < deadline, "a's leases never lapsed"
        time.sleep(0.05)
    assert a.claim({0, 1}) == set()  # a wakes up: it reads b's id, takes nothing back
    assert a.holders[0] == b.worker_id


def test_a_dead_workers_queues_move_within_one_lease(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({})
    a, b = _homes(fleet, "a@h", lease_s=0.6), _homes(fleet, "b@h", lease_s=0.6)
    for _ in range(2):
        _round(a), _round(b)
    assert a.held and b.held
    lost = set(a.held)
    start = time.monotonic()  # a dies: it renews nothing from now on
    while not lost <= _round(b):
        assert time.monotonic() - start < 0.6 + 0.5, "a's queues did not move within a lease"
        time.sleep(0.05)
    assert b.held == set(range(8))


def test_leave_frees_the_queues_at_once(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({})
    a, b = _homes(fleet, "a@h", lease_s=30), _homes(fleet, "b@h", lease_s=30)
    for _ in range(2):
        _round(a), _round(b)
    a.leave()
    assert a.worker_id not in b.announce()
    assert _round(b) == set(range(8))


def test_local_validity_ends_with_the_lease() -> None:
    clock = _Clock()

    class _Store:
        def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
            return [args[0] if f == "1" else "" for f in args[2]]

    config = DistributionConfig("dedicated", 2, lease_s=3.0)
    homes = Homes(_Store(), config, "a@h", clock=clock)  # type: ignore[arg-type]
    homes.claim({0})
    assert homes.live and homes.held == {0}
    clock.now = 2.98
    assert not homes.live  # 3 s less the allowed clock drift


# -- the steal planner -------------------------------------------------------------------


@pytest.mark.fast
def test_an_idle_worker_steals_the_deepest_peer_queue_past_the_threshold() -> None:
    planner = StealPlanner(threshold=4)
    assert planner.decide({0: 0, 1: 4, 2: 3}, own={0}, idle=True) == (None, None)  # not > 4
    assert planner.decide({0: 0, 1: 5, 2: 9}, own={0}, idle=True) == (2, None)
    assert planner.stolen == 2


@pytest.mark.fast
def test_no_steal_while_busy_or_with_own_work() -> None:
    planner = StealPlanner(threshold=4)
    assert planner.decide({0: 0, 2: 9}, own={0}, idle=False) == (None, None)
    assert planner.decide({0: 1, 2: 9}, own={0}, idle=True) == (None, None)


@pytest.mark.fast
def test_stealing_stops_below_the_low_mark_only() -> None:
    planner = StealPlanner(threshold=4)
    planner.decide({0: 0, 2: 9}, own={0}, idle=True)
    for depth in (4, 3, 2):  # below the threshold, not below half of it: keeps stealing
        assert planner.decide({0: 0, 2: depth}, own={0}, idle=True) == (None, None)
        assert planner.stolen == 2
    assert planner.decide({0: 0, 2: 1}, own={0}, idle=True) == (None, 2)
    assert planner.stolen is None


@pytest.mark.fast
@pytest.mark.parametrize("threshold", [1, 2, 3])
def test_a_small_threshold_still_gives_the_stolen_queue_back_once_empty(threshold: int) -> None:
    """fleet_steal_threshold = 1 is accepted: half of it rounds to 0, and "below 0" never
    happens, so the thief kept the queue for good (and stole nothing else). The low mark
    is at least 1: an emptied stolen queue is always given back."""
    planner = StealPlanner(threshold=threshold)
    assert planner.decide({0: 0, 2: threshold + 1}, own={0}, idle=True) == (2, None)
    assert planner.decide({0: 0, 2: 0}, own={0}, idle=True) == (None, 2)
    assert planner.stolen is None
    assert DistributionConfig(mode="steal", steal_threshold=threshold).low_mark >= 1


@pytest.mark.fast
def test_a_stolen_queue_that_becomes_ours_is_no_longer_stolen() -> None:
    planner = StealPlanner(threshold=4)
    planner.decide({0: 0, 2: 9}, own={0}, idle=True)
    assert planner.decide({0: 0, 2: 9}, own={0, 2}, idle=False) == (None, None)
    assert planner.stolen is None


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "match"),
    [
        ("fleet_distribution", "steel", "fleet_distribution must be one of"),
        ("fleet_distribution", None, "fleet_distribution must be one of"),
        ("fleet_affinity_queues", 0, "fleet_affinity_queues must be an int from 1"),
        ("fleet_affinity_queues", 4.0, "fleet_affinity_queues must be an int"),
        ("fleet_affinity_queues", True, "fleet_affinity_queues must be an int"),
        ("fleet_affinity_queues", 10**6, "fleet_affinity_queues must be an int from 1 to"),
        ("fleet_steal_threshold", -1, "fleet_steal_threshold must be an int"),
        ("fleet_steal_threshold", "4", "fleet_steal_threshold must be an int"),
        ("fleet_affinity_lease", 0.1, "fleet_affinity_lease must be"),
    ],
)
def test_bad_distribution_settings_are_config_errors(
    redis_url: str, namespace: str, setting: str, value: Any, match: str
) -> None:
    app = Celery("t", broker=redis_url, set_as_current=False)
    app.conf.fleet_namespace = namespace
    app.conf[setting] = value
    with pytest.raises(ConfigError, match=match):
        Fleet(app)


def test_distribution_settings_reach_the_fleet(redis_url: str, namespace: str) -> None:
    app = Celery("t", broker=redis_url, set_as_current=False)
    app.conf.fleet_namespace = namespace
    default = Fleet(app).distribution
    assert (default.mode, default.queues, default.steal_threshold) == ("shared", 32, 4)
    app2 = Celery("t2", broker=redis_url, set_as_current=False)
    app2.conf.update(
        fleet_namespace=namespace,
        fleet_distribution="steal",
        fleet_affinity_queues=8,
        fleet_steal_threshold=6,
    )
    config = Fleet(app2).distribution
    assert (config.mode, config.queues, config.steal_threshold, config.low_mark) == (
        "steal",
        8,
        6,
        3,
    )
    assert config.queue_name(3) == f"{namespace}.affinity.3"
