"""django-celery-beat with jitter: ``JitteredDatabaseScheduler`` on a real Django project
(SQLite, migrated, its admin), in process and as a real ``celery beat`` process publishing
to Redis, stopped and started again inside a window.

The regression: django-celery-beat's own ``DatabaseScheduler`` drops a ``jittered()`` entry
("Cannot convert schedule type") and loses a ``fleet_jitter`` option: the first test shows
it; the beat process test fails on that scheduler (``FLEET_TEST_DJ_SCHEDULER``).
"""

from __future__ import annotations

import base64
import datetime as dt
import importlib
import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from benchmarks.harness.herd import stop_processes
from celery_fleet import ConfigError, jittered
from celery_fleet.celery.beat import Jittered

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = "tests.integration.djproject.settings"
FLEET_SCHEDULER = "celery_fleet.contrib.django_celery_beat:JitteredDatabaseScheduler"


@pytest.fixture(scope="module")
def djdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database for the Django project (this process is set up on it)."""
    pytest.importorskip("django_celery_beat")  # the [django-celery-beat] extra
    from django.conf import settings

    path = tmp_path_factory.mktemp("djproject") / "db.sqlite3"
    if settings.configured:  # set up by an earlier module: keep its database
        path = Path(settings.DATABASES["default"]["NAME"])
    os.environ["FLEET_DJANGO_DB"] = str(path)
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    from celery import _state

    previous = _state.get_current_app()
    importlib.import_module("tests.integration.djproject.celery_app")  # django.setup()
    previous.set_current()  # the project's app is current only where a test says so
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return path


@pytest.fixture
def app(djdb: Path, redis_url: str) -> Iterator[Any]:
    """The project's Celery app on a queue of its own, current, with an empty database."""
    from celery import _state
    from django.contrib.auth.models import User
    from django_celery_beat.models import PeriodicTask

    from tests.integration.djproject.celery_app import make_app

    PeriodicTask.objects.all().delete()
    celery = make_app(redis_url, f"dj-beat-{uuid.uuid4().hex[:8]}")
    previous = _state.get_current_app()
    celery.set_current()
    yield celery
    previous.set_current()
    PeriodicTask.objects.all().delete()
    User.objects.all().delete()
    client = redis.Redis.from_url(redis_url)
    client.delete(celery.conf.task_default_queue)
    client.close()
    celery.close()


def _scheduler(app: Any, path: str) -> Any:
    from celery.utils.imports import symbol_by_name

    return symbol_by_name(path)(app=app)


def _headers(name: str) -> dict[str, Any]:
    from django_celery_beat.models import PeriodicTask

    return dict(json.loads(PeriodicTask.objects.get(name=name).headers or "{}"))


