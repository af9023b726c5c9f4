"""A chaos scenario's machinery: three private redis-servers, real workers, the app module.

The fleet's Redis, the broker and the probe (where tasks record what they did, and the
result backend) are separate servers, so a scenario can break one and still read the
others. The app module (``chaos_app``) is imported afresh in this process with the
scenario's environment, to publish tasks and to read the fleet's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from celery_fleet.testing.chaos import ChaosWorkers, Probe
from celery_fleet.testing.faults import KeptRedisServer

APP_MODULE = "tests.chaos.chaos_app"


@dataclasses.dataclass
class Rig:
    """What a scenario drives: servers, workers, the app module and the probe."""

    fleet_redis: KeptRedisServer
    broker: KeptRedisServer
    probe_redis: KeptRedisServer
    workers: ChaosWorkers
    app: Any  # the chaos_app module, imported with this rig's environment
    probe: Probe
    env: dict[str, str]

    @property
    def tag(self) -> str:
        return self.env["CHAOS_NS"]

    def in_flight(self, limit: str = "cap") -> int:
        """The fleet-wide count of leases in Redis (what a leak leaves behind)."""
        return int(self.app.fleet.admission.in_flight(limit))


def load_app(env: dict[str, str]) -> Any:
    """Import ``chaos_app`` afresh with ``env`` (its settings are read at import)."""
    os.environ.update(env)
    sys.modules.pop(APP_MODULE, None)
    return importlib.import_module(APP_MODULE)


@contextlib.contextmanager
def rig(
    workers: int = 1,
    concurrency: int = 4,
    cap: int = 4,
    lease_s: float = 2.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Rig]:
    """Start the servers and ``workers`` prefork workers; stop everything on exit."""
    run = uuid.uuid4().hex[:8]
    with KeptRedisServer() as fleet_redis, KeptRedisServer() as broker, KeptRedisServer() as pr:
        env = {
            "CHAOS_BROKER": f"{broker.url}/0",
            "CHAOS_FLEET": fleet_redis.url,
            "CHAOS_PROBE": f"{pr.url}/0",
            "CHAOS_NS": f"chaos-{run}",
            "CHAOS_QUEUE": f"chaos-{run}",
            "CHAOS_CAP": str(cap),
            "CHAOS_LEASE": str(lease_s),
            **(extra_env or {}),
        }
        app = load_app(env)
        pool = ChaosWorkers(APP_MODULE, env, workers=workers, concurrency=concurrency)
        try:
            with pool:
                if not pool.wait_ready(90):
                    raise RuntimeError("chaos workers did not start:\n" + pool.log_text()[-3000:])
                yield Rig(fleet_redis, broker, pr, pool, app, app.probe, env)
        finally:
            from benchmarks.harness.herd import close_app

            close_app(app.app)
            app.probe.close()
