"""fleet.wrap in real `celery worker` processes: an anthropic client in fleet tasks.

A herd of tasks through a prefork worker against a ProviderSim with the fleet's own limits
gets no provider 429 and keeps the cap; a provider 429 (another tenant emptied the
budget) reschedules the task, which then completes: a throttle, not a failure.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import redis

from benchmarks.harness.herd import close_app, stop_processes
from celery_fleet.testing import ProviderSim

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def sdk_worker(redis_url: str, sim: ProviderSim) -> Iterator[Any]:
    """A prefork worker (8 processes) running sdk_app against ``sim``; stopped by pid."""
    run = uuid.uuid4().hex[:10]
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    env = {
        **os.environ,
        "FLEET_SDK_BROKER": broker,
        "FLEET_SDK_REDIS": redis_url,
        "FLEET_SDK_NS": f"sdk-{run}",
        "FLEET_SDK_QUEUE": f"fleet-sdk-{run}",
        "FLEET_SDK_SIM": sim.url,
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update({k: env[k] for k in env if k.startswith("FLEET_SDK_")})
    sys.modules.pop("tests.integration.sdk_app", None)
    sdk_app = importlib.import_module("tests.integration.sdk_app")
    log = open(ROOT / f".pytest-worker-{run}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "tests.integration.sdk_app"),
            *("worker", "-P", "prefork", "-c", "8", "-n", f"sdk-{run}@%h"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield sdk_app
    finally:
        stop_processes(proc)
        log.close()
        close_app(sdk_app.app)
        sdk_app._probe.close()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"*sdk-{run}*"))
        if keys:
            client.delete(*keys)
        client.close()
        broker_client = redis.Redis.from_url(broker)
        broker_client.delete(f"fleet-sdk-{run}")
        broker_client.close()
        if proc.returncode in (0, -15, -9):
            os.unlink(log.name)


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
