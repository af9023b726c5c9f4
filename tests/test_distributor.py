"""The worker's distribution loop on real Redis, with Celery's consumer replaced by a
recorder: a queue is never consumed by two loops during a hand-over, a loop whose Redis
freezes stops consuming once its leases may have lapsed, and an idle loop steals."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_fleet import Fleet
from celery_fleet.celery.distributor import Distributor
from celery_fleet.distribution import DistributionConfig
from celery_fleet.distribution.status import stats_key
from celery_fleet.testing.redis_server import RedisServer

QUEUES = 8


class Consumer:
    """Records the queues it consumes; ``call_soon`` runs at once, as the hub would soon."""

    def __init__(self, consuming: dict[str, set[str]], name: str) -> None:
        self.consuming, self.name = consuming, name
        self.lock = threading.Lock()

    def call_soon(self, fn: Callable[[], None]) -> None:
        with self.lock:
            fn()

    def add_task_queue(self, queue: str) -> None:
        self.consuming.setdefault(queue, set()).add(self.name)

    def cancel_task_queue(self, queue: str) -> None:
        self.consuming.get(queue, set()).discard(self.name)


class Depths:
    def __init__(self) -> None:
        self.now: dict[str, int] = {}

    def depths(self, names: Any) -> dict[str, int]:
        return {n: self.now.get(n, 0) for n in names}

    def close(self) -> None:
        pass


def _loop(
    fleet: Fleet,
    consuming: dict[str, set[str]],
    name: str,
    mode: str = "dedicated",
    lease_s: float = 1.0,
    depths: Depths | None = None,
    free: Callable[[], int] = lambda: 0,
) -> Distributor:
    config = DistributionConfig(mode, QUEUES, 2, lease_s, fleet.namespace)
    return Distributor(
        Consumer(consuming, name),
        fleet.store,
        config,
        name,
        depths or Depths(),  # type: ignore[arg-type]
        free,
    ).start()


def _wait(what: Callable[[], bool], within_s: float, why: str) -> None:
    deadline = time.monotonic() + within_s
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.02)


def _by(consuming: dict[str, set[str]], name: str) -> set[str]:
    return {q for q, names in consuming.items() if name in names}


def test_a_hand_over_never_has_two_consumers(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet({})
    consuming: dict[str, set[str]] = {}
    a = _loop(fleet, consuming, "a")
    _wait(lambda: len(_by(consuming, "a")) == QUEUES, 5, "a never took every queue")
    worst = 0
    b = _loop(fleet, consuming, "b")
    try:
        deadline = time.monotonic() + 10
        while not (len(_by(consuming, "a")) == len(_by(consuming, "b")) == QUEUES // 2):
            worst = max(worst, *(len(n) for n in list(consuming.values())))
            assert time.monotonic() < deadline, consuming
            time.sleep(0.005)
        assert worst == 1, "a queue had two consumers during the hand-over"
    finally:
        b.stop()
    _wait(lambda: len(_by(consuming, "a")) == QUEUES, 5, "b's queues never came back to a")
    a.stop()
    assert not _by(consuming, "a")


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer(port=23117) as server:
        yield server


def test_a_frozen_redis_stops_the_consumers_once_the_leases_may_have_lapsed(
    own_redis: RedisServer, namespace: str
) -> None:
    fleet = Fleet(redis_url=own_redis.url, namespace=namespace, limits={})
    consuming: dict[str, set[str]] = {}
    loop = _loop(fleet, consuming, "a", lease_s=1.0)
    try:
        _wait(lambda: len(_by(consuming, "a")) == QUEUES, 5, "never took the queues")
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # frozen: accepts, answers nothing
        try:
            # within the lease, plus the health timeout of the call under way
            _wait(lambda: not _by(consuming, "a"), 1.0 + 3.0, "kept consuming")
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        _wait(lambda: len(_by(consuming, "a")) == QUEUES, 10, "never took them back")
    finally:
        loop.stop()


def test_an_idle_loop_steals_and_gives_back(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet({})
    consuming: dict[str, set[str]] = {}
    depths = Depths()
    a = _loop(fleet, consuming, "a", mode="steal", depths=depths)
    b = _loop(fleet, consuming, "b", mode="steal", depths=depths, free=lambda: 1)
    try:
        _wait(
            lambda: len(_by(consuming, "a")) == len(_by(consuming, "b")) == QUEUES // 2,
            10,
            "homes never settled",
        )
        hot = sorted(_by(consuming, "a"))[0]
        depths.now[hot] = 5  # past the threshold (2)
        _wait(lambda: consuming[hot] == {"a", "b"}, 5, "the idle b never stole")
        assert b.info()["stealing"] == int(hot.rsplit(".", 1)[1])
        depths.now[hot] = 1  # below the threshold, not below half of it: b keeps it
        time.sleep(1.0)
        assert consuming[hot] == {"a", "b"}
        depths.now[hot] = 0
        _wait(lambda: consuming[hot] == {"a"}, 5, "b never gave it back")
    finally:
        a.stop()
        b.stop()


def test_a_dead_homes_queues_move_just_after_its_lease_lapses(
    make_fleet: Callable[..., Fleet],
) -> None:
    """The survivor looks again just after the dead worker's lease lapses (the homes script
    tells it when), not at its next round (a third of the lease later, 2 s at most): the
    queues move within one lease of the death. While both live, that adds no round."""
    fleet = make_fleet({})
    consuming: dict[str, set[str]] = {}
    lease_s = 6.0  # rounds every 2 s: a round-bound hand-over would lag up to 2 s
    a = _loop(fleet, consuming, "a", lease_s=lease_s)
    time.sleep(1.0)  # out of step: b's rounds fall between a's, as they would in a fleet
    b = _loop(fleet, consuming, "b", lease_s=lease_s)
    try:
        _wait(
            lambda: len(_by(consuming, "a")) == len(_by(consuming, "b")) == QUEUES // 2,
            15,
            "homes never settled",
        )
        claims = 0
        claim = b.homes.claim

        def counted(*args: Any, **kwargs: Any) -> set[int]:
            nonlocal claims
            claims += 1
            return claim(*args, **kwargs)

        b.homes.claim = counted  # type: ignore[method-assign]
        time.sleep(4.0)
        assert claims <= 3, f"{claims} rounds in 4 s while the peer renewed (every 2 s)"
        a._loop.stop(join_s=10)  # a dies: no leave, nothing renewed from now on
        lost = _by(consuming, "a")
        keys = [f"{{{fleet.namespace}:affinity}}:home:{q.rsplit('.', 1)[1]}" for q in lost]
        lapse = time.monotonic() + max(fleet.store.client.pttl(k) for k in keys) / 1000.0
        _wait(lambda: len(_by(consuming, "b")) == QUEUES, lease_s + 3, "b never took them")
        late = time.monotonic() - lapse
        assert late < 0.3, f"a's queues moved {late:.2f} s after its leases lapsed"
    finally:
        b.stop()
        a.stop()


def test_inspect_reads_the_depths_of_the_queues_it_is_home_of_now(
    make_fleet: Callable[..., Fleet],
) -> None:
    """``celery inspect fleet`` shows the depth of each queue the worker is home of, read
    on the call (a dedicated worker never samples, so ``sampled_depths`` stay empty)."""
    fleet = make_fleet({})
    consuming: dict[str, set[str]] = {}
    depths, opened = Depths(), []

    def open_depths() -> Depths:
        opened.append(1)
        return depths

    config = DistributionConfig("dedicated", QUEUES, 2, 1.0, fleet.namespace)
    loop = Distributor(
        Consumer(consuming, "a"), fleet.store, config, "a", Depths(), lambda: 0,
        open_depths=open_depths,  # type: ignore[arg-type,return-value]
    ).start()  # fmt: skip
    try:
        _wait(lambda: len(_by(consuming, "a")) == QUEUES, 5, "never took the queues")
        depths.now = {config.queue_name(3): 7, config.queue_name(5): 2}
        info = loop.inspect()
        assert info["depths"] == {q: {3: 7, 5: 2}.get(q, 0) for q in range(QUEUES)}
        assert info["sampled_depths"] == {} and opened == [1]  # read on the call only
    finally:
        loop.stop()


def test_counts_flushed_on_a_frozen_redis_wait_the_health_deadline_and_are_kept(
    own_redis: RedisServer, namespace: str
) -> None:
    """The affinity counts' flush (every round, and at a worker's shutdown) on a frozen
    Redis: it went through the client's own pipeline and waited its 5 s socket timeout
    (``stop()`` at shutdown too); on the store's wire it waits the health deadline. The
    counts are kept for the next flush, and written once Redis answers."""
    fleet = Fleet(redis_url=own_redis.url, namespace=namespace, limits={})
    config = DistributionConfig("dedicated", QUEUES, 2, 1.0, fleet.namespace)
    loop = Distributor(Consumer({}, "a"), fleet.store, config, "a", Depths(), lambda: 0)  # type: ignore[arg-type]
    loop.received(config.queue_name(0))
    health = fleet.store.health_s
    with own_redis.frozen():
        start = time.monotonic()
        loop._flush_counts()
        took = time.monotonic() - start
    # the defect waited the 5 s socket timeout; the slack is for a loaded CI machine
    assert took < health * 1.5, took
    assert loop._unflushed, "the counts of a failed flush are kept"
    loop._flush_counts()
    assert not loop._unflushed
    stats = fleet.store.client.hgetall(stats_key(namespace))
    assert sum(int(v) for v in stats.values()) >= 1, stats
    fleet.close()
