"""Jittered beat schedules in a real beat ``Service`` (PersistentScheduler, celery-redbeat),
ticking on a controlled clock and publishing to a real Redis broker.

Every publish is read back from the broker's queue (a Redis list), so the checks are on
what a worker would receive, not on what the code meant to send.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, beat, signals
from celery.schedules import crontab, schedule

from celery_fleet import ConfigError, jitter_options, jittered
from celery_fleet.celery.beat import Jittered

UTC = dt.timezone.utc
START = dt.datetime(2026, 11, 26, 1, 59, 0, tzinfo=UTC)
NOMINAL = dt.datetime(2026, 11, 26, 2, 0, 0, tzinfo=UTC)


class _Clock:
    now = START


def _now() -> dt.datetime:
    """The controlled clock (module level: PersistentScheduler pickles the schedules)."""
    return _Clock.now


@pytest.fixture
def clock() -> Iterator[type[_Clock]]:
    _Clock.now = START
    yield _Clock
    _Clock.now = START


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    queue = f"beat-test-{uuid.uuid4().hex[:8]}"
    celery = Celery("beat_test", broker=redis_url, set_as_current=False)
    celery.conf.update(task_default_queue=queue, enable_utc=True, timezone="UTC")
    yield celery
    client = redis.Redis.from_url(redis_url)
    client.delete(queue)
    for key in client.scan_iter(match=f"*{queue}*"):
        client.delete(key)
    client.close()


def _published(app: Celery, redis_url: str) -> list[dict[str, Any]]:
    """The task messages in the app's queue: name, entry (kwargs), eta and properties."""
    client = redis.Redis.from_url(redis_url)
    raw = client.lrange(app.conf.task_default_queue, 0, -1)
    client.close()
    out = []
    for item in reversed(raw):  # LPUSHed: oldest last
        msg = json.loads(item)
        body = json.loads(base64.b64decode(msg["body"]))
        out.append({"task": msg["headers"]["task"], "kwargs": body[1], **msg["headers"],
                    "properties": msg["properties"]})  # fmt: skip
    return out


def _service(app: Celery, path: Path, scheduler_cls: Any = beat.PersistentScheduler) -> Any:
    service = beat.Service(
        app, max_interval=5, schedule_filename=str(path), scheduler_cls=scheduler_cls
    )
    signals.beat_init.send(sender=service)  # as Service.start() does before its first tick
    return service


def _tick_until(
    service: Any, clock: type[_Clock], until: dt.datetime, fired: dict[str, list[dt.datetime]]
) -> None:
    """Tick the scheduler, moving the clock by at most 0.5 s between ticks (a real beat
    sleeps what tick() returns); record the clock at each publish per entry."""
    sched = service.scheduler
    original = sched.apply_entry

    def apply_entry(entry: Any, producer: Any = None) -> None:
        fired.setdefault(entry.name, []).append(clock.now)
        original(entry, producer=producer)

    sched.apply_entry = apply_entry
    while clock.now < until:
        wait = sched.tick()
        clock.now += dt.timedelta(seconds=min(max(wait, 0.001), 0.5))  # >= 1 µs of datetime


def _entries(n: int, sched: Any, task: str = "proj.agent") -> dict[str, dict[str, Any]]:
    return {
        f"agent-{i:02d}": {"task": task, "schedule": sched, "kwargs": {"i": i}} for i in range(n)
    }


def _ks_uniform(samples: list[float], hi: float) -> float:
    """Kolmogorov-Smirnov statistic of ``samples`` against uniform on [0, hi)."""
    xs = sorted(x / hi for x in samples)
    n = len(xs)
    return max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(xs))


