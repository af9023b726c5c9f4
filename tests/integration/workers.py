"""Real ``celery worker`` processes for the integration tests: started, stopped, cleaned up.

Each integration app (``fleet_app``, ``langchain_app``, ``litellm_app``, ``sdk_app``) is
configured from environment variables the test sets; :func:`celery_workers` sets them,
imports the app afresh in the test process (to send its tasks), starts the workers with
this checkout on their ``PYTHONPATH``, and afterwards stops them by pid, drops the run's
keys and queue, and keeps the worker log only when a worker died badly.

Example::

    name = f"sdk-{new_run()}"
    settings = {"FLEET_SDK_NS": name, "FLEET_SDK_QUEUE": f"fleet-{name}", ...}
    with celery_workers("tests.integration.sdk_app", settings, name=name, broker=broker,
                        redis_urls=[redis_url]) as (sdk_app, procs):
        sdk_app.summarise.delay("topic").get(timeout=60)
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

import redis

from benchmarks.harness.herd import close_app, stop_processes

ROOT = Path(__file__).resolve().parents[2]


def new_run() -> str:
    """A run id, for the name of a run's namespace, queue and workers (see
    :func:`celery_workers`): concurrent runs share nothing."""
    return uuid.uuid4().hex[:10]


@contextlib.contextmanager
def celery_workers(
    module: str,
    settings: Mapping[str, str],
    *,
    name: str,
    broker: str,
    redis_urls: Iterable[str] = (),
    workers: int = 1,
    pool: tuple[str, str] = ("prefork", "4"),
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[tuple[ModuleType, list[subprocess.Popen[bytes]]]]:
    """``workers`` workers (``pool``: ``-P`` and ``-c``) running the app ``module``, named
    ``{name}-{k}@host``.

    ``settings`` (the app's environment variables) go into this process's environment too,
    so the app imported here (yielded, with the worker processes) sends to the same queue;
    ``extra_env`` goes to the workers only, under ``settings``. On exit: the workers are
    stopped by pid and the keys holding ``name`` (the run's namespace and queue, when
    named after it) dropped from ``broker`` and each of ``redis_urls``; the log
    (``.pytest-worker-{name}.log``) is kept when a worker died badly.
    """
    env = {**os.environ, **(extra_env or {}), **settings, "PYTHONPATH": str(ROOT)}
    os.environ.update(settings)
    # Imported afresh with this environment: `from tests.integration import fleet_app` would
    # return the module a previous test imported, sending tasks to its queue.
    sys.modules.pop(module, None)
    app_module = importlib.import_module(module)
    log = open(ROOT / f".pytest-worker-{name}.log", "w")  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", module),
                *("worker", "-P", pool[0], "-c", pool[1], "-n", f"{name}-{k}@%h"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for k in range(workers)
    ]
    try:
        yield app_module, procs
    finally:
        stop_processes(*procs)
        log.close()
        close_app(app_module.app)
        probe = getattr(app_module, "_probe", None)
        if probe is not None:
            probe.close()
        for url in set(redis_urls) | {broker}:
            _drop_keys(url, f"*{name}*")
        if all(p.returncode in (0, -signal.SIGTERM, -signal.SIGKILL) for p in procs):
            os.unlink(log.name)


def _drop_keys(url: str, pattern: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=pattern))
        if keys:
            client.delete(*keys)
    except redis.ConnectionError:  # a test's own server, already stopped
        pass
    finally:
        client.close()
