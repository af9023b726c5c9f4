"""Idempotency keys under faults (issue 20): a publish that fails, a Redis that freezes
under the ledger call, a child SIGKILLed with early ack, a ledger lost with the results kept.

Real redis-servers (a private one where it is frozen or flushed), real prefork workers.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from celery_fleet import Fleet, StoreUnavailable, fleet_task
from celery_fleet.durability.ledger import record_id_for
from celery_fleet.testing.redis_server import RedisServer, free_port
from tests.test_beat import _published

from .test_worker import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _app(broker: str, fleet_redis: str, namespace: str, queue: str) -> Celery:
    app = Celery("faults", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        fleet_redis_url=fleet_redis,
        fleet_namespace=namespace,
        fleet_limits={},
        broker_connection_timeout=2,
    )
    return app


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:
    name = f"faults-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name)
    client.close()


def _keyed(app: Celery, tag: str) -> Any:
    @fleet_task(app=app, shared=False, name=f"faults.summarize.{tag}",
                idempotency_key="summarize:" + tag + ":{doc_id}")  # fmt: skip
    def summarize(doc_id: int) -> None: ...

    return summarize


def test_a_publish_the_broker_refuses_frees_its_key(
    redis_url: str, namespace: str, queue: str
) -> None:
    """Defect 1: delay() raises (nothing listens on the broker's port); the key must not
    stay queued: a later publish, with the broker back, publishes."""
    tag = uuid.uuid4().hex[:8]
    down = _app(f"redis://127.0.0.1:{free_port()}/0", redis_url, namespace, queue)
    up = _app(redis_url, redis_url, namespace, queue)
    refused, accepted = _keyed(down, tag), _keyed(up, tag)
    with pytest.raises(OperationalError):  # the broker's error (kombu), not StoreUnavailable
        refused.delay(1)
    record = Fleet.for_app(up).key_record(f"summarize:{tag}:1")
    assert record["state"] == "failed" and record["released"] == "1", record
    assert "publish_failed" in [e["event"] for e in Fleet.for_app(up).history(f"summarize:{tag}:1")]
    again = accepted.delay(1)
    assert [m["id"] for m in _published(up, redis_url)] == [again.id]
    assert accepted.delay(1).id == again.id  # and now it dedupes again
    assert len(_published(up, redis_url)) == 1


def test_a_retry_whose_copy_cannot_be_published_frees_its_key(
    redis_url: str, namespace: str, queue: str
) -> None:
    """Defect 1, the same run's way: an attempt gives its claim back (``queued``) before
    ``retry()`` publishes the copy; when the broker refuses the copy, the key must not stay
    queued with no message behind it."""
    tag = uuid.uuid4().hex[:8]
    down = _app(f"redis://127.0.0.1:{free_port()}/0", redis_url, namespace, queue)
    task, fleet, key = _keyed(down, tag), Fleet.for_app(down), f"summarize:{tag}:1"
    record_id = record_id_for(key)
    run = fleet.ledger.enqueue(record_id, key, task.name)
    fleet.ledger.claim(record_id, key, task.name, f"{run.run_id}/a", 10, False, run.run_id)
    assert fleet.ledger.finish(record_id, f"{run.run_id}/a", "queued")  # as retry() does
    with pytest.raises(OperationalError):  # what Task.retry's apply_async raises
        task.apply_async((1,), task_id=run.run_id, retries=1, headers={"fleet_key": key})
    record = fleet.key_record(key)
    assert (record["state"], record["released"]) == ("failed", "1"), record
    assert fleet.ledger.enqueue(record_id, key, task.name).new


def test_a_ledger_call_that_runs_after_a_frozen_redis_thaws_frees_the_key(
    redis_url: str, queue: str
) -> None:
    """Defect 1: the fleet's Redis is SIGSTOPped during the publish's ledger call; the
    caller gets StoreUnavailable (nothing published), the script runs when Redis thaws.
    The key it marked queued must be free again once the publish lease lapses."""
    tag = uuid.uuid4().hex[:8]
    with RedisServer() as server:
        app = _app(redis_url, server.url, "frozen", queue)
        task = _keyed(app, tag)
        fleet = Fleet.for_app(app)
        fleet.ledger.publish_lease_s = 3.0
        task.delay(0)  # connected, scripts loaded
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                task.delay(1)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        key = f"summarize:{tag}:1"
        deadline = time.monotonic() + 15
        while fleet.key_record(key).get("state") != "queued" and time.monotonic() < deadline:
            time.sleep(0.05)
        record = fleet.key_record(key)
        assert record.get("state") == "queued" and int(record["publish_until"]) > 0, record
        assert [m["fleet_key"] for m in _published(app, redis_url)] == [f"summarize:{tag}:0"]
        time.sleep(3.5)  # the unconfirmed publish lease lapses
        again = task.delay(1)
        assert [m["id"] for m in _published(app, redis_url)][-1] == again.id
        assert fleet.key_record(key)["publish_until"] == "0"


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Any]:
    with start_worker(redis_url, redis_url.rsplit("/", 1)[0] + "/10") as fleet_app:
        yield fleet_app


def test_a_keyed_task_whose_child_is_sigkilled_with_early_ack_can_run_again(
    worker: Any,
) -> None:
    """Defect 2: the child dies mid-body and its message was acked (Celery's default): the
    worker's main process records the claim as failed (released), so a new publish runs."""
    tag = uuid.uuid4().hex[:6]
    lost = worker.keyed_lost.delay(tag)
    lost.get(timeout=120, propagate=False)
    assert lost.state == "FAILURE" and "WorkerLostError" in repr(lost.result)
    key = f"lost:{tag}"
    deadline = time.monotonic() + 20
    while worker.fleet.key_record(key)["state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    record = worker.fleet.key_record(key)
    assert record["state"] == "failed" and record["released"] == "1", record
    assert "WorkerLostError" in record["error"]
    assert "worker_lost" in [e["event"] for e in worker.fleet.history(key)]
    again = worker.keyed_lost.delay(tag)
    assert again.id != lost.id
    assert again.get(timeout=120) == 2


def test_a_key_run_again_after_its_ledger_is_lost_does_not_inherit_the_old_result(
    redis_url: str,
) -> None:
    """Defect 3: the fleet's Redis is flushed (an empty restart) while the result backend
    keeps the first run's SUCCESS. The re-publish must get a new task id: with the old one
    its AsyncResult read the stale result, and when its child was SIGKILLed Celery acked it
    as "succeeded before the worker was lost", so the work was never done."""
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    with RedisServer() as server, start_worker(server.url, broker, redis_url) as app:
        tag = uuid.uuid4().hex[:6]
        first = app.keyed_rerun.delay(tag)
        assert first.get(timeout=120) == 1
        redis.Redis.from_url(server.url).flushall()  # the ledger is lost, the results kept
        again = app.keyed_rerun.delay(tag)
        assert again.id != first.id
        # run 2 is SIGKILLed and redelivered, run 3 completes: not the stale 1
        assert again.get(timeout=120) == 3
        assert first.get(timeout=10) == 1