def test_thirty_entries_on_one_crontab_spread_over_the_window(
    app: Celery, clock: type[_Clock], tmp_path: Path, redis_url: str
) -> None:
    # One jittered object shared by all 30 entries: beat keys each copy by its entry's name.
    shared = jittered(crontab(minute=0, hour=2, nowfun=_now), max_delay=600)
    app.conf.beat_schedule = _entries(30, shared)
    fired: dict[str, list[dt.datetime]] = {}
    service = _service(app, tmp_path / "schedule")
    _tick_until(service, clock, NOMINAL + dt.timedelta(minutes=11), fired)
    service.scheduler.close()
    assert sorted(fired) == sorted(app.conf.beat_schedule)
    assert all(len(times) == 1 for times in fired.values()), fired  # once each
    offsets = [(times[0] - NOMINAL).total_seconds() for times in fired.values()]
    assert all(0 <= s < 600 + 0.5 for s in offsets), offsets  # forward only, in the window
    d = _ks_uniform([min(s, 599.999) for s in offsets], 600)
    assert d < 1.63 / math.sqrt(30), (d, sorted(offsets))  # KS at alpha = 0.01
    assert len({round(s) for s in offsets}) >= 28  # not a herd: nearly all in seconds apart
    messages = _published(app, redis_url)
    assert len(messages) == 30 and {m["kwargs"]["i"] for m in messages} == set(range(30))


def test_a_restarted_beat_neither_re_rolls_nor_fires_twice(
    app: Celery, clock: type[_Clock], tmp_path: Path
) -> None:
    make = lambda: jittered(crontab(minute=0, hour=2, nowfun=_now), max_delay=600)  # noqa: E731
    app.conf.beat_schedule = _entries(30, make())
    straight: dict[str, list[dt.datetime]] = {}
    service = _service(app, tmp_path / "one")
    _tick_until(service, clock, NOMINAL + dt.timedelta(minutes=11), straight)
    service.scheduler.close()

    # The same day again, with a beat stopped in the middle of the window and started anew
    # from its schedule file (fresh schedule objects from the config, as after a deploy).
    clock.now = START
    app.conf.beat_schedule = _entries(30, make())
    fired: dict[str, list[dt.datetime]] = {}
    service = _service(app, tmp_path / "two")
    _tick_until(service, clock, NOMINAL + dt.timedelta(minutes=5), fired)
    service.scheduler.close()
    before = sum(len(t) for t in fired.values())
    assert 5 < before < 30  # some fired before the restart, some after
    app.conf.beat_schedule = _entries(30, make())
    service = _service(app, tmp_path / "two")
    _tick_until(service, clock, NOMINAL + dt.timedelta(minutes=11), fired)
    service.scheduler.close()
    assert all(len(times) == 1 for times in fired.values()), fired
    for name, times in fired.items():  # the same due times: nothing re-rolled
        assert abs((times[0] - straight[name][0]).total_seconds()) <= 0.5, name


def test_a_jittered_interval_keeps_its_period(
    app: Celery, clock: type[_Clock], tmp_path: Path
) -> None:
    every = jittered(schedule(dt.timedelta(seconds=60), nowfun=_now), max_delay=30)
    app.conf.beat_schedule = _entries(5, every)
    fired: dict[str, list[dt.datetime]] = {}
    service = _service(app, tmp_path / "schedule")
    _tick_until(service, clock, START + dt.timedelta(minutes=20), fired)
    service.scheduler.close()
    for name, times in fired.items():
        # 20 nominal minutes: 19 to 20 runs, one per minute, each within its minute's
        # first 30 s (counting from the last run would drift by ~15 s per period).
        assert 19 <= len(times) <= 20, (name, times)
        minutes = [t.replace(second=0, microsecond=0) for t in times]
        assert len(set(minutes)) == len(times), times
        assert all(t.second < 31 for t in times), times


