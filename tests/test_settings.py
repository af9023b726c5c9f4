"""App settings: the one table and what is made from it (the loader, the keyword
overrides, the reference page), unknown names, the broker's visibility timeout, and a
censored password."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_fleet import ConfigError, Fleet
from celery_fleet.settings import (
    ALL_SETTINGS,
    KEYWORDS,
    FleetSettings,
    Setting,
    load_settings,
    settings_reference_markdown,
    split_password,
)
from celery_fleet.testing.redis_server import RedisServer, free_port

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
REGENERATE = "regenerate it: python -m celery_fleet.settings > docs/settings.md"
# A Redis broker: every setting then has a default, and nothing here connects.
BASE = {"broker_url": "redis://127.0.0.1:6379/0"}


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


def _example(setting: Setting) -> Any:
    """The table's example value of ``setting`` (Python source), evaluated."""
    return eval(setting.example, {"redis": redis})  # our own table, not input


def test_the_reference_page_names_every_setting() -> None:
    page = REFERENCE.read_text()
    missing = [s.name for s in ALL_SETTINGS if f"### `{s.name}`" not in page]
    assert not missing, f"docs/settings.md lacks {missing}: {REGENERATE}"


def test_the_reference_page_is_what_the_table_generates() -> None:
    assert REFERENCE.read_text() == settings_reference_markdown(), f"stale: {REGENERATE}"


@pytest.mark.parametrize("setting", ALL_SETTINGS, ids=lambda s: s.name)
def test_every_setting_in_the_table_is_read_by_load_settings(setting: Setting) -> None:
    """Its example value, set alone, reaches its FleetSettings field."""
    default = getattr(load_settings(BASE), setting.field)
    given = getattr(load_settings({**BASE, setting.name: _example(setting)}), setting.field)
    assert given != default, f"load_settings ignores {setting.name}"


def test_each_fleet_settings_field_comes_from_one_setting() -> None:
    fields = [s.field for s in ALL_SETTINGS]
    assert len(set(fields)) == len(fields)
    assert set(fields) == {f.name for f in dataclasses.fields(FleetSettings)}
    assert len({s.name for s in ALL_SETTINGS}) == len(ALL_SETTINGS)


def test_fleet_takes_a_keyword_for_each_setting_that_has_one() -> None:
    params = inspect.signature(Fleet.__init__).parameters
    keywords = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"clock"}
    assert keywords == set(KEYWORDS)


@pytest.mark.parametrize("keyword", sorted(KEYWORDS))
def test_a_keyword_override_fills_the_field_of_its_setting(keyword: str) -> None:
    setting = KEYWORDS[keyword]
    value = _example(setting)
    from_conf = getattr(load_settings({**BASE, setting.name: value}), setting.field)
    from_keyword = getattr(load_settings(BASE, **{keyword: value}), setting.field)
    assert from_keyword == from_conf != getattr(load_settings(BASE), setting.field)


def test_a_keyword_override_wins_over_app_conf() -> None:
    conf = {**BASE, "fleet_namespace": "from-conf", "fleet_max_wait": 5}
    settings = load_settings(conf, namespace="from-keyword", max_wait=None)
    assert (settings.namespace, settings.max_wait_s) == ("from-keyword", 5)


def test_load_settings_refuses_a_keyword_no_setting_has() -> None:
    with pytest.raises(TypeError, match="namespaces"):
        load_settings(BASE, namespaces="x")
