"""Real `celery worker` processes: ``@fleet_task(key="{tenant}")`` holds the tenant's own
sub-limit (one call at a time per tenant) while the limit has room for many, and a bad
key fails at publish. Tasks are in tenants_app.py."""

from __future__ import annotations

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
