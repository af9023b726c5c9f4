"""Fixtures of the fault tests: a redis-server of the test's own, which it may stop,
restart empty or freeze (6379 is never touched)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_fleet.testing.redis_server import RedisServer


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server on a free port, stopped after the test."""
    srv = RedisServer().start()
    yield srv
    srv.stop()
