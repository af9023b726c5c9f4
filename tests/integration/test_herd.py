"""A small herd through real worker processes against the provider simulator.

The same 20 agents x 2 calls, fired at once at a provider that allows 4 in flight, with 8
worker slots: plain Celery draws 429s (so the scenario is a real herd), celery-fleet
finishes everything without a single provider-side 429.
"""

from __future__ import annotations

import pytest

from benchmarks.harness.herd import Herd, Scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO = Scenario(
    agents=20, steps=2, max_in_flight=4, latency=0.1, workers=1, concurrency=8, timeout_s=120
)


@pytest.fixture(scope="module")
def herd(redis_url: str):  # type: ignore[no-untyped-def]
    with Herd(SCENARIO, redis_url, db=10) as h:
        yield h


def test_plain_celery_herd_draws_429s(herd: Herd) -> None:
    run = herd.run("plain")
    assert run.provider_429 > 0


def test_fleet_herd_completes_without_provider_429s(herd: Herd) -> None:
    run = herd.run("fleet")
    assert (run.completed, run.failed) == (20, 0)
    assert run.provider_429 == 0
    assert run.requests == 20 * 2
    assert max(p[1] for p in run.timeline) <= SCENARIO.max_in_flight
