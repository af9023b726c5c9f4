"""with_fleet in real ``celery worker`` processes: two prefork workers of 4, one cap of 3.

24 fleet tasks, each one ``ChatOpenAI`` call through ``with_fleet``, fired at once at a
:class:`ProviderSim` that allows 3 requests in flight: 8 pool processes in two workers
would send 8 at once; the fleet-wide slot keeps it at 3 and the provider answers no 429.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

pytest.importorskip("langchain_openai")

from benchmarks.harness.herd import close_app, stop_processes
from celery_fleet.testing import ProviderSim

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TASKS = 24


def test_fleet_tasks_calling_chatopenai_hold_the_cap_across_two_workers(redis_url: str) -> None:
    sim = ProviderSim(rpm=None, tpm=None, max_in_flight=3, latency=0.1, seed=3).start()
    run = uuid.uuid4().hex[:10]
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    env = {
        **os.environ,
        "FLEET_LC_BROKER": broker,
        "FLEET_LC_NS": f"lc-{run}",
        "FLEET_LC_QUEUE": f"fleet-lc-{run}",
        "FLEET_LC_SIM": sim.base_url,
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("FLEET_LC_")})
    sys.modules.pop("tests.integration.langchain_app", None)
    lc_app = importlib.import_module("tests.integration.langchain_app")
    log = open(ROOT / f".pytest-worker-lc-{run}.log", "w")  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "tests.integration.langchain_app"),
                *("worker", "-P", "prefork", "-c", "4", "-n", f"lc-{run}-{k}@%h"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for k in range(2)
    ]
    try:
        results = [lc_app.ask.delay(f"question {i}") for i in range(TASKS)]
        tokens = [r.get(timeout=120) for r in results]
        stats = sim.stats()
    finally:
        stop_processes(*procs)
        log.close()
        close_app(lc_app.app)
        sim.stop()
        client = redis.Redis.from_url(broker)
        keys = list(client.scan_iter(match=f"*lc-{run}*"))
        if keys:
            client.delete(*keys)
        client.close()
    assert all(t > 0 for t in tokens)
    assert stats["ok"] == TASKS and sum(stats["rate_limited"].values()) == 0, stats
    assert stats["max_in_flight_observed"] == 3, stats
    os.unlink(log.name)
