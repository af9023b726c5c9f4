"""A real `celery worker` whose ``fleet_redis_url`` is wrong says so, as an error, at start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from benchmarks.harness.herd import stop_processes
from celery_fleet.testing.redis_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_with_a_wrong_fleet_redis_url_logs_an_error_naming_it(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    run = uuid.uuid4().hex[:10]
    env = {
        **os.environ,
        "FLEET_IT_BROKER": redis_url.rsplit("/", 1)[0] + "/10",
        "FLEET_IT_REDIS": f"redis://:s3cret@127.0.0.1:{port}/0",
        "FLEET_IT_PROBE": redis_url,
        "FLEET_IT_NS": f"it-{run}",
        "FLEET_IT_QUEUE": f"fleet-it-{run}",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("FLEET_IT_METRICS_PORT", None)
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "tests.integration.fleet_app"),
                *("worker", "-P", "solo", "-n", f"it-{run}@%h", "-l", "INFO"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        text = ""
        while time.monotonic() < deadline and proc.poll() is None:
            text = log_path.read_text()
            if " ready." in text and f"127.0.0.1:{port}" in text:
                break
            time.sleep(0.2)
    finally:
        stop_processes(proc)
    text = log_path.read_text()
    assert " ready." in text, text[-3000:]
    errors = [line for line in text.splitlines() if "ERROR" in line and "celery-fleet" in line]
    assert errors, text[-3000:]
    assert f"redis://:***@127.0.0.1:{port}/0" in errors[0] and "fleet_redis_url" in errors[0]
    assert "s3cret" not in text
