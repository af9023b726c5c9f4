"""Redis restarted empty: fencing tokens of locks and leader terms still never go back.

Each test runs its own redis-server (no persistence) on a free port and restarts it;
6379 is never touched.
"""

from __future__ import annotations

import pytest

from celery_fleet import Fleet
from celery_fleet.testing.redis_server import RedisServer

pytestmark = pytest.mark.slow


def test_lock_tokens_stay_above_every_earlier_one_after_an_empty_restart(
    server: RedisServer,
) -> None:
    fleet = Fleet(redis_url=server.url, namespace="fence", limits={})
    lock = fleet.lock("report", ttl=5)
    tokens = []
    for _ in range(50):
        tokens.append(lock.acquire())
        lock.release()
    assert all(a < b for a, b in zip(tokens[:-1], tokens[1:], strict=True))
    server.stop()  # --save '' --appendonly no: every key, the fence counter too, is gone
    server.start()
    after = fleet.lock("report", ttl=5).acquire()
    assert after > tokens[-1], (tokens[-1], after)
    assert after < 2**53  # exact in a Lua number, a JSON number, a double


def test_leader_terms_stay_above_every_earlier_one_after_an_empty_restart(
    server: RedisServer,
) -> None:
    fleet = Fleet(redis_url=server.url, namespace="fence", limits={})
    terms = []
    for _ in range(3):
        with fleet.leader("scheduler", lease=3) as leader:
            assert leader.wait(5) and leader.token is not None
            terms.append(leader.token)
    server.stop()
    server.start()
    with fleet.leader("scheduler", lease=3) as leader:
        assert leader.wait(5) and leader.token is not None
        assert leader.token > terms[-1], (terms, leader.token)
