"""`celery worker -P gevent` with an async fleet task refuses to start (issue 20, defect 13).

Before, the worker started and the first task succeeded, while any task running at the
same time as another failed with "run_async() called inside a running event loop".
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from celery_fleet import ConfigError
from celery_fleet.celery.pools import check_pool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_a_gevent_worker_with_async_bodies_refuses_to_start(redis_url: str) -> None:
    pytest.importorskip("gevent")
    run = uuid.uuid4().hex[:10]
    env = {
        **os.environ,
        "FLEET_IT_BROKER": redis_url.rsplit("/", 1)[0] + "/10",
        "FLEET_IT_REDIS": redis_url,
        "FLEET_IT_NS": f"green-{run}",
        "FLEET_IT_QUEUE": f"fleet-green-{run}",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [sys.executable, "-m", "celery", "-A", "tests.integration.green_app", "worker"]
    cmd += ["-P", "gevent", "-c", "4", "-n", f"green-{run}@%h", "--without-gossip"]
    cmd += ["--without-mingle", "--without-heartbeat", "-l", "INFO"]
    try:
        done = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=45, check=False
        )
    except subprocess.TimeoutExpired as exc:  # it started and served: the defect
        pytest.fail(f"the gevent worker started: {exc.stdout!r}"[:2000])
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-2000:]
    assert "async task bodies cannot run on the 'gevent' pool" in out, out[-2000:]
    assert "tests.integration.green_app.research" in out


def test_green_pools_are_refused_and_others_pass() -> None:
    from celery import Celery

    app = Celery("green-unit", set_as_current=False)

    @app.task(shared=False)
    async def agent() -> None: ...

    @app.task(shared=False)
    def plain() -> None: ...

    class EventletLike:
        __module__ = "celery.concurrency.eventlet"
        is_green = True

    class ThreadsLike:
        is_green = False

    with pytest.raises(ConfigError, match="'eventlet' pool .*agent"):
        check_pool(app, EventletLike)
    check_pool(app, ThreadsLike)
    app.close()
