"""Jitter at publish and in waits: staggered fan-out, @fleet_task(jitter=...), reschedule
backoff, step jitter and the visibility-timeout warnings.

Publishes go to a real Redis broker and are read back from the queue: the countdowns
checked are the ETAs a worker would receive.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, beat, signals

from celery_fleet import ConfigError, Fleet, fleet_task, jitter_options
from celery_fleet.admission.backoff import decorrelated_jitter, full_jitter, offset, stagger_offsets
from celery_fleet.celery.stagger import stagger

from .test_beat import _published
from .test_slot import FakeClock

MakeFleet = Callable[..., Fleet]


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[Celery]:
    queue = f"jitter-test-{uuid.uuid4().hex[:8]}"
    celery = Celery("jitter_test", broker=redis_url, set_as_current=False)
    celery.conf.update(
        task_default_queue=queue,
        fleet_redis_url=redis_url,
        fleet_namespace=namespace,
        fleet_limits={"llm": {"max_in_flight": 2}},
    )
    yield celery
    client = redis.Redis.from_url(redis_url)
    client.delete(queue)
    client.close()


def _delays(app: Celery, redis_url: str, since: float) -> list[float]:
    return [
        dt.datetime.fromisoformat(m["eta"]).timestamp() - since if m["eta"] else 0.0
        for m in _published(app, redis_url)
    ]


# -- staggered fan-out --------------------------------------------------------------------


def test_stagger_spreads_countdowns_one_per_share_of_the_window(
    app: Celery, redis_url: str
) -> None:
    @app.task(shared=False)
    def agent(i: int) -> int:
        return i

    since = time.time()
    group = Fleet(app).stagger([agent.s(i) for i in range(10)], over=5.0, seed=3)
    delays = _delays(app, redis_url, since)
    assert len(group.results) == 10 and len(delays) == 10
    for i, d in enumerate(delays):  # message i owns [i, i+1) * 0.5 s
        assert i * 0.5 - 0.05 <= d < (i + 1) * 0.5 + 0.5, (i, delays)
    assert [m["id"] for m in _published(app, redis_url)] == [r.id for r in group.results]


def test_fan_out_takes_args_kwargs_or_one_argument_and_adds_to_a_countdown(
    app: Celery, redis_url: str
) -> None:
    @fleet_task(app=app, shared=False)
    def agent(*args: Any, **kwargs: Any) -> None: ...

    since = time.time()
    agent.fan_out([(1, 2), {"topic": "x"}, "solo"], over=3.0, countdown=60)
    messages = _published(app, redis_url)
    assert [m["argsrepr"] for m in messages] == ["(1, 2)", "()", "('solo',)"]
    assert messages[1]["kwargs"] == {"topic": "x"}
    delays = _delays(app, redis_url, since)
    assert all(60 - 0.05 <= d < 63 + 0.5 for d in delays), delays  # forward of the countdown


@pytest.mark.parametrize("over", [-1, float("nan"), float("inf"), "10", None, 10**400])
def test_a_bad_window_publishes_nothing(app: Celery, redis_url: str, over: Any) -> None:
    @fleet_task(app=app, shared=False)
    def agent(i: int) -> None: ...

    with pytest.raises(ConfigError):
        agent.fan_out(range(5), over=over)
    with pytest.raises(ConfigError):
        stagger([agent.s(1), "not a signature"], over=1.0)
    assert _published(app, redis_url) == []


def test_stagger_offsets_are_stratified_for_any_size() -> None:
    rng = random.Random(11)
    for _ in range(200):
        n, over = rng.randint(0, 300), rng.choice([0.0, 1e-6, 0.5, 30.0, 3600.0])
        offs = stagger_offsets(n, over, rng)
        assert len(offs) == n and offs == sorted(offs)
        assert all(0 <= x <= over and (over == 0 or x < over) for x in offs)
        if n and over:
            width = over / n
            assert all(i * width <= x < (i + 1) * width + 1e-9 for i, x in enumerate(offs))


# -- a task's own jitter ------------------------------------------------------------------


def test_task_jitter_delays_first_publishes_only(app: Celery, redis_url: str) -> None:
    @fleet_task(app=app, shared=False, jitter=2.0)
    def agent(i: int) -> None: ...

    since = time.time()
    for i in range(20):
        agent.delay(i)
    agent.apply_async((99,), headers={"fleet": {"reschedules": 1}})  # a reschedule's copy
    agent.apply_async((98,), retries=1)  # Celery's retry passes retries
    delays = _delays(app, redis_url, since)
    assert all(-0.05 <= d < 2.0 + 0.5 for d in delays[:20]), delays
    assert max(delays[:20]) - min(delays[:20]) > 0.5  # random, not one countdown
    assert delays[20:] == [0.0, 0.0]  # no jitter on a reschedule or a retry


def test_fleet_jitter_per_publish_is_checked_before_publishing(app: Celery, redis_url: str) -> None:
    @fleet_task(app=app, shared=False)
    def agent(i: int) -> None: ...

    since = time.time()
    agent.apply_async((1,), fleet_jitter=3.0)
    agent.apply_async((2,), **jitter_options(3.0))
    assert all(0 <= d < 3.5 for d in _delays(app, redis_url, since))
    for bad in (-1, float("nan"), "3", 10**400):
        with pytest.raises(ConfigError):
            agent.apply_async((3,), fleet_jitter=bad)
    assert len(_published(app, redis_url)) == 2
    for bad in (-1, float("nan"), "3"):
        with pytest.raises(ConfigError):
            fleet_task(app=app, shared=False, jitter=bad)(lambda: None)


def test_a_plain_task_takes_fleet_jitter_too(app: Celery, redis_url: str) -> None:
    @app.task(shared=False)
    def plain(i: int) -> None: ...

    since = time.time()
    for i in range(10):
        plain.apply_async((i,), fleet_jitter=4.0)
    messages = _published(app, redis_url)
    delays = _delays(app, redis_url, since)
    assert all(-0.05 <= d < 4.5 for d in delays) and max(delays) - min(delays) > 0.5
    assert all("fleet_jitter" not in m["properties"] for m in messages)


# -- backoff ------------------------------------------------------------------------------


def test_jitter_formulas_stay_in_bounds_for_any_input() -> None:
    rng = random.Random(5)
    for _ in range(5000):
        attempt = rng.choice([0, 1, 5, 30, 61, 10**9, -3])
        base, cap = rng.uniform(0.001, 5), rng.choice([0.0, 1.0, 300.0, 1e6])
        assert 0 <= full_jitter(attempt, base, cap, rng) <= cap
        prev = rng.choice([0.0, base, 1e9])
        assert 0 <= decorrelated_jitter(prev, base, cap, rng) <= max(cap, 0)
    assert offset("k", 1.0, 0) == 0.0 and offset("k", 1.0, 10) == offset("k", 1.0, 10)


def test_reschedule_countdowns_back_off_with_the_count(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"max_in_flight": 1}})
    rng = random.Random(9)
    for _ in range(2000):  # random refusals and counts: never below the wait, never past the cap
        wait, count = rng.choice([0.0, 0.01, 2.0, 500.0]), rng.choice([0, 1, 4, 60, 10**12])
        guess = rng.random() < 0.5
        c = fleet.reschedule_countdown(wait, count, rng.uniform(0, 400), guess=guess)
        assert min(wait, fleet.max_countdown_s) <= c <= fleet.max_countdown_s, (wait, count, c)
        if not guess:  # the limiter's estimate: at most twice the wait (or + 50 ms)
            assert c <= max(2 * wait, wait + 0.05) + 1e-9, (wait, count, c)
    # a guessed wait (an open breaker): full jitter over the count, base 0.1 s, max 30 s
    first = [fleet.reschedule_countdown(0.1, 0, guess=True) for _ in range(400)]
    sixth = [fleet.reschedule_countdown(0.1, 6, guess=True) for _ in range(400)]
    assert all(0.1 <= c <= 0.15 + 1e-9 for c in first), max(first)  # the wait is larger
    assert statistics.mean(sixth) > 10 * statistics.mean(first)  # uniform(0, 6.4) by the 7th
    assert max(sixth) > 5 and min(sixth) < 1  # full jitter: spread over the whole range
    late = [fleet.reschedule_countdown(0.1, 20, guess=True) for _ in range(400)]
    assert max(late) <= 30 and max(late) > 25  # capped by fleet_backoff_max (30 s)
    # the limiter's estimate: 20% spread first, up to 100% from the third reschedule
    est0 = [fleet.reschedule_countdown(2.0, 0) for _ in range(400)]
    est3 = [fleet.reschedule_countdown(2.0, 3) for _ in range(400)]
    assert max(est0) <= 2.4 and max(est3) > 3.5 and max(est3) <= 4.0


def test_decorrelated_backoff_is_a_setting(app: Celery) -> None:
    app.conf.fleet_backoff = "decorrelated"
    app.conf.fleet_backoff_base = 0.5
    app.conf.fleet_backoff_max = 60
    fleet = Fleet(app)
    grown = [fleet.reschedule_countdown(0.0, 3, 20.0, guess=True) for _ in range(300)]
    assert all(0.5 <= c <= 60.0 for c in grown) and max(grown) > 30  # up to fleet_backoff_max
    for setting, value in (("fleet_backoff", "exponential"), ("fleet_backoff_base", 0),
                           ("fleet_backoff_base", 61), ("fleet_backoff_max", 0),
                           ("fleet_backoff_max", float("nan")), ("fleet_step_jitter", -1),
                           ("fleet_step_jitter", 61)):  # fmt: skip
        bad = Celery("bad", broker=app.conf.broker_url, set_as_current=False)
        bad.conf.update(app.conf.table(), **{setting: value})
        with pytest.raises(ConfigError, match=setting):
            Fleet(bad)


# -- step jitter --------------------------------------------------------------------------


def test_step_jitter_sleeps_before_asking(make_fleet: MakeFleet) -> None:
    clock = FakeClock()
    fleet = make_fleet({"llm": {"max_in_flight": 5}}, clock=clock)
    for _ in range(20):
        with fleet.slot("llm", jitter=0.02):
            pass
    assert len(clock.sleeps) == 20 and all(0 <= s < 0.02 for s in clock.sleeps)
    assert len({round(s, 6) for s in clock.sleeps}) > 15  # random
    clock.sleeps.clear()
    with fleet.slot("llm"):  # fleet_step_jitter defaults to 0: no sleep
        pass
    assert clock.sleeps == []
    for bad in (-0.1, float("nan"), 61, "0.1"):
        with pytest.raises(ConfigError):
            fleet.slot("llm", jitter=bad)


# -- the visibility timeout ---------------------------------------------------------------


def test_windows_beyond_the_visibility_timeout_are_warned_about(
    app: Celery, redis_url: str, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 30}
    app.conf.fleet_max_countdown = 20
    caplog.set_level(logging.WARNING, logger="celery_fleet")

    @fleet_task(app=app, shared=False)
    def agent(i: int) -> None: ...

    agent.fan_out(range(2), over=10)
    assert "visibility_timeout" not in caplog.text
    agent.fan_out(range(2), over=45)  # published all the same: only a warning
    assert "a stagger window can delay a task by 45 s" in caplog.text
    assert len(_published(app, redis_url)) == 4

    @fleet_task(app=app, shared=False, name=f"jit-{uuid.uuid4().hex[:6]}", jitter=40)
    def jumpy() -> None: ...

    app.finalize(auto=True)
    jumpy.on_bound(app)  # what the worker's app finalization runs at start-up
    assert "jitter can delay a task by 40 s" in caplog.text

    app.conf.beat_schedule = {"late": {"task": "x", "schedule": 60, "options": jitter_options(90)}}
    service = beat.Service(app, schedule_filename=str(tmp_path / "s"))
    signals.beat_init.send(sender=service)
    service.scheduler.close()
    assert "beat entry 'late' can delay a task by 90 s" in caplog.text
    assert math.isfinite(time.time())


def test_a_task_backs_off_by_its_reschedule_count(app: Celery, redis_url: str) -> None:
    from celery.exceptions import Ignore

    from celery_fleet import CircuitOpen, Throttled
    from celery_fleet.admission.run import Run

    app.conf.fleet_defer = "countdown"  # read the countdowns off the broker's ETA messages

    @fleet_task(app=app, shared=False, ignore_result=True)
    def agent() -> None: ...

    def reschedule(count: int, exc: Exception) -> float:
        since = time.time()
        before = len(_published(app, redis_url))
        header = {"reschedules": count, "since_ms": 1}
        agent.push_request(id=uuid.uuid4().hex, args=[], kwargs={}, retries=0,
                           delivery_info={}, called_directly=False, fleet=header)  # fmt: skip
        try:
            with pytest.raises(Ignore):
                agent._on_backpressure(exc, Run(since_ms=1))
        finally:
            agent.pop_request()
        message = _published(app, redis_url)[before]
        assert message["fleet"]["reschedules"] == count + 1
        return dt.datetime.fromisoformat(message["eta"]).timestamp() - since

    opened = CircuitOpen("llm", 100, "circuit_open")
    first = [reschedule(0, opened) for _ in range(15)]
    later = [reschedule(7, opened) for _ in range(15)]
    assert all(0.1 - 0.05 <= d < 0.15 + 0.5 for d in first), first  # the wait (+ 20%)
    assert statistics.mean(later) > 5 * statistics.mean(first), (first, later)
    assert all(d < 12.8 + 0.5 for d in later)  # uniform(0, 0.1 s * 2**7)
    # a throttled task's wait is the limiter's estimate: never more than twice it
    throttled = [reschedule(7, Throttled("llm", 1000, "requests/60s")) for _ in range(15)]
    assert all(1.0 - 0.05 <= d < 2.0 + 0.5 for d in throttled), throttled
    assert max(throttled) - min(throttled) > 0.3  # spread over the window, not one instant


@pytest.mark.parametrize(
    "setting",
    ["fleet_dedupe_ttl", "fleet_claim_lease", "fleet_backoff_base", "fleet_backoff_max",
     "fleet_step_jitter", "fleet_metrics_port"],
)  # fmt: skip
@pytest.mark.parametrize("value", [10**15, 10**400, float("nan"), -1, "5"])
def test_absurd_values_of_the_new_settings_fail_at_start_up(
    app: Celery, setting: str, value: object
) -> None:
    bad = Celery("bad", broker=app.conf.broker_url, set_as_current=False)
    bad.conf.update(app.conf.table(), **{setting: value})
    with pytest.raises(ConfigError, match=setting):
        Fleet(bad)


def test_absurd_windows_and_jitters_are_refused_before_publishing(
    app: Celery, redis_url: str
) -> None:
    from celery.schedules import crontab

    from celery_fleet import jittered

    @fleet_task(app=app, shared=False)
    def agent(i: int) -> None: ...

    for value in (10**15, 10**400):
        with pytest.raises(ConfigError):
            jittered(crontab(), value)
        with pytest.raises(ConfigError):
            agent.fan_out(range(3), over=value)
        with pytest.raises(ConfigError):
            agent.apply_async((1,), fleet_jitter=value)
        with pytest.raises(ConfigError):
            fleet_task(app=app, shared=False, jitter=value)(lambda: None)
    assert _published(app, redis_url) == []
