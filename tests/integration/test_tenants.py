"""Real `celery worker` processes: ``@fleet_task(key="{tenant}")`` holds the tenant's own
sub-limit (one call at a time per tenant) while the limit has room for many, and a bad
key fails at publish. Tasks are in tenants_app.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_fleet import ConfigError
from tests.integration.test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def tenants(redis_url: str) -> Iterator[Any]:
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    with start_worker(redis_url, broker, module="tests.integration.tenants_app") as app_module:
        yield app_module
        for client in (app_module.fleet.store._client, app_module.fleet.store._blocking):
            if client is not None:
                client.close()


def test_each_tenant_holds_its_own_slot_while_tenants_run_side_by_side(tenants: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    results = [
        tenants.per_tenant.delay(tenant, tag, 0.3)
        for _ in range(4)
        for tenant in ("acme", "globex")
    ]
    nested = [r.get(timeout=120) for r in results]
    # the task's key went to its nested slot of another keyed limit too
    assert sorted(nested) == ["acme"] * 4 + ["globex"] * 4
    seen = [x.decode().split() for x in tenants._probe.lrange(tenants.key(f"{tag}:seen"), 0, -1)]
    assert len(seen) == 8
    assert max(int(now) for _, now, _ in seen) == 1, seen  # one call per tenant at a time
    assert max(int(total) for _, _, total in seen) == 2, seen  # both tenants at once


def test_a_bad_key_fails_at_publish(tenants: Any) -> None:
    with pytest.raises(ConfigError, match="key"):
        tenants.per_tenant.delay("two\nlines", "x", 0.0)
    with pytest.raises(ConfigError, match="key"):
        tenants.per_tenant.delay("x" * 300, "x", 0.0)


def test_a_rescheduled_task_keeps_its_key_and_its_place(tenants: Any) -> None:
    """R (tenant a) waits in line briefly, gives up and is rescheduled; W (tenant a too)
    joins the line after; R's copy asks again after W and still stands before it: its
    fleet header kept its fair-share place."""
    m, probe = tenants, tenants._probe
    holder = m.fleet.try_acquire("line", key="h")
    assert holder
    r, w = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    try:
        rescheduled = m.keyed_in_line.delay("a", r, 0.5)
        wait_for(lambda: probe.llen(m.key(f"started:{r}")) == 2)  # its copy runs
        later = m.keyed_in_line.delay("a", w, 60.0)
        wait_for(lambda: len(m.fleet.line("line")) == 1)
        probe.rpush(m.key(f"go:{r}"), 1)
        wait_for(lambda: len(m.fleet.line("line")) == 2)
        line = [ticket for ticket, _ in m.fleet.line("line")]
    finally:
        m.fleet.release(holder)
    r_out, w_out = rescheduled.get(timeout=60), later.get(timeout=60)
    assert r_out["reschedules"] == 1 and r_out["places"], r_out
    assert r_out["admitted_ms"] < w_out["admitted_ms"], (r_out, w_out, line)


def wait_for(check: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