def test_jitter_in_the_entry_options_delays_the_run_not_the_publish(
    app: Celery, clock: type[_Clock], tmp_path: Path, redis_url: str
) -> None:
    # What a scheduler that stores entries as JSON (celery-redbeat) can keep: plain options.
    entries = _entries(20, crontab(minute=0, hour=2, nowfun=_now))
    for entry in entries.values():
        entry["options"] = jitter_options(120)
    app.conf.beat_schedule = entries
    sent_at = dt.datetime.now(UTC)
    service = _service(app, tmp_path / "schedule")
    _tick_until(service, clock, NOMINAL + dt.timedelta(seconds=5), {})
    service.scheduler.close()
    messages = _published(app, redis_url)
    assert len(messages) == 20
    delays = [(dt.datetime.fromisoformat(m["eta"]) - sent_at).total_seconds() for m in messages]
    assert all(-1 < d < 121 for d in delays), delays  # forward only, within the window
    assert max(delays) - min(delays) > 30, delays  # spread, not one countdown for all
    assert all("fleet_jitter" not in m["properties"] for m in messages)


@pytest.fixture
def redbeat_prefix(app: Celery, redis_url: str) -> Iterator[str]:
    """``app`` set up for celery-redbeat under a key prefix of its own (deleted after)."""
    prefix = f"redbeat-test-{uuid.uuid4().hex[:8]}:"
    app.conf.update(redbeat_redis_url=redis_url, redbeat_key_prefix=prefix,
                    redbeat_lock_timeout=30)  # fmt: skip
    # redbeat stores entries as JSON (no nowfun): the controlled clock is the app's.
    app.now = _now  # type: ignore[method-assign]
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


def _tick_until_published(sched: Any, app: Celery, redis_url: str, clock: Any, n: int) -> None:
    """Tick ``sched``, a second of the controlled clock at a time, until ``n`` are sent."""
    for _ in range(400):
        sched.tick()
        if len(_published(app, redis_url)) == n:
            return
        clock.now += dt.timedelta(seconds=1)


def _run_redbeat(
    sched: Any, app: Celery, redis_url: str, clock: Any, sent_at: dt.datetime
) -> list[dict[str, Any]]:
    """Run the 10 jittered entries due at 02:00 and check they were sent spread forward
    over the 60 s window (within 30 s of slack for the ticks); their messages."""
    _tick_until_published(sched, app, redis_url, clock, 10)
    sched.close()
    messages = _published(app, redis_url)
    assert len(messages) == 10
    delays = [(dt.datetime.fromisoformat(m["eta"]) - sent_at).total_seconds() for m in messages]
    assert all(-1 < d < 61 + 30 for d in delays), delays
    assert max(delays) - min(delays) > 10, delays
    return messages


def test_celery_redbeat_with_jitter_options(
    app: Celery, clock: type[_Clock], redis_url: str, redbeat_prefix: str
) -> None:
    import redbeat  # a test extra: this test must run, not skip

    entries = _entries(10, crontab(minute=0, hour=2))
    for entry in entries.values():
        entry["options"] = jitter_options(60)
    app.conf.beat_schedule = entries
    sent_at = dt.datetime.now(UTC)
    service = beat.Service(app, max_interval=5, scheduler_cls=redbeat.RedBeatScheduler)
    signals.beat_init.send(sender=service)  # redbeat takes its lock here
    sched = service.scheduler
    _run_redbeat(sched, app, redis_url, clock, sent_at)


def test_celery_redbeat_stores_a_jittered_entry_as_jitter_options(
    app: Celery, clock: type[_Clock], redis_url: str, redbeat_prefix: str
) -> None:
    # RedBeat used to crash at start: "Object of type Jittered is not JSON serializable".
    import redbeat  # a test extra: this test must run, not skip

    app.conf.beat_schedule = _entries(10, jittered(crontab(minute=0, hour=2), 60))
    sent_at = dt.datetime.now(UTC)
    service = beat.Service(app, max_interval=5, scheduler_cls=redbeat.RedBeatScheduler)
    sched = service.scheduler  # stores the entries in Redis, as `celery beat` does first
    signals.beat_init.send(sender=service)
    client = redis.Redis.from_url(redis_url)
    stored = json.loads(client.hget(f"{redbeat_prefix}agent-00", "definition"))
    client.close()
    assert stored["schedule"]["__type__"] == "crontab"
    assert stored["options"] == {"fleet_jitter": 60.0}
    messages = _run_redbeat(sched, app, redis_url, clock, sent_at)
    assert all("fleet_jitter" not in m["properties"] for m in messages)


