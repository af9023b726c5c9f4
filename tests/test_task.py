"""@fleet_task / FleetTask: options, early errors, direct and eager calls (no worker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery

from celery_fleet import ConfigError, Fleet, FleetTask, Throttled, ThrottledTooLong, fleet_task


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[Celery]:
    app = Celery("unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.fleet_redis_url = redis_url
    app.conf.fleet_namespace = namespace
    app.conf.fleet_limits = {
        "openai": {"rpm": 600, "tpm": 10_000, "max_in_flight": 2, "burst": 1.0},
        "once": {"requests": "1/minute"},
    }
    yield app


def test_unknown_options_fail_at_decoration_with_a_hint(app: Celery) -> None:
    with pytest.raises(ConfigError, match=r"'tokns' \(did you mean 'tokens'\?\)"):
        fleet_task(app=app, limit="openai", tokns=10)
    with pytest.raises(ConfigError, match="max_retrys"):
        fleet_task(app=app, max_retrys=3)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"on_limit": "retry"}, "on_limit must be one of"),
        ({"limit": "openai", "tokens": -1}, "non-negative int"),
        ({"limit": "openai", "tokens": 10**400}, "a 401-digit int"),
        ({"limit": "openai", "max_wait": -2}, "max_wait"),
        ({"limit": 5}, "limit must be the name"),
        ({"base": object}, "subclass of FleetTask"),
        ({"wait_after_call": "yes"}, "wait_after_call must be True or False"),
        ({"max_reschedules": -1}, "max_reschedules must be"),
        ({"max_reschedules": 2.5}, "max_reschedules must be"),
        ({"max_throttled": -5}, "max_throttled"),
        ({"max_throttled": "1h"}, "max_throttled"),
    ],
)
def test_bad_fleet_options_fail_at_decoration(app: Celery, options: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        fleet_task(app=app, **options)


def test_limit_checked_at_decoration_when_the_fleet_exists(app: Celery) -> None:
    Fleet(app)
    with pytest.raises(ConfigError, match="unknown limit 'opneai'; known limits: once, openai"):
        fleet_task(app=app, limit="opneai")(lambda: None)
    with pytest.raises(ConfigError, match="can never be admitted"):
        fleet_task(app=app, limit="openai", tokens=50_000)(lambda: None)


def test_limit_checked_at_publish(app: Celery) -> None:
    @fleet_task(app=app, limit="nope", shared=False, name="orphan-publish")
    def orphan() -> None: ...

    Fleet(app)
    with pytest.raises(ConfigError, match="unknown limit 'nope'"):
        orphan.delay()


def test_limit_checked_when_the_app_finalizes(app: Celery) -> None:
    @fleet_task(app=app, limit="nope", shared=False, name="orphan-late")
    def orphan() -> None: ...

    Fleet(app)
    with pytest.raises(ConfigError, match="task 'orphan-late': unknown limit 'nope'"):
        app.finalize()  # what a worker does at start-up


def test_finalized_app_is_checked_when_the_fleet_is_created(app: Celery) -> None:
    @fleet_task(app=app, limit="nope", shared=False, name="orphan-finalized")
    def orphan() -> None: ...

    app.finalize()
    with pytest.raises(ConfigError, match="task .*orphan.*unknown limit 'nope'"):
        Fleet(app)


def test_fleet_task_is_a_fleet_task_with_celery_options(app: Celery) -> None:
    fleet = Fleet(app)

    @fleet_task(app=app, shared=False, limit="openai", tokens=1500, max_retries=7, name="summarize")
    def summarize(doc: str) -> str:
        return doc.upper()

    assert isinstance(summarize, FleetTask)
    assert summarize.name == "summarize" and summarize.max_retries == 7
    assert summarize.fleet is fleet
    assert summarize.fleet_limit == "openai" and summarize.fleet_tokens == 1500


def test_direct_call_takes_a_slot_and_raises_throttled(app: Celery) -> None:
    fleet = Fleet(app)
    seen: list[int] = []

    @fleet_task(app=app, shared=False, limit="once", max_wait=0)
    def ping() -> str:
        seen.append(fleet.admission.in_flight("once"))
        return "pong"

    assert ping() == "pong"
    assert seen == [1]  # the body ran inside a slot
    with pytest.raises(Throttled):
        ping()  # called directly: nothing to reschedule, so it raises
    assert seen == [1]


def test_on_limit_fail_raises_from_a_worker_run(app: Celery) -> None:
    Fleet(app)

    @fleet_task(app=app, shared=False, limit="once", max_wait=0, on_limit="fail")
    def once() -> str:
        return "ok"

    assert once.apply().get() == "ok"
    result = once.apply()
    assert result.status == "FAILURE" and isinstance(result.result, Throttled)


def test_eager_reschedule_waits_and_runs_again(app: Celery) -> None:
    fleet = Fleet(app)
    sleeps: list[float] = []
    fleet.clock.sleep = sleeps.append  # type: ignore[method-assign]
    calls: list[int] = []

    @fleet_task(app=app, shared=False, bind=True)
    def agent(self: FleetTask) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise Throttled("openai", 1500)
        return len(calls)

    assert agent.apply().get() == 2
    assert len(sleeps) == 1 and 1.5 <= sleeps[0] <= 1.5 + 0.3 + 1e-9


def test_on_limit_wait_gives_body_slots_no_deadline(app: Celery) -> None:
    fleet = Fleet(app)
    waits: list[float] = []

    @fleet_task(app=app, shared=False, bind=True, on_limit="wait")
    def patient(self: FleetTask) -> None:
        waits.append(self.fleet.slot("openai").max_wait_s)

    @fleet_task(app=app, shared=False, bind=True, max_wait=3)
    def hurried(self: FleetTask) -> None:
        waits.append(self.fleet.slot("openai").max_wait_s)

    patient.apply().get()
    hurried.apply().get()
    assert waits == [float("inf"), 3.0]
    assert fleet.slot("openai").max_wait_s == 30.0  # outside a task: fleet_max_wait


def test_after_a_call_body_slots_wait_in_place(app: Celery) -> None:
    """Once a call is paid for, a later slot waits rather than reschedule the whole body."""
    Fleet(app)
    waits: list[float] = []

    @fleet_task(app=app, shared=False, bind=True, max_wait=3)
    def agent(self: FleetTask) -> None:
        for _ in range(2):
            with self.fleet.slot("openai") as slot:
                waits.append(slot.max_wait_s)

    @fleet_task(app=app, shared=False, bind=True, max_wait=3, wait_after_call=False)
    def restless(self: FleetTask) -> None:
        for _ in range(2):
            with self.fleet.slot("openai") as slot:
                waits.append(slot.max_wait_s)

    agent.apply().get()
    restless.apply().get()
    assert waits == [3.0, float("inf"), 3.0, 3.0]


def test_patience_runs_out_with_a_clear_error(app: Celery) -> None:
    fleet = Fleet(app)
    fleet.clock.sleep = lambda s: None  # type: ignore[method-assign]
    runs: list[int] = []

    @fleet_task(app=app, shared=False, bind=True, max_reschedules=2)
    def stubborn(self: FleetTask) -> None:
        runs.append(self.throttling.reschedules)
        raise Throttled("openai", 1500, "requests/60s")

    result = stubborn.apply()
    assert result.status == "FAILURE"
    error = result.result
    assert isinstance(error, ThrottledTooLong) and isinstance(error, Throttled)
    assert error.reschedules == 2 and error.limit == "openai"
    assert "after 2 reschedule(s)" in str(error) and "max_reschedules" in str(error)
    assert runs == [0, 1, 2]  # each run sees how often it was put back

    @fleet_task(app=app, shared=False, bind=True, max_throttled=4)
    def slow(self: FleetTask) -> None:
        raise Throttled("openai", 1500)

    error = slow.apply().result
    assert isinstance(error, ThrottledTooLong) and error.throttled_s >= 4


def test_fleet_needs_a_redis_url_when_the_broker_is_not_redis() -> None:
    app = Celery("amqp", broker="amqp://guest:pw@localhost//", set_as_current=False)
    with pytest.raises(ConfigError, match="fleet_redis_url is not set"):
        Fleet(app)
    app.conf.fleet_redis_url = "http://nope"
    with pytest.raises(ConfigError, match="redis://"):
        Fleet(app)


def test_fleet_defaults_to_a_redis_broker(redis_url: str) -> None:
    app = Celery("r", broker=redis_url, set_as_current=False)
    app.conf.fleet_limits = {"x": {"rpm": 1}}
    assert Fleet(app).redis_url == redis_url


def test_decoration_errors_name_the_task_as_celery_will(app: Celery) -> None:
    Fleet(app)

    def summarize() -> None: ...

    with pytest.raises(ConfigError, match="task 'tests.test_task.summarize': unknown limit"):
        fleet_task(app=app, limit="opneai")(summarize)
    with pytest.raises(ConfigError, match="task 'custom-name': unknown limit"):
        fleet_task(app=app, limit="opneai", name="custom-name")(summarize)


def test_a_reschedule_stores_throttled_publishes_and_tells_monitors(app: Celery) -> None:
    """The worker path without a worker: state THROTTLED before the copy is published,
    a one-line task-retried event (no traceback), the signal, then Ignore (acked, no RETRY)."""
    from celery.exceptions import Ignore

    from celery_fleet import THROTTLED, Run
    from celery_fleet.celery.signals import task_rescheduled

    app.conf.fleet_defer = "countdown"  # the copy is an ETA message (see the next test)
    Fleet(app)
    events: list[tuple[str, dict]] = []
    published: list[dict] = []
    signalled: list[int] = []

    @fleet_task(app=app, shared=False, bind=True)
    def agent(self: FleetTask) -> None: ...

    agent.send_event = lambda type_, **fields: events.append((type_, fields))  # type: ignore[method-assign]
    original = agent.apply_async

    def record(*args: object, **kwargs: object) -> object:
        published.append({"state": agent.AsyncResult("t-1").state, **kwargs})
        return original(*args, **kwargs)

    agent.apply_async = record  # type: ignore[method-assign]

    def on_signal(sender: object = None, reschedules: int = 0, **_: object) -> None:
        signalled.append(reschedules)

    task_rescheduled.connect(on_signal, weak=False)
    agent.push_request(
        id="t-1", args=[], kwargs={}, retries=0, delivery_info={}, called_directly=False
    )
    try:
        with pytest.raises(Ignore):
            agent._on_backpressure(Throttled("openai", 2000, "requests/60s"), Run(since_ms=42))
    finally:
        agent.pop_request()
        task_rescheduled.disconnect(on_signal)
    assert published and published[0]["state"] == THROTTLED  # stored before the copy exists
    assert published[0]["headers"]["fleet"]["since_ms"] == 42
    assert published[0]["headers"]["fleet"]["reschedules"] == 1
    assert 2.0 <= published[0]["countdown"] <= 2.4
    info = agent.AsyncResult("t-1").info
    assert info["limit"] == "openai" and info["reason"] == "requests/60s"
    # no event: the worker sends no task events (no -E), so nobody would read it
    assert events == []
    assert signalled == [1]


def test_by_default_a_reschedule_keeps_the_copy_in_redis_until_due(app: Celery) -> None:
    from celery.exceptions import Ignore

    from celery_fleet import Run
    from celery_fleet.celery.reschedule import decode

    fleet = Fleet(app)

    @fleet_task(app=app, shared=False, bind=True)
    def agent(self: FleetTask, doc: int) -> None: ...

    published: list[object] = []
    agent.apply_async = lambda *a, **kw: published.append(kw)  # type: ignore[method-assign]
    agent.push_request(
        id="t-2", args=[7], kwargs={}, retries=0, delivery_info={}, called_directly=False
    )
    try:
        with pytest.raises(Ignore):
            agent._on_backpressure(Throttled("openai", 5000, "requests/60s"), Run(since_ms=42))
    finally:
        agent.pop_request()
    # the broker only gets the backup, due after the copy (run only if Redis loses it)
    (backup,) = published
    assert backup["headers"]["fleet_backup"] == "t-2:1"  # type: ignore[index]
    grace = 2 * (1.0 + 15.0)  # two pump periods and two pump leases
    assert 5 + grace <= backup["countdown"] <= 6.1 + grace  # type: ignore[index]
    due = fleet.deferred.due_in_ms("t-2:1")
    now_s, now_us = fleet.store.call("TIME")
    assert due is not None and 5000 <= due - (int(now_s) * 1000 + int(now_us) / 1000) <= 6100
    assert fleet.deferred.take(10) == []  # not due yet
    stored = fleet.store.call("HGET", fleet.deferred.items_key, "t-2:1")
    message = fleet.deferred.verify("t-2:1", stored)  # stored signed with the fleet's key
    assert message is not None
    fleet.deferred.add("t-2:1", 0.0, message)
    ((item, message),) = fleet.deferred.take(10)
    copy = decode(app, message)
    assert copy.task == agent.name and list(copy.args) == [7]
    assert copy.options["task_id"] == "t-2"
    assert copy.options["headers"]["fleet"]["since_ms"] == 42
    assert copy.options["headers"]["fleet"]["reschedules"] == 1


def test_the_backup_stays_under_the_broker_s_visibility_timeout(app: Celery) -> None:
    from celery.exceptions import Ignore

    from celery_fleet import Run

    app.conf.broker_url = "redis://127.0.0.1:6379/10"
    app.conf.broker_transport_options = {"visibility_timeout": 100}
    app.conf.fleet_max_countdown = 89
    Fleet(app)

    @fleet_task(app=app, shared=False, bind=True)
    def agent(self: FleetTask) -> None: ...

    published: list[dict[str, object]] = []
    agent.apply_async = lambda *a, **kw: published.append(kw)  # type: ignore[method-assign]
    agent.push_request(id="t-3", args=[], kwargs={}, retries=0, delivery_info={},
                       called_directly=False)  # fmt: skip
    try:
        with pytest.raises(Ignore):
            agent._on_backpressure(Throttled("openai", 80_000, "requests/60s"), Run())
    finally:
        agent.pop_request()
    (backup,) = published
    assert float(backup["countdown"]) <= 90  # type: ignore[arg-type]  # not 80 s + the 32 s grace: the broker would redeliver it


@pytest.mark.parametrize("defer", ["countdown", "redis"])
@pytest.mark.parametrize(
    ("parent", "root"), [(None, "t-copy"), ("t-parent", "t-root")], ids=["top", "child"]
)
def test_a_rescheduled_copy_keeps_the_original_parent_and_root(
    app: Celery, defer: str, parent: str | None, root: str
) -> None:
    """Run as the worker runs it (Celery's tracer puts it on the task stack): the copy (or
    the broker's backup of a copy deferred in Redis) names the original's parent and root,
    not itself, so Flower links the attempts to the task that started them."""
    from celery.app.trace import build_tracer
    from celery.signals import before_task_publish

    app.conf.fleet_defer = defer
    Fleet(app)

    @fleet_task(app=app, shared=False, limit="once", max_wait=0, name="copy-lineage")
    def once() -> str:
        return "ok"

    assert once() == "ok"  # the budget is spent: the worker's run reschedules
    sent: list[dict] = []

    def on_publish(headers: dict | None = None, **_: object) -> None:
        sent.append(dict(headers or {}))

    before_task_publish.connect(on_publish, weak=False)
    try:
        tracer = build_tracer(once.name, once, app=app, eager=False, propagate=False)
        request = {"id": "t-copy", "root_id": root, "parent_id": parent, "delivery_info": {}}
        tracer("t-copy", [], {}, request)
    finally:
        before_task_publish.disconnect(on_publish)
    assert [h["id"] for h in sent] == ["t-copy"]
    assert sent[0]["parent_id"] == parent
    assert sent[0]["root_id"] == root