def test_the_plain_database_scheduler_drops_jittered_entries(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The failure mode of the issue, on django-celery-beat's own scheduler.
    from django_celery_beat.models import PeriodicTask

    with caplog.at_level(logging.ERROR):
        sched = _scheduler(app, "django_celery_beat.schedulers:DatabaseScheduler")
    assert "Cannot convert schedule type" in caplog.text
    assert not PeriodicTask.objects.filter(name="from-config-jittered").exists()
    assert "from-config-jittered" not in sched.schedule
    assert "fleet_jitter" not in _headers("from-config-option")  # the option is lost
    sched.close()


def test_jittered_entries_are_stored_as_their_schedule_and_a_header(app: Any) -> None:
    from django_celery_beat.models import PeriodicTask

    from tests.integration.djproject.celery_app import CONFIG_JITTER_S, EVERY_S, OPTION_JITTER_S

    app.conf.beat_schedule["keyed"] = {
        "task": "dj.ping",
        "schedule": jittered(EVERY_S, 5, key="nightly"),
    }
    sched = _scheduler(app, FLEET_SCHEDULER)
    assert _headers("keyed") == {"fleet_jitter": 5, "fleet_jitter_key": "nightly"}
    keyed = sched.schedule["keyed"].schedule
    assert (keyed.max_delay, keyed.offset_key, keyed.share) == (5, "nightly", (0, 1))
    for name, jitter in (("from-config-jittered", CONFIG_JITTER_S),
                         ("from-config-option", OPTION_JITTER_S)):  # fmt: skip
        row = PeriodicTask.objects.get(name=name)
        assert (row.interval.every, row.interval.period) == (EVERY_S, "seconds")
        assert _headers(name) == {"fleet_jitter": jitter}  # what the admin shows and edits
        entry = sched.schedule[name]
        assert isinstance(entry.schedule, Jittered) and entry.schedule.max_delay == jitter
        assert "fleet_jitter" not in entry.options["headers"]  # not sent with the task
        assert "fleet_jitter" not in entry.options
    sched.close()


def test_a_bad_fleet_jitter_in_beat_schedule_stops_beat_at_start(app: Any) -> None:
    app.conf.beat_schedule = {
        "bad": {"task": "dj.ping", "schedule": 10.0, "options": {"fleet_jitter": "soon"}}
    }
    with pytest.raises(ConfigError, match="'bad' fleet_jitter.*'soon'"):
        _scheduler(app, FLEET_SCHEDULER)


def test_without_django_celery_beat_the_import_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['django_celery_beat'] = None\n"
        "import celery_fleet\n"  # celery-fleet itself never needs it
        "try:\n"
        "    import celery_fleet.contrib.django_celery_beat\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "pip install celery-fleet[django-celery-beat]" in out.stdout


def _admin_task(name: str, headers: str, every_s: int = 10, **fields: Any) -> Any:
    """A PeriodicTask as the Django admin saves one: headers as JSON text."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    if "clocked" not in fields and "crontab" not in fields:
        fields["interval"], _ = IntervalSchedule.objects.get_or_create(
            every=every_s, period=IntervalSchedule.SECONDS
        )
    return PeriodicTask.objects.create(
        name=name, task="dj.ping", kwargs=json.dumps({"entry": name}), headers=headers, **fields
    )


def test_admin_headers_jitter_entries_and_share_the_window(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from django.utils import timezone
    from django_celery_beat.models import ClockedSchedule

    app.conf.beat_schedule = {}
    for i in range(3):
        _admin_task(f"admin-{i}", '{"fleet_jitter": 8, "x-team": "data"}')
    _admin_task("admin-bad", '{"fleet_jitter": "soon"}')
    at = ClockedSchedule.objects.create(clocked_time=timezone.now() + dt.timedelta(minutes=2))
    _admin_task("admin-once", '{"fleet_jitter": 30}', clocked=at, one_off=True)
    with caplog.at_level(logging.ERROR, logger="celery_fleet"):
        sched = _scheduler(app, FLEET_SCHEDULER)
        entries = sched.schedule
    shares = [entries[f"admin-{i}"].schedule.share for i in range(3)]
    assert shares == [(0, 3), (1, 3), (2, 3)]  # one third of the 8 s window each
    for i in range(3):
        entry = entries[f"admin-{i}"]
        assert entry.schedule.max_delay == 8 and entry.schedule.name == f"admin-{i}"
        assert entry.options["headers"] == {"x-team": "data", "periodic_task_name": entry.name}
        # the next entry, built afresh from the row after a run, keeps its share
        assert next(entry).schedule.share == shares[i]
    # An admin edit (a fourth task on the schedule) is read on the next tick: quarters now.
    _admin_task("admin-3", '{"fleet_jitter": 8}')
    entries = sched.schedule
    assert [entries[f"admin-{i}"].schedule.share for i in range(4)] == [(i, 4) for i in range(4)]
    # A bad value typed in the admin: said, and the task still runs (without jitter).
    assert "periodic task 'admin-bad' headers fleet_jitter" in caplog.text
    assert "'soon'" in caplog.text
    assert not isinstance(entries["admin-bad"].schedule, Jittered)
    # A one-off clocked task has no next time to stay before: a countdown at publish.
    assert entries["admin-once"].options["fleet_jitter"] == 30
    sched.close()


def test_a_crontab_in_its_own_timezone_is_jittered_after_its_own_time(app: Any) -> None:
    from zoneinfo import ZoneInfo

    from django_celery_beat.models import CrontabSchedule

    app.conf.beat_schedule = {}
    berlin, _ = CrontabSchedule.objects.get_or_create(
        minute="0", hour="2", timezone=ZoneInfo("Europe/Berlin")
    )
    _admin_task("berlin-2am", '{"fleet_jitter": 60}', crontab=berlin)
    sched = _scheduler(app, FLEET_SCHEDULER)
    jittered = sched.schedule["berlin-2am"].schedule
    sched.close()
    utc = dt.timezone.utc
    after = dt.datetime(2026, 12, 6, 0, 30, tzinfo=utc)
    two_am_berlin = dt.datetime(2026, 12, 6, 1, 0, tzinfo=utc)  # CET = UTC+1
    assert jittered.nominal_after(after) == two_am_berlin
    assert two_am_berlin <= jittered.due_after(after) < two_am_berlin + dt.timedelta(seconds=60)


def test_a_jittered_crontab_hours_away_is_read_all_the_same(app: Any) -> None:
    # django-celery-beat reads only the crontab rows within 2 hours of now: a run jittered
    # to 3 hours after its 02:00 would be skipped once 05:00 came.
    from django.utils import timezone
    from django_celery_beat.models import CrontabSchedule

    app.conf.beat_schedule = {}
    # 12+ hours away, and not 04:00, which django-celery-beat always reads (celery's
    # cleanup task): this test failed from 16:00 to 16:59 UTC.
    hour = next(h for h in ((timezone.now().hour + k) % 24 for k in range(12, 15)) if h != 4)
    far, _ = CrontabSchedule.objects.get_or_create(minute="0", hour=str(hour), timezone="UTC")
    _admin_task("far-jittered", '{"fleet_jitter": 14400}', crontab=far)
    _admin_task("far-plain", "{}", crontab=far)
    sched = _scheduler(app, FLEET_SCHEDULER)
    assert "far-jittered" in sched.schedule
    assert "far-plain" not in sched.schedule  # django-celery-beat's own filter, unchanged
    sched.close()


def _saved_in_the_admin(name: str, headers: str, every_s: int) -> Any:
    """A periodic task added through the Django admin's form (a logged-in POST to its add
    page, as a user would), with ``headers`` typed in "AMQP Message Headers"."""
    from django.contrib.auth.models import User
    from django.test import Client
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    interval, _ = IntervalSchedule.objects.get_or_create(
        every=every_s, period=IntervalSchedule.SECONDS
    )
    user, _ = User.objects.get_or_create(
        username="admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)
    blank = ("start_time", "last_run_at", "expires")
    form = {
        "name": name, "task": "dj.ping", "enabled": "on", "interval": str(interval.pk),
        "args": "[]", "kwargs": json.dumps({"entry": name}), "headers": headers,
        **{f"{field}_{i}": "" for field in blank for i in (0, 1)},
    }  # fmt: skip
    response = client.post("/admin/django_celery_beat/periodictask/add/", form)
    assert response.status_code == 302, response.content.decode()[-3000:]  # saved
    return PeriodicTask.objects.get(name=name)


def test_the_admin_saves_a_jitter_that_the_scheduler_applies(app: Any) -> None:
    app.conf.beat_schedule = {}
    row = _saved_in_the_admin("from-the-admin", '{"fleet_jitter": 8}', every_s=10)
    assert json.loads(row.headers) == {"fleet_jitter": 8}
    sched = _scheduler(app, FLEET_SCHEDULER)
    entry = sched.schedule["from-the-admin"]
    assert isinstance(entry.schedule, Jittered) and entry.schedule.max_delay == 8
    sched.close()


# -- a real `celery beat` process ----------------------------------------------------------


def _beat(app: Any, djdb: Path, redis_url: str, scheduler: str, log: Path) -> Any:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "FLEET_DJANGO_DB": str(djdb),
        "FLEET_DJ_BROKER": redis_url,
        "FLEET_DJ_QUEUE": app.conf.task_default_queue,
    }
    cmd = [sys.executable, "-m", "celery", "-A", "tests.integration.djproject.celery_app",
           "beat", "-S", scheduler, "-l", "INFO", "--pidfile="]  # fmt: skip
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT)


def _receive(
    redis_url: str, queue: str, until: float, most: int = 10**6
) -> list[tuple[float, str, dict[str, Any]]]:
    """``(arrival time, entry, headers)`` of each message beat publishes before ``until``
    (at most ``most``), popped as it arrives (BRPOP wakes on the push)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=10)  # above BRPOP's 2 s
    got: list[tuple[float, str, dict[str, Any]]] = []
    try:
        while (left := until - time.time()) > 0 and len(got) < most:
            item = client.brpop([queue], timeout=min(2, max(1, math.ceil(left))))
            if item is None:
                continue
            arrived = time.time()
            msg = json.loads(item[1])
            body = json.loads(base64.b64decode(msg["body"]))
            got.append((arrived, body[1]["entry"], msg["headers"]))
    finally:
        client.close()
    return got


