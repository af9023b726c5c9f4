"""``FleetHook`` in real ``celery worker`` processes: plain tasks calling
``litellm.completion`` share the provider's in-flight cap across two prefork workers, and
a fleet task whose body gets a provider 429 from LiteLLM is rescheduled, not failed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

import openai
import pytest

from celery_fleet.testing import ProviderSim
from tests.integration.workers import celery_workers, new_run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*ReadOnly.*qualifier:UserWarning"),  # LiteLLM's
]

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
os.environ.setdefault("LITELLM_TELEMETRY", "False")
pytest.importorskip("litellm")


@contextlib.contextmanager
def litellm_workers(redis_url: str, sim: ProviderSim, workers: int) -> Iterator[ModuleType]:
    """``workers`` prefork workers (4 processes each) running litellm_app against ``sim``."""
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    name = f"it-{new_run()}"
    settings = {
        "FLEET_IT_BROKER": broker,
        "FLEET_IT_REDIS": redis_url,
        "FLEET_IT_NS": name,
        "FLEET_IT_QUEUE": f"fleet-{name}",
        "FLEET_IT_SIM_URL": sim.base_url,
    }
    with celery_workers(
        "tests.integration.litellm_app",
        settings,
        name=name,
        broker=broker,
        redis_urls=[redis_url],
        workers=workers,
    ) as (litellm_app, _):
        yield litellm_app


def test_two_prefork_workers_share_the_cap_without_a_provider_429(redis_url: str) -> None:
    with ProviderSim(rpm=600, tpm=None, max_in_flight=3, latency=0.1) as sim:
        with litellm_workers(redis_url, sim, workers=2) as litellm_app:
            results = [litellm_app.ask.delay(i) for i in range(24)]
            used = [r.get(timeout=120) for r in results]
        stats = sim.stats()
    assert all(u > 0 for u in used)
    assert stats["ok"] == 24 and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] <= 3, stats


@pytest.mark.parametrize("task", ["ask_in_fleet_task", "aask_in_fleet_task"])
def test_a_provider_429_in_a_fleet_task_reschedules_it(redis_url: str, task: str) -> None:
    # one request per 5 s, and a bucket of one: the fleet's own limit (600 rpm) lets the
    # call through, the provider refuses it
    with ProviderSim(rpm=12, tpm=None, max_in_flight=None, burst_s=5, latency=0.0) as sim:
        with litellm_workers(redis_url, sim, workers=1) as litellm_app:
            warm = getattr(litellm_app, task).delay(0).get(timeout=120)  # the worker is up
            tenant = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
            sim.reset_stats(refill=True)
            tenant.chat.completions.create(  # another tenant takes the budget
                model="sim", max_tokens=5, messages=[{"role": "user", "content": "mine"}]
            )
            tenant.close()
            # without the fix: litellm.RateLimitError fails the task and get() raises it
            used = getattr(litellm_app, task).delay(1).get(timeout=60)
        outcomes = [r.outcome for r in sim.log]
    assert warm > 0 and used > 0
    assert outcomes == ["ok", "429", "ok"]  # the tenant's, the task's refused, its next run
