"""The idempotency ledger on real Redis: its scripts, and what a publish does with a key.

Execution-side behaviour in real workers (redelivery after SIGKILL, retries, children,
1,000 publishes from 4 processes) is in ``tests/integration/test_worker.py``.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_fleet import ConfigError, Fleet, fleet_task
from celery_fleet.celery.idempotency import Attempt
from celery_fleet.durability.ledger import Ledger, record_id_for
from celery_fleet.testing.redis_server import RedisServer

from .test_beat import _published

MakeFleet = Callable[..., Fleet]


@pytest.fixture
def ledger(make_fleet: MakeFleet) -> Ledger:
    return make_fleet({}).ledger


def test_a_key_runs_once_then_replays(ledger: Ledger) -> None:
    run = record_id_for(f"doc-{uuid.uuid4().hex}")
    started = ledger.enqueue(run, "k", "t")
    assert started.new and started.state == "queued"
    again = ledger.enqueue(run, "k", "t")  # a duplicate publish: names the live run
    assert not again.new and again.run_id == started.run_id
    first = ledger.claim(run, "k", "t", "a", 10, singleton=False)
    assert first.verdict == "run" and first.attempts == 1 and not first.taken_over
    busy = ledger.claim(run, "k", "t", "b", 10, singleton=False)
    assert busy.verdict == "busy" and 9000 < busy.wait_ms <= 10_000
    assert ledger.finish(run, "b", "succeeded", "1") is False  # not b's claim: fenced
    assert ledger.finish(run, "a", "succeeded", '{"answer": 42}') is True
    done = ledger.claim(run, "k", "t", "c", 10, singleton=False)
    assert done.verdict == "done" and done.result == {"answer": 42}
    events = [e["event"] for e in ledger.history(run)]
    assert events == ["queued", "running", "succeeded"]
    assert ledger.record(run)["attempts"] == "1"


def test_a_lapsed_claim_is_taken_over_and_the_old_owner_is_fenced(ledger: Ledger) -> None:
    run = record_id_for(uuid.uuid4().hex)
    assert ledger.claim(run, "k", "t", "dead", 0.2, singleton=False).verdict == "run"
    time.sleep(0.25)  # its worker died: nobody renews
    took = ledger.claim(run, "k", "t", "alive", 10, singleton=False)
    assert took.verdict == "run" and took.attempts == 2 and took.taken_over
    assert ledger.renew([(run, "dead"), (run, "alive")], 10) == [False, True]
    assert ledger.finish(run, "dead", "succeeded", "1") is False
    assert ledger.finish(run, "alive", "succeeded", "2") is True
    assert [e["event"] for e in ledger.history(run)] == ["running", "taken_over", "succeeded"]


def test_an_unconfirmed_publish_frees_its_key_when_its_lease_lapses(ledger: Ledger) -> None:
    """A publisher that died or gave up (Redis froze under the call) never confirms: the
    key is free again after the publish lease, under a new run id. A confirmed one stays."""
    ledger.publish_lease_s = 0.3
    lapses, confirmed = record_id_for(uuid.uuid4().hex), record_id_for(uuid.uuid4().hex)
    first = ledger.enqueue(lapses, "k", "t")
    sent = ledger.enqueue(confirmed, "k2", "t")
    assert ledger.published(confirmed, sent.run_id, sent=True)
    assert not ledger.enqueue(lapses, "k", "t").new  # its publish may still be under way
    time.sleep(0.4)
    again = ledger.enqueue(lapses, "k", "t")
    assert again.new and again.run_id != first.run_id
    assert not ledger.published(lapses, first.run_id, sent=True)  # the old token is fenced
    assert not ledger.enqueue(confirmed, "k2", "t").new  # a confirmed message is queued


def test_a_failed_publish_is_undone_by_its_own_token_only(ledger: Ledger) -> None:
    run = record_id_for(uuid.uuid4().hex)
    started = ledger.enqueue(run, "k", "t")
    assert not ledger.published(run, "another-publish", sent=False)
    assert ledger.enqueue(run, "k", "t").new is False
    assert ledger.published(run, started.run_id, sent=False, error="OperationalError: down")
    record = ledger.record(run)
    assert (record["state"], record["released"]) == ("failed", "1")
    assert "OperationalError" in record["error"]
    assert ledger.enqueue(run, "k", "t").new
    # a worker that claimed before the publisher heard back: its undo changes nothing
    claimed = record_id_for(uuid.uuid4().hex)
    publish = ledger.enqueue(claimed, "k", "t")
    assert ledger.claim(claimed, "k", "t", f"{publish.run_id}/a", 10, False).verdict == "run"
    assert not ledger.published(claimed, publish.run_id, sent=False)
    assert ledger.record(claimed)["state"] == "running"


def test_a_lapsed_claim_does_not_block_a_new_publish(ledger: Ledger) -> None:
    run = record_id_for(uuid.uuid4().hex)
    first = ledger.enqueue(run, "k", "t")
    assert ledger.claim(run, "k", "t", "dead", 0.2, singleton=False).verdict == "run"
    assert not ledger.enqueue(run, "k", "t").new  # a live claim: running
    time.sleep(0.3)  # its worker died (early ack: no message left to redeliver)
    again = ledger.enqueue(run, "k", "t")
    assert again.new and again.run_id != first.run_id
    assert ledger.finish(run, "dead", "succeeded", "1") is False  # the dead attempt is fenced
    assert ledger.history(run)[-1]["lapsed"] == "running"


def test_a_lost_worker_ends_the_claim_of_its_task_only(ledger: Ledger) -> None:
    run = record_id_for(uuid.uuid4().hex)
    started = ledger.enqueue(run, "k", "t")
    owner = f"{started.run_id}/abc"
    assert ledger.claim(run, "k", "t", owner, 30, singleton=False).verdict == "run"
    assert not ledger.lost(run, "some-other-task", True, "WorkerLostError")
    assert not ledger.enqueue(run, "k", "t").new
    assert ledger.lost(run, started.run_id, True, "WorkerLostError('SIGKILL')")
    record = ledger.record(run)
    assert (record["state"], record["released"], record["owner"]) == ("failed", "1", "")
    assert ledger.finish(run, owner, "succeeded", "1") is False
    assert ledger.enqueue(run, "k", "t").new
    kept = record_id_for(uuid.uuid4().hex)
    ledger.claim(kept, "k", "t", "tid/x", 30, singleton=False)
    assert ledger.lost(kept, "tid", False, "WorkerLostError")
    assert not ledger.enqueue(kept, "k", "t").new  # release_on_failure=False: kept


def test_each_run_has_its_own_id_in_each_namespace(make_fleet: MakeFleet, namespace: str) -> None:
    """A key's run id is new per run: not shared across namespaces, nor with the run before
    its record was lost, so a result backend's old SUCCESS is never the new run's."""
    one, two = make_fleet({}).ledger, make_fleet({}, namespace=f"{namespace}-b").ledger
    run = record_id_for("summarize:1")
    a, b = one.enqueue(run, "summarize:1", "t"), two.enqueue(run, "summarize:1", "t")
    assert a.new and b.new and a.run_id != b.run_id
    one.store.call("DEL", *one.keys(run))  # the ledger is lost (an empty restart)
    again = one.enqueue(run, "summarize:1", "t")
    assert again.new and again.run_id not in (a.run_id, b.run_id, run)
    # a message still in flight when the record was lost names its run when it claims
    lost = record_id_for("summarize:2")
    one.claim(lost, "summarize:2", "t", "old-id/x", 30, singleton=False)
    assert one.enqueue(lost, "summarize:2", "t").run_id == "old-id"


def test_release_on_failure_frees_the_key_and_keep_does_not(ledger: Ledger) -> None:
    freed, kept = record_id_for(uuid.uuid4().hex), record_id_for(uuid.uuid4().hex)
    for run, outcome in ((freed, "released"), (kept, "failed")):
        ledger.enqueue(run, "k", "t")
        ledger.claim(run, "k", "t", "a", 10, singleton=False)
        ledger.finish(run, "a", outcome, "ValueError: no")
    assert ledger.enqueue(freed, "k", "t").new
    assert ledger.claim(freed, "k", "t", "b", 10, singleton=False).verdict == "run"
    assert not ledger.enqueue(kept, "k", "t").new
    verdict = ledger.claim(kept, "k", "t", "b", 10, singleton=False)
    assert verdict.verdict == "failed" and "ValueError" in verdict.error


def test_a_retry_requeues_the_same_run(ledger: Ledger) -> None:
    run = record_id_for(uuid.uuid4().hex)
    ledger.claim(run, "k", "t", "a", 10, singleton=False)
    assert ledger.finish(run, "a", "queued") is True
    again = ledger.claim(run, "k", "t", "b", 10, singleton=False)
    assert again.verdict == "run" and again.attempts == 2


def test_singleton_runs_one_at_a_time_and_again_after(ledger: Ledger) -> None:
    run = record_id_for(uuid.uuid4().hex)
    assert ledger.claim(run, "k", "t", "a", 10, singleton=True).verdict == "run"
    assert ledger.claim(run, "k", "t", "b", 10, singleton=True).verdict == "busy"
    ledger.finish(run, "a", "succeeded", "1")
    assert ledger.claim(run, "k", "t", "b", 10, singleton=True).verdict == "run"


def test_concurrent_claims_admit_exactly_one(make_fleet: MakeFleet) -> None:
    """Random interleavings: of N threads claiming one key, exactly one runs at a time."""
    fleet = make_fleet({})
    rng = random.Random(3)
    for _ in range(20):
        run = record_id_for(uuid.uuid4().hex)
        verdicts: list[str] = []
        barrier = threading.Barrier(8)

        def claim(owner: str, run: str, barrier: threading.Barrier, out: list[str]) -> None:
            barrier.wait()
            time.sleep(rng.random() / 1000)
            out.append(fleet.ledger.claim(run, "k", "t", owner, 5, False).verdict)

        threads = [
            threading.Thread(target=claim, args=(f"o{i}", run, barrier, verdicts)) for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(verdicts) == ["busy"] * 7 + ["run"], verdicts


# -- publish ------------------------------------------------------------------------------


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[Celery]:
    queue = f"ledger-test-{uuid.uuid4().hex[:8]}"
    celery = Celery("ledger_test", broker=redis_url, set_as_current=False)
    celery.conf.update(task_default_queue=queue, fleet_redis_url=redis_url,
                       fleet_namespace=namespace, fleet_limits={})  # fmt: skip
    yield celery
    client = redis.Redis.from_url(redis_url)
    client.delete(queue)
    client.close()


def test_a_duplicate_publish_publishes_nothing(app: Celery, redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]

    @fleet_task(app=app, shared=False, idempotency_key="summarize:" + tag + ":{doc_id}")
    def summarize(doc_id: int, style: str = "short") -> None: ...

    first = summarize.delay(1)
    again = summarize.apply_async((1,), {"style": "short"})
    other = summarize.delay(2)
    record = Fleet.for_app(app).key_record(f"summarize:{tag}:1")
    assert first.id == again.id == record["run_id"] != other.id
    assert record["publish_until"] == "0"  # the broker took it: confirmed
    messages = _published(app, redis_url)
    assert [m["id"] for m in messages] == [first.id, other.id]
    assert messages[0]["fleet_key"] == f"summarize:{tag}:1"
    # per call, and a retry of the same run (retries given) publishes under the same id
    per_call = summarize.apply_async((3,), idempotency_key=f"custom-{tag}")
    assert per_call.id == Fleet.for_app(app).key_record(f"custom-{tag}")["run_id"]
    summarize.apply_async((1,), task_id=first.id, retries=1)
    assert [m["id"] for m in _published(app, redis_url)][-2:] == [per_call.id, first.id]


@pytest.mark.parametrize(
    "spec, error",
    [
        ("doc:{nope}", "not an argument"),
        (lambda doc_id: 42, "must return a str"),
        (lambda doc_id: 1 / 0, "raised ZeroDivisionError"),
        (lambda doc_id: "", "non-empty"),
        (lambda doc_id: "x" * 501, "at most 500"),
    ],
)
def test_a_bad_key_is_refused_at_publish_and_nothing_is_published(
    app: Celery, redis_url: str, spec: Any, error: str
) -> None:
    @fleet_task(app=app, shared=False, idempotency_key=spec)
    def summarize(doc_id: int) -> None: ...

    with pytest.raises(ConfigError, match=error):
        summarize.delay(1)
    assert _published(app, redis_url) == []


@pytest.mark.parametrize(
    "options",
    [
        {"idempotency_key": 42},
        {"idempotency_key": "{0}"},
        {"idempotency_key": "{"},
        {"singleton": True},
        {"idempotency_key": "k:{x}", "singleton": "yes"},
        {"idempotency_key": "k:{x}", "release_on_failure": 1},
    ],
)
def test_bad_options_fail_at_decoration(app: Celery, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        fleet_task(app=app, shared=False, **options)(lambda x: None)


def test_a_final_failure_releases_the_key_for_a_new_submission(app: Celery, redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    calls: list[int] = []

    @fleet_task(app=app, shared=False, idempotency_key="fails:" + tag + ":{n}")
    def fails(n: int) -> None:
        calls.append(n)
        raise ValueError("bad input")

    @fleet_task(app=app, shared=False, idempotency_key="kept:" + tag + ":{n}",
                release_on_failure=False)  # fmt: skip
    def kept(n: int) -> None:
        calls.append(n)
        raise ValueError("bad input")

    fleet = Fleet.for_app(app)
    assert fails.apply((1,)).failed() and kept.apply((2,)).failed()
    freed, held = fleet.key_record(f"fails:{tag}:1"), fleet.key_record(f"kept:{tag}:2")
    assert freed["state"] == held["state"] == "failed" and "ValueError" in freed["error"]
    assert (freed["released"], held["released"]) == ("1", "0")
    fails.delay(1)  # released: published again
    kept.delay(2)  # kept: a duplicate, not published
    assert [m["fleet_key"] for m in _published(app, redis_url)] == [f"fails:{tag}:1"]
    from celery.exceptions import Ignore

    again = kept.apply((2,))  # a redelivery of the kept key: ignored, the body never reruns
    assert isinstance(again.result, Ignore) and "failed before" in str(again.result)
    assert calls == [1, 2]


def test_the_running_key_reaches_log_records() -> None:
    import logging

    from celery_fleet.celery.idempotency import KeyLogFilter, current_key

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    KeyLogFilter().filter(record)
    assert record.fleet_key == record.key == "-"
    token = current_key.set("summarize:42")
    try:
        KeyLogFilter().filter(record)
    finally:
        current_key.reset(token)
    assert record.fleet_key == record.key == "summarize:42"


def test_an_attempt_that_claims_its_key_tells_monitors(app: Celery) -> None:
    tag = uuid.uuid4().hex[:8]
    events: list[tuple[str, dict[str, Any]]] = []

    @fleet_task(app=app, shared=False, idempotency_key="seen:" + tag + ":{n}")
    def seen(n: int) -> int:
        return n

    seen.send_event = lambda type_, **fields: events.append((type_, fields))  # type: ignore[method-assign]
    assert seen.apply((1,)).get() == 1
    assert events == []  # the worker sends no task events (no -E): nothing to pay for
    app.conf.worker_send_task_events = True
    assert seen.apply((2,)).get() == 2
    assert seen.apply((2,)).get() == 2  # a replay: no claim, no event
    assert events == [("task-keyed", {"key": f"seen:{tag}:2", "attempt": 1, "taken_over": False})]


def test_a_worker_started_with_events_makes_keyed_attempts_send_them() -> None:
    from celery import signals

    from celery_fleet.celery import signals as fleet_signals

    class Worker:  # what worker_init sends: the WorkController, with -E as task_events
        def __init__(self, task_events: bool) -> None:
            self.task_events = task_events

    try:
        signals.worker_init.send(sender=Worker(True))
        assert fleet_signals._task_events[0] is True
        signals.worker_init.send(sender=Worker(False))
        assert fleet_signals._task_events[0] is False
    finally:
        fleet_signals._task_events[0] = False
        fleet_signals._node[0] = None


def test_random_sequences_keep_the_ledger_s_invariants(ledger: Ledger) -> None:
    """Random interleavings of enqueue / claim / renew / finish / lapse by 4 owners on one
    key, checked against a model: one running owner at most, every write fenced, attempts
    counting the claims that ran, and a succeeded key never runs again."""
    rng = random.Random(17)
    for _ in range(25):
        run = record_id_for(uuid.uuid4().hex)
        owners = ["a", "b", "c", "d"]
        model: dict[str, Any] = {"state": None, "owner": None, "attempts": 0}
        for _ in range(40):
            op = rng.choice(["enqueue", "claim", "claim", "finish", "renew"])
            who = rng.choice(owners)
            if op == "enqueue":
                new = ledger.enqueue(run, "k", "t").new
                released = model["state"] == "released"
                assert new == (model["state"] is None or released), model
                if new:
                    model["state"] = "queued"
            elif op == "claim":
                c = ledger.claim(run, "k", "t", who, 30, singleton=False)
                if model["state"] == "succeeded":
                    assert c.verdict == "done"
                elif model["state"] == "failed":
                    assert c.verdict == "failed"
                elif model["state"] == "running" and model["owner"] != who:
                    assert c.verdict == "busy"
                else:
                    assert c.verdict == "run" and c.attempts == model["attempts"] + 1
                    model.update(state="running", owner=who, attempts=c.attempts)
            elif op == "renew":
                ok = ledger.renew([(run, who)], 30) == [True]
                assert ok == (model["state"] == "running" and model["owner"] == who)
            else:
                outcome = rng.choice(["succeeded", "failed", "released", "queued"])
                ok = ledger.finish(run, who, outcome, "1")
                assert ok == (model["state"] == "running" and model["owner"] == who), model
                if ok:
                    model.update(state=outcome, owner=None)
            record = ledger.record(run)
            if model["state"] is not None:
                stored = {"released": "failed"}.get(model["state"], model["state"])
                assert (
                    record["state"] == stored
                    and int(record.get("attempts", 0)) == model["attempts"]
                ), (record, model)


def test_an_end_a_frozen_redis_cannot_hear_is_one_log_line_not_a_redis_traceback(
    redis_of_this_test: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The fleet's Redis SIGSTOPped as a keyed attempt ends: an outage, logged once as
    what happens next (like every other call the outage fails), not as a traceback of
    redis-py's TimeoutError."""
    fleet = Fleet(redis_url=redis_of_this_test.url, namespace=f"end-{uuid.uuid4().hex[:6]}")
    key = "doc-frozen"
    run = record_id_for(key)
    assert fleet.ledger.claim(run, key, "t", "a", 10, singleton=False).verdict == "run"
    attempt = Attempt(fleet, run, key, "a", release_on_failure=True)
    assert redis_of_this_test.proc is not None
    redis_of_this_test.proc.send_signal(signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, logger="celery_fleet"):
            attempt.finish("succeeded", "1")
    finally:
        redis_of_this_test.proc.send_signal(signal.SIGCONT)
    ends = [r for r in caplog.records if key in r.getMessage()]
    assert len(ends) == 1, caplog.text
    assert ends[0].exc_info is None and "Traceback" not in caplog.text, caplog.text
    assert "fleet_claim_lease" in ends[0].getMessage()
    fleet.close()
