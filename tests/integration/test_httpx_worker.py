"""The openai SDK over ``celery_fleet.httpx.FleetTransport`` inside real worker processes.

The task body is a plain SDK call (no slot code): the transport holds the 'model' cap
(3) across 4 prefork processes, and the provider's 429s (a TPM budget below the fleet's,
which has none) reschedule the tasks instead of failing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from celery_fleet.testing import ProviderSim
from tests.integration.test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Any]:
    with start_worker(redis_url, redis_url.rsplit("/", 1)[0] + "/10") as fleet_app:
        yield fleet_app


def test_sdk_calls_through_the_transport_hold_the_cap_and_reschedule_on_429(
    worker: Any,
) -> None:
    # 60 tokens at once, 10 a second: about two calls (~28 tokens each) pass per 5.6 s.
    with ProviderSim(rpm=None, tpm=600, burst_s=6, max_in_flight=3, latency=0.05) as sim:
        results = [worker.sdk_call.delay(sim.base_url, n) for n in range(6)]
        values = [r.get(timeout=120) for r in results]
        log = sim.log
    assert sorted(v["n"] for v in values) == list(range(6))
    assert [v["id"] for v in values] == [r.id for r in results]  # rescheduled, same ids
    assert all(v["retries"] == 0 for v in values)
    refused = [r.limit for r in log if r.outcome == "429"]
    assert refused and set(refused) == {"tokens"}  # the TPM pushback happened, never the cap
    assert max(r.in_flight + 1 for r in log if r.admitted) <= 3
