"""The front page's Quick start and the example project's "Run it yourself", run as written.

The Quick start is read from README.md itself: its ``proj.py`` block is saved as a file, its
shell lines are run as they stand (the worker in the background), and what they print is
compared with the README's output block. Only the Redis address changes: the README's
127.0.0.1:6379 becomes a private redis-server of this test, so the broker queue, results and
fleet keys are nobody else's. The example project runs the commands of docs/example.md on a
free port, with a queue and namespace of this run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from celery_fleet.testing.redis_server import RedisServer, free_port, stop_process
from tests.markdown import README, ROOT, blocks, commands, section

pytestmark = [pytest.mark.integration, pytest.mark.slow]
README_REDIS = "redis://127.0.0.1:6379"
SEND = (
    "from example_project.tasks import research_agent; "
    "print(research_agent.delay('token buckets', steps=2).get(timeout=120))"
)


def _argv(line: str) -> list[str]:
    """A README shell line as argv, with this test's interpreter for ``python``/``celery``."""
    argv = shlex.split(line)
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "celery":
        return [sys.executable, "-m", "celery", *argv[1:]]
    raise AssertionError(f"the Quick start runs only python and celery, not {line!r}")


def _shape(text: str) -> list[str]:
    """Output lines with numbers blanked: the budget left moves, the layout must not."""
    return [re.sub(r"\d+", "#", line.rstrip()) for line in text.strip().splitlines()]


def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    quick = section(README.read_text("utf-8"), "Quick start")
    (code,) = blocks(quick, "python")
    assert code.text.startswith("# proj.py\n")
    assert README_REDIS in code.text
    shell = [line for block in blocks(quick, "bash") for line in commands(block)]
    (worker_line,) = [line for line in shell if " worker" in line]
    steps = [line for line in shell if line != worker_line]
    (expected,) = blocks(quick, "text")

    with RedisServer() as server:
        (tmp_path / "proj.py").write_text(code.text.replace(README_REDIS, server.url))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
        printed = []
        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                _argv(worker_line), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                for line in steps:
                    done = subprocess.run(
                        _argv(line),
                        cwd=tmp_path,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=90,
                    )
                    assert done.returncode == 0, (line, done.stderr[-2000:])
                    printed.append(done.stdout)
            finally:
                stop_process(worker, grace_s=30)
        worker_log = (tmp_path / "worker.log").read_text(errors="replace")
    assert _shape("".join(printed)) == _shape(expected.text), worker_log[-3000:]
    assert "succeeded" in worker_log


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
        stop_process(worker, grace_s=30)
        stop_process(provider)
        if provider.stdout is not None:
            provider.stdout.close()
        client = redis.Redis.from_url(f"{env['REDIS_URL']}/11")
        keys = list(client.scan_iter(match=f"*readme-{run}*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_the_example_page_shows_the_commands_run_here() -> None:
    """docs/example.md's agent is the one sent above, so the page runs as this test does."""
    page = (ROOT / "docs" / "example.md").read_text("utf-8")
    shown = " ".join(commands(blocks(page, "bash")[0]))
    assert "celery -A example_project.app worker -l INFO" in shown
    assert SEND in shown
