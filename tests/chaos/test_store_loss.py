"""Redis restarted empty under a live fleet: held leases are re-asserted at their next renewal.

Each test runs its own redis-server on a free port and restarts it; 6379 is never touched.
"""

from __future__ import annotations

import time

import pytest

from celery_fleet import Fleet, LeaseLost
from celery_fleet.testing.redis_server import RedisServer

pytestmark = pytest.mark.slow
LIMITS = {"tool": {"max_in_flight": 4, "lease": 3}}  # renewed every 1 s


def restart_empty(server: RedisServer) -> None:
    server.stop()
    server.start()


def wait_for(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_live_holders_rebuild_the_semaphore_within_one_renewal(server: RedisServer) -> None:
    holder = Fleet(redis_url=server.url, namespace="loss", limits=LIMITS)
    other = Fleet(redis_url=server.url, namespace="loss", limits=LIMITS)
    slots = [holder.slot("tool").acquire() for _ in range(4)]
    assert not other.try_acquire("tool")
    restart_empty(server)
    assert other.admission.in_flight("tool") == 0  # Redis forgot every lease
    # One renewal period (TTL / 3 = 1 s, plus a keeper tick) later they are back.
    assert wait_for(lambda: other.admission.in_flight("tool") == 4, 3.0)
    assert not other.try_acquire("tool"), "the cap must hold again"
    for slot in slots:
        slot.ensure_held()
        slot.release()
    assert other.try_acquire("tool")


def test_a_holder_whose_slot_went_to_a_newcomer_is_told(server: RedisServer) -> None:
    holder = Fleet(redis_url=server.url, namespace="loss", limits=LIMITS)
    other = Fleet(redis_url=server.url, namespace="loss", limits=LIMITS)
    slots = [holder.slot("tool").acquire() for _ in range(4)]
    restart_empty(server)
    newcomers = [other.try_acquire("tool") for _ in range(3)]  # before any renewal
    assert all(newcomers)
    assert wait_for(lambda: sum(s.lost for s in slots) == 3, 3.0)
    assert other.admission.in_flight("tool") == 4  # 3 newcomers + 1 re-asserted holder
    lost = [s for s in slots if s.lost]
    with pytest.raises(LeaseLost):
        lost[0].ensure_held()
    for slot in slots:
        slot.release()
