"""App settings: unknown names, the broker's visibility timeout, and a censored password."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_fleet import ConfigError, Fleet
from celery_fleet.settings import split_password
from celery_fleet.testing.redis_server import RedisServer, free_port


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = Celery("settings-test", broker=redis_url, set_as_current=False)
    app.conf.fleet_limits = {"llm": {"rpm": 60}}
    yield app
    app.close()


@pytest.mark.parametrize(
    ("setting", "hint"),
    [
        ("fleet_limts", "fleet_limits"),
        ("fleet_namspace", "fleet_namespace"),
        ("fleet_max_wiat", "fleet_max_wait"),
        ("FLEET_LIMITS", "fleet_limits"),
    ],
)
def test_misspelt_settings_are_rejected_naming_the_closest(
    app: Celery, setting: str, hint: str
) -> None:
    app.conf[setting] = 1
    with pytest.raises(ConfigError) as info:
        Fleet(app)
    assert f"{setting!r} (did you mean {hint!r}?)" in str(info.value)


def test_a_countdown_the_broker_would_redeliver_is_refused(app: Celery) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 120}
    app.conf.fleet_max_countdown = 300
    with pytest.raises(ConfigError, match="visibility_timeout = 120 s"):
        Fleet(app)
    app.conf.fleet_max_countdown = 60
    assert Fleet(app).max_countdown_s == 60


def test_fleet_redis_health_timeout_bounds_every_call_and_refuses_absurd_values(
    app: Celery,
) -> None:
    assert Fleet(app).store.health_s == 1.5
    app.conf.fleet_redis_health_timeout = 0.3
    assert Fleet(app).store.health_s == 0.3
    for bad in (0, -1, float("nan"), float("inf"), 10**400, "soon"):
        app.conf.fleet_redis_health_timeout = bad
        with pytest.raises(ConfigError, match="fleet_redis_health_timeout"):
            Fleet(app)


def test_the_default_visibility_timeout_is_checked_too(app: Celery) -> None:
    app.conf.fleet_max_countdown = 3600  # kombu's default visibility_timeout is 3600 s
    with pytest.raises(ConfigError, match="visibility_timeout = 3600 s"):
        Fleet(app)


def test_fleet_redis_password_is_used_and_censored_by_celery(redis_url: str) -> None:
    """`celery report` and `celery inspect conf` print app.conf through Celery's censor,
    which masks setting names containing PASS: the password goes there, not in the URL."""
    from celery.app.utils import filter_hidden_settings

    port = free_port()
    app = Celery("pw", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.fleet_redis_url = f"redis://127.0.0.1:{port}/1"
    app.conf.fleet_redis_password = "s3cret"
    app.conf.fleet_limits = {"llm": {"rpm": 60}}
    fleet = Fleet(app)
    assert fleet.store.client.connection_pool.connection_kwargs["password"] == "s3cret"
    shown = str(app.conf.table(with_defaults=False)) + app.conf.humanize()
    assert "s3cret" not in shown
    assert filter_hidden_settings({"fleet_redis_password": "x"}) == {
        "fleet_redis_password": "********"
    }
    assert "s3cret" not in repr(fleet)
    app.close()


@pytest.mark.fast
@pytest.mark.parametrize(
    ("url", "bare", "password"),
    [
        ("redis://:s3cret@h:6379/1", "redis://h:6379/1", "s3cret"),
        ("redis://user:p%40ss@h/0?socket_timeout=3", "redis://user@h/0?socket_timeout=3", "p@ss"),
        ("redis://h/0?password=x&socket_timeout=2", "redis://h/0?socket_timeout=2", "x"),
        ("unix:///tmp/r.sock?password=x&db=1", "unix:///tmp/r.sock?db=1", "x"),
        (
            "sentinel://:pw@h1:26379;sentinel://:pw@h2:26379",
            "sentinel://h1:26379;sentinel://h2:26379",
            "pw",
        ),
        ("redis+cluster://u:pw@h1:1,h2:2/0", "redis+cluster://u@h1:1,h2:2/0", "pw"),
        ("redis://user@h:6379", "redis://user@h:6379", None),
    ],
)
def test_split_password(url: str, bare: str, password: str | None) -> None:
    assert split_password(url) == (bare, password)


@pytest.mark.fast
def test_a_password_in_fleet_redis_url_is_moved_out_of_the_printed_configuration() -> None:
    """`celery report` / `celery inspect conf` printed fleet_redis_url with its password:
    Celery censors only the broker's and backend's URLs and names with PASS, KEY..."""
    from celery.app.utils import bugreport

    with RedisServer(password="s3cr3t-pw") as server:
        app = Celery("pw", broker="memory://", set_as_current=False)
        app.conf.fleet_redis_url = f"{server.url}/0"
        app.conf.fleet_redis_transport_options = {"socket_timeout": 5}
        fleet = Fleet(app)
        fleet.check()  # the store kept the real URL
        assert app.conf.fleet_redis_url == f"redis://127.0.0.1:{server.port}/0"
        assert app.conf.fleet_redis_password == "s3cr3t-pw"
        shown = bugreport(app) + str(app.conf.table(with_defaults=False)) + app.conf.humanize()
        assert "s3cr3t-pw" not in shown
        assert f"127.0.0.1:{server.port}" in shown
        # Celery censors a password inside the transport options itself (nested keys).
        app.conf.fleet_redis_transport_options = {"sentinel_kwargs": {"password": "sentinel-pw"}}
        assert "sentinel-pw" not in bugreport(app) + str(app.conf.table(with_defaults=False))
        app.conf.fleet_redis_transport_options = {"socket_timeout": 5}
        Fleet(app).check()  # a later Fleet(app) reads the two settings back and connects
        fleet.reset_connections()  # as a forked child does
        fleet.check()
        app.close()


def test_a_password_also_in_the_transport_options_is_left_with_a_warning(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    app.conf.fleet_redis_url = "redis://:s3cret@127.0.0.1:6379/9"
    app.conf.fleet_redis_transport_options = {"password": "other"}
    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        Fleet(app)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "fleet_redis_password" in messages and "s3cret" not in messages
    assert app.conf.fleet_redis_url == "redis://:s3cret@127.0.0.1:6379/9"  # the URL's wins
