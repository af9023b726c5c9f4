"""``FleetHook`` in real ``celery worker`` processes: plain tasks calling
``litellm.completion`` share the provider's in-flight cap across two prefork workers."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from benchmarks.harness.herd import close_app, stop_processes
from celery_fleet.testing import ProviderSim

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*ReadOnly.*qualifier:UserWarning"),  # LiteLLM's
]

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
os.environ.setdefault("LITELLM_TELEMETRY", "False")
pytest.importorskip("litellm")


def test_two_prefork_workers_share_the_cap_without_a_provider_429(redis_url: str) -> None:
    run = uuid.uuid4().hex[:10]
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    with ProviderSim(rpm=600, tpm=None, max_in_flight=3, latency=0.1) as sim:
        env = {
            **os.environ,
            "FLEET_IT_BROKER": broker,
            "FLEET_IT_REDIS": redis_url,
            "FLEET_IT_NS": f"it-{run}",
            "FLEET_IT_QUEUE": f"fleet-it-{run}",
            "FLEET_IT_SIM_URL": sim.base_url,
            "PYTHONPATH": str(ROOT),
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith("FLEET_IT_")})
        sys.modules.pop("tests.integration.litellm_app", None)
        from tests.integration import litellm_app

        log = open(ROOT / f".pytest-worker-{run}.log", "w")  # noqa: SIM115
        procs = [
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "celery", "-A", "tests.integration.litellm_app"),
                    *("worker", "-P", "prefork", "-c", "4", "-n", f"it-{run}-{k}@%h"),
                    *("--without-gossip", "--without-mingle", "--without-heartbeat"),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            for k in range(2)
        ]
        try:
            results = [litellm_app.ask.delay(i) for i in range(24)]
            used = [r.get(timeout=120) for r in results]
            stats = sim.stats()
        finally:
            stop_processes(*procs)
            log.close()
            close_app(litellm_app.app)
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(match=f"*it-{run}*"))
            if keys:
                client.delete(*keys)
            client.close()
            broker_client = redis.Redis.from_url(broker)
            broker_client.delete(f"fleet-it-{run}")
            broker_client.close()
        assert all(u > 0 for u in used)
        assert stats["ok"] == 24 and sum(stats["rate_limited"].values()) == 0, stats
        assert stats["max_in_flight_observed"] <= 3, stats
    os.unlink(log.name)
