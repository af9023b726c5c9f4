"""The README's "Run it yourself": the simulator CLI, an example worker, an agent sent and
answered, run as the README shows (on a free port, a queue and namespace of this run)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from benchmarks.harness.herd import stop_processes
from celery_fleet.testing.redis_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SEND = (
    "from example_project.tasks import research_agent; "
    "print(research_agent.delay('token buckets', steps=2).get(timeout=120))"
)


def test_run_it_yourself(redis_url: str) -> None:
    run = uuid.uuid4().hex[:8]
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url.rsplit("/", 1)[0],
        "EXAMPLE_QUEUE": f"readme-{run}",
        "EXAMPLE_NAMESPACE": f"readme-{run}",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
        "OPENAI_API_KEY": "sim",
        "EXAMPLE_MODEL": "sim-model",
        "PYTHONPATH": str(ROOT),
    }
    provider = subprocess.Popen(
        [sys.executable, "-m", "celery_fleet.testing.provider", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "example_project.app",
            "worker",
            "-l",
            "INFO",
            "-c",
            "2",
            "-n",
            f"readme-{run}@%h",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert provider.stdout is not None
        assert provider.stdout.readline().startswith(b"listening http://127.0.0.1:")
        answer = subprocess.run(
            [sys.executable, "-c", SEND],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert answer.returncode == 0, answer.stderr[-2000:]
        assert "'goal': 'token buckets', 'steps': 2" in answer.stdout
    finally:
        stop_processes(worker, provider)
        if provider.stdout is not None:
            provider.stdout.close()
        client = redis.Redis.from_url(f"{env['REDIS_URL']}/11")
        keys = list(client.scan_iter(match=f"*readme-{run}*"))
        if keys:
            client.delete(*keys)
        client.close()
