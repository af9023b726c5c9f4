"""Where the fleet's Redis is, from ``app.conf``: its URL, its password kept out of sight.

The fleet's Redis is ``fleet_redis_url`` (or ``Fleet(redis_url=...)``), else the broker's
when the broker is Redis, or the client ``fleet_redis_client`` gives; a ``sentinel://``
broker lends its Sentinel options. A password in the URL moves to ``fleet_redis_password``
once read (:func:`hide_url_password`), because ``celery report`` prints unknown settings
as they are. :mod:`celery_fleet.settings` calls these while it loads the settings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ..errors import ConfigError
from .connect import SCHEMES, check_transport_options, own_client, sentinel_options_of
from .sync import mask_url

__all__ = ["resolve_redis", "server_of", "split_password", "hide_url_password"]

log = logging.getLogger("celery_fleet")


def server_of(url: str) -> str:
    """``host:port`` of a URL (its first part), without credentials: which server it is."""
    try:
        netloc = urlsplit(url.split(";")[0]).netloc
    except ValueError:
        return url
    return netloc.rpartition("@")[2].lower()


def resolve_redis(
    explicit: str | None,
    client: object,
    conf: Mapping[str, Any],
    password: str | None,
    options: object,
) -> tuple[str, dict[str, Any]]:
    """The fleet's Redis URL (a description for an own client) and its transport options.

    A fleet on the broker's ``sentinel://`` URL takes the broker's Sentinel options
    (``master_name``...) unless ``fleet_redis_transport_options`` is set.
    """
    if client is not None:
        given = [
            name
            for name, value in (
                ("fleet_redis_url / redis_url", explicit or conf.get("fleet_redis_url")),
                ("fleet_redis_transport_options", options),
                ("fleet_redis_password", password),
            )
            if value
        ]
        if given:
            raise ConfigError(
                f"fleet_redis_client is set, and so is {', '.join(given)}: configure the "
                f"client itself, or set a URL instead of the client"
            )
        return own_client(client, "fleet_redis_client").url, {}
    url = _resolve_redis_url(explicit, conf)
    if options is not None:
        return url, check_transport_options(options, "fleet_redis_transport_options")
    if explicit is None and not conf.get("fleet_redis_url") and url.startswith("sentinel://"):
        return url, sentinel_options_of(conf.get("broker_transport_options"))
    return url, {}


def _resolve_redis_url(explicit: str | None, conf: Mapping[str, Any]) -> str:
    if explicit is not None:
        return _check_url(explicit, "redis_url")
    configured = conf.get("fleet_redis_url")
    if configured:
        return _check_url(configured, "fleet_redis_url")
    broker = conf.get("broker_url")
    if isinstance(broker, str) and broker.startswith(SCHEMES):
        return broker
    raise ConfigError(
        "fleet_redis_url is not set and the broker "
        f"({mask_url(broker) if isinstance(broker, str) else broker!r}) is not Redis: "
        "set app.conf.fleet_redis_url = 'redis://host:6379/1' or pass Fleet(redis_url=...)"
    )


def _check_url(url: object, setting: str) -> str:
    if not isinstance(url, str) or not url.startswith(SCHEMES):
        raise ConfigError(
            f"{setting} must be a {', '.join(SCHEMES)} URL, got "
            f"{mask_url(url) if isinstance(url, str) else url!r}"
        )
    return url


def split_password(url: str) -> tuple[str, str | None]:
    """``url`` without its password, and the password (unquoted), or ``(url, None)``.

    The password may be in the netloc (``redis://user:pw@host``) or a ``password=`` query
    option; every ``;``-separated part of a ``sentinel://`` URL loses its own. The user
    name stays. Example::

        split_password("redis://:s3cret@h:6379/1")   # ("redis://h:6379/1", "s3cret")
    """
    found: str | None = None
    parts = []
    for part in url.split(";"):
        try:
            pieces = urlsplit(part)
        except ValueError:
            return url, None  # the URL check names what is wrong with it
        netloc, query = pieces.netloc, pieces.query
        userinfo, at, hosts = netloc.rpartition("@")
        if at and ":" in userinfo:
            user, _, secret = userinfo.partition(":")
            found = found if found is not None else unquote(secret)
            netloc = f"{user}@{hosts}" if user else hosts
        pairs = parse_qsl(query, keep_blank_values=True)
        secrets = [value for key, value in pairs if key.lower() == "password"]
        if secrets:
            found = found if found is not None else secrets[0]
            query = urlencode([(k, v) for k, v in pairs if k.lower() != "password"])
        # not urlunsplit: it turns unix:///path into unix:/path
        rebuilt = f"{pieces.scheme}://{netloc}{pieces.path}" + (f"?{query}" if query else "")
        parts.append(rebuilt + (f"#{pieces.fragment}" if pieces.fragment else ""))
    if found is None:
        return url, None
    return ";".join(parts), found


def hide_url_password(conf: MutableMapping[str, Any]) -> bool:
    """Move a password out of ``conf["fleet_redis_url"]`` into ``fleet_redis_password``.

    Why: ``celery report`` and ``celery inspect conf`` print the app's configuration,
    censoring the broker's and the result backend's URLs and settings whose names contain
    PASS, KEY, SECRET or TOKEN, but not the URL of a setting Celery does not know. Once
    ``Fleet(app)`` has read the URL (its store keeps the real one), the password moves
    to ``fleet_redis_password``, which Celery censors, and the URL stays without it; a
    later ``Fleet(app)`` in the same process, or a forked child, reads the two back. A
    password in the URL wins over ``fleet_redis_password`` (as in redis-py), so the
    moved one replaces it. Returns True when something moved.
    """
    url = conf.get("fleet_redis_url")
    if not isinstance(url, str):
        return False
    bare, password = split_password(url)
    if password is None:
        return False
    options = conf.get("fleet_redis_transport_options")
    other = options.get("password") if isinstance(options, Mapping) else None
    if other is not None and other != password:
        # The transport options' password would win once the URL's is gone: leave both.
        log.warning(
            "celery-fleet: fleet_redis_url %s holds a password, which `celery report` and "
            "`celery inspect conf` print as is, and fleet_redis_transport_options another: "
            "keep only one, in fleet_redis_password",
            mask_url(url),
        )
        return False
    conf["fleet_redis_password"] = password
    conf["fleet_redis_url"] = bare
    return True