def test_an_explicit_fleet_jitter_option_wins_in_redbeat() -> None:
    from celery_fleet.celery.redbeat_codec import redbeat_definition

    inner = crontab(minute=0, hour=2)
    stored = redbeat_definition(
        {"name": "a", "schedule": jittered(inner, 60), "options": {"fleet_jitter": 5, "q": 1}}
    )
    assert stored["schedule"] is inner and stored["options"] == {"fleet_jitter": 5, "q": 1}
    plain = {"name": "b", "schedule": inner, "options": {}}
    assert redbeat_definition(plain) is plain


def test_a_jittered_schedule_pickles_with_its_name() -> None:
    sched = jittered(crontab(minute=0, hour=2), max_delay=60, key="nightly")
    back = pickle.loads(pickle.dumps(sched.named("entry")))
    assert isinstance(back, Jittered) and back == sched.named("entry")
    assert back.offset_key == "nightly" and back.max_delay == 60


@pytest.mark.parametrize(
    "sched, delay",
    [
        (crontab(), -1),
        (crontab(), float("nan")),
        (crontab(), float("inf")),
        (crontab(), "60"),
        (crontab(), 10**400),
        ("every day", 60),
        (None, 60),
        (-5, 60),
        (dt.timedelta(0), 60),
    ],
)
def test_bad_jitter_is_refused_at_construction(sched: Any, delay: Any) -> None:
    with pytest.raises(ConfigError):
        jittered(sched, delay)


def test_jitter_cannot_be_wrapped_twice_nor_reach_the_next_due_time() -> None:
    with pytest.raises(ConfigError, match="already jittered"):
        jittered(jittered(crontab(), 5), 5)
    with pytest.raises(ConfigError):
        jitter_options(-1)
    # a max_delay longer than the period is cut to just under it: never past the next run
    wide = jittered(schedule(dt.timedelta(seconds=60), nowfun=_now), max_delay=3600).named("x")
    _Clock.now = START
    for minutes in range(30):
        at = START + dt.timedelta(minutes=minutes, seconds=1)
        due = wide.due_after(at)
        nominal = wide.nominal_after(at)
        assert nominal <= due < nominal + dt.timedelta(seconds=60)


def test_a_jittered_solar_schedule_fires_once_after_the_event(
    app: Celery, clock: type[_Clock], tmp_path: Path
) -> None:
    from celery import _state
    from celery.schedules import solar  # needs ephem, a test extra

    sunrise = solar("sunrise", 52.52, 13.40, nowfun=_now)  # Berlin
    clock.now = dt.datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
    event = clock.now + sunrise.remaining_estimate(clock.now)
    app.conf.beat_schedule = _entries(10, jittered(sunrise, max_delay=600))
    # solar pickles without its nowfun, and PersistentScheduler's entries come back from
    # the shelve after each sync with the current app's clock: make that ours.
    app.now = _now  # type: ignore[method-assign]
    previous = _state.get_current_app()
    app.set_current()
    fired: dict[str, list[dt.datetime]] = {}
    try:
        service = _service(app, tmp_path / "schedule")
        _tick_until(service, clock, event + dt.timedelta(minutes=15), fired)
        service.scheduler.close()
    finally:
        previous.set_current()
    assert len(fired) == 10 and all(len(times) == 1 for times in fired.values()), fired
    offsets = sorted((t[0] - event).total_seconds() for t in fired.values())
    assert 0 <= offsets[0] and offsets[-1] < 601, offsets  # forward only, in the window
    assert offsets[-1] - offsets[0] > 300, offsets  # split over the window, not one instant
