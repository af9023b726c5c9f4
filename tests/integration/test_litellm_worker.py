"""``FleetHook`` in real ``celery worker`` processes: plain tasks calling
``litellm.completion`` share the provider's in-flight cap across two prefork workers."""

from __future__ import annotations

import os

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


def test_two_prefork_workers_share_the_cap_without_a_provider_429(redis_url: str) -> None:
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    name = f"it-{new_run()}"
    with ProviderSim(rpm=600, tpm=None, max_in_flight=3, latency=0.1) as sim:
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
            workers=2,
        ) as (litellm_app, _):
            results = [litellm_app.ask.delay(i) for i in range(24)]
            used = [r.get(timeout=120) for r in results]
        stats = sim.stats()
    assert all(u > 0 for u in used)
    assert stats["ok"] == 24 and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] <= 3, stats
