"""fleet.wrap in real `celery worker` processes: an anthropic client in fleet tasks.

A herd of tasks through a prefork worker against a ProviderSim with the fleet's own limits
gets no provider 429 and keeps the cap; a provider 429 (another tenant emptied the
budget) reschedules the task, which then completes: a throttle, not a failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from celery_fleet.testing import ProviderSim
from tests.integration.workers import celery_workers, new_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextlib.contextmanager
def sdk_worker(redis_url: str, sim: ProviderSim) -> Iterator[Any]:
    """A prefork worker (8 processes) running sdk_app against ``sim``; stopped by pid."""
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    name = f"sdk-{new_run()}"
    settings = {
        "FLEET_SDK_BROKER": broker,
        "FLEET_SDK_REDIS": redis_url,
        "FLEET_SDK_NS": name,
        "FLEET_SDK_QUEUE": f"fleet-{name}",
        "FLEET_SDK_SIM": sim.url,
    }
    with celery_workers(
        "tests.integration.sdk_app",
        settings,
        name=name,
        broker=broker,
        redis_urls=[redis_url],
        pool=("prefork", "8"),
    ) as (sdk_app, _):
        yield sdk_app


def test_a_herd_of_fleet_tasks_through_a_wrapped_client(redis_url: str) -> None:
    with ProviderSim(rpm=600, tpm=200_000, max_in_flight=3, latency=0.05, seed=4) as sim:
        with sdk_worker(redis_url, sim) as sdk_app:
            results = [sdk_app.summarise.delay(f"topic {i}") for i in range(30)]
            done = [r.get(timeout=120) for r in results]

        stats = sim.stats()
    assert len(done) == 30 and all(d["used"] > 0 for d in done)
    assert stats["ok"] == 60 and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] <= 3


def test_a_provider_429_reschedules_the_task_which_then_completes(redis_url: str) -> None:
    # one request per 5 s, and a bucket of one
    with ProviderSim(rpm=12, tpm=None, max_in_flight=None, burst_s=5, latency=0.0) as sim:
        with sdk_worker(redis_url, sim) as sdk_app:
            assert sdk_app.summarise.delay("warm up", steps=0).get(timeout=60)["used"] == 0
            tenant = anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=0)
            tenant.messages.create(  # another tenant takes the budget
                model="sim", max_tokens=5, messages=[{"role": "user", "content": "mine"}]
            )
            tenant.close()
            result = sdk_app.summarise.delay("late", steps=1).get(timeout=60)
            reschedules = int(sdk_app._probe.get(sdk_app.RESCHEDULES) or 0)
            sdk_app._probe.close()

        outcomes = [r.outcome for r in sim.log]
    assert outcomes == ["ok", "429", "ok"]  # the tenant's, the task's refused, its next run
    assert reschedules == 1  # Throttled rescheduled the task (the SDK did not retry in it)
    assert result["used"] > 0 and result["retries"] == 0  # a reschedule is not a retry
