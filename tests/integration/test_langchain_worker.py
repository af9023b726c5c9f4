"""with_fleet in real ``celery worker`` processes: two prefork workers of 4, one cap of 3.

24 fleet tasks, each one ``ChatOpenAI`` call through ``with_fleet``, fired at once at a
:class:`ProviderSim` that allows 3 requests in flight: 8 pool processes in two workers
would send 8 at once; the fleet-wide slot keeps it at 3 and the provider answers no 429.
"""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_openai")

from celery_fleet.testing import ProviderSim
from tests.integration.workers import celery_workers, new_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TASKS = 24


def test_fleet_tasks_calling_chatopenai_hold_the_cap_across_two_workers(redis_url: str) -> None:
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    name = f"lc-{new_run()}"
    with ProviderSim(rpm=None, tpm=None, max_in_flight=3, latency=0.1, seed=3) as sim:
        settings = {
            "FLEET_LC_BROKER": broker,
            "FLEET_LC_NS": name,
            "FLEET_LC_QUEUE": f"fleet-{name}",
            "FLEET_LC_SIM": sim.base_url,
        }
        with celery_workers(
            "tests.integration.langchain_app", settings, name=name, broker=broker, workers=2
        ) as (lc_app, _):
            results = [lc_app.ask.delay(f"question {i}") for i in range(TASKS)]
            tokens = [r.get(timeout=120) for r in results]
        stats = sim.stats()
    assert all(t > 0 for t in tokens)
    assert stats["ok"] == TASKS and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] == 3, stats