@pytest.mark.integration
@pytest.mark.slow
def test_a_real_beat_runs_jittered_database_entries(
    app: Any, djdb: Path, redis_url: str, tmp_path: Path
) -> None:
    from tests.integration.djproject.celery_app import CONFIG_JITTER_S, EVERY_S, OPTION_JITTER_S

    admin = [f"admin-{i}" for i in range(4)]
    for name in admin:  # four tasks on one interval, jittered in the admin's headers field
        _saved_in_the_admin(name, '{"fleet_jitter": 8}', every_s=EVERY_S)
    jitter = {"from-config-jittered": CONFIG_JITTER_S, "from-config-option": OPTION_JITTER_S}
    jitter.update({name: 8 for name in admin})
    # FLEET_TEST_DJ_SCHEDULER=django_celery_beat.schedulers:DatabaseScheduler runs it on the
    # plain scheduler: it fails (the jittered entry never runs, the others run on time).
    scheduler = os.environ.get("FLEET_TEST_DJ_SCHEDULER", FLEET_SCHEDULER)
    logs = [tmp_path / "beat-1.log", tmp_path / "beat-2.log"]
    proc = _beat(app, djdb, redis_url, scheduler, logs[0])
    queue = app.conf.task_default_queue
    try:
        # Beat is up when something arrives; then four whole periods on the epoch grid,
        # with beat stopped (SIGTERM, as a deploy does) and started again in the middle
        # of the third period's window.
        up = _receive(redis_url, queue, time.time() + 60, most=1)
        assert up, logs[0].read_text()
        start = (math.floor(up[0][0] / EVERY_S) + 1) * EVERY_S
        got = _receive(redis_url, queue, start + 2 * EVERY_S + 4)
        stop_processes(proc)
        proc = _beat(app, djdb, redis_url, scheduler, logs[1])
        got += _receive(redis_url, queue, start + 4 * EVERY_S + 1)
    finally:
        stop_processes(proc)
    log = "".join(path.read_text() for path in logs)
    late = 1.0  # a beat tick, a Redis push and a pop, on a busy machine
    runs: dict[tuple[str, int], list[float]] = {}
    for arrived, entry, headers in got:
        assert "fleet_jitter" not in headers, headers  # not sent on with the task
        nominal = math.floor(arrived / EVERY_S) * EVERY_S
        if nominal >= start:
            runs.setdefault((entry, nominal), []).append(arrived - nominal)
    periods = [start + k * EVERY_S for k in range(4)]
    steady = [periods[0], periods[1], periods[3]]  # beat running throughout the window
    for entry, window in jitter.items():
        for nominal in periods:  # once per nominal time, never skipped, never twice
            offsets = runs.get((entry, nominal), [])
            assert len(offsets) == 1, (entry, nominal, sorted(runs), log[-3000:])
            assert offsets[0] >= 0, (entry, offsets)  # never early
            if nominal in steady:
                assert offsets[0] < window + late, (entry, offsets, window)
    for nominal in steady:  # the four admin tasks: one quarter of the window each
        offsets = sorted(runs[(name, nominal)][0] for name in admin)
        for k, off in enumerate(offsets):
            assert k * 2 <= off < (k + 1) * 2 + late, offsets
    # and not one instant for all: the config entries' offsets differ across periods
    spread = {round(runs[("from-config-jittered", n)][0], 1) for n in steady}
    assert len(spread) > 1, spread
    assert "Cannot convert" not in log and "Traceback" not in log, log
