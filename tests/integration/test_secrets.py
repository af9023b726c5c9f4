"""A password in fleet_redis_url stays out of `celery inspect conf` and `celery report`,
while a real prefork worker still connects with it (issue 20, defect 11)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from celery_fleet.testing.redis_server import RedisServer

from .test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SECRET = "fleet-s3cr3t-pw"


def test_a_worker_connects_with_the_password_and_never_prints_it(redis_url: str) -> None:
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    with RedisServer(password=SECRET) as fleet_redis:
        fleet_url = f"{fleet_redis.url}/0"
        with start_worker(fleet_url, broker, pool=("prefork", "2")) as it:
            # a pool child ran a slot on the password-protected Redis
            assert it.guarded.delay(0.05).get(timeout=120) == 1
            name = f"{it.NAMESPACE}-0@{socket.gethostname()}"
            replies = it.app.control.inspect(destination=[name], timeout=10).conf()
            assert replies and name in replies, replies
            conf = replies[name]
            shown = json.dumps(conf)
            assert SECRET not in shown
            assert conf["fleet_redis_url"] == f"redis://127.0.0.1:{fleet_redis.port}/0"
            assert conf["fleet_redis_password"] == "********"
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            report = subprocess.run(
                [sys.executable, "-m", "celery", "-A", "tests.integration.fleet_app", "report"],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert report.returncode == 0, report.stderr
            assert "fleet_redis_url" in report.stdout and SECRET not in report.stdout
            assert SECRET not in report.stderr
