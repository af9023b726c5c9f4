"""The app-level ``fleet_*`` settings, read and validated once into :class:`FleetSettings`.

``Fleet(app)`` reads them from ``app.conf`` (keyword arguments override them). Every
mistake is a :class:`~celery_fleet.ConfigError` naming the setting, raised at start-up:
an unknown ``fleet_*`` setting names the closest known one (``fleet_limts`` ->
``fleet_limits``), and a reschedule countdown the broker would redeliver is refused.

Example::

    app.conf.fleet_redis_url = "redis://fleet-redis:6379/1"
    app.conf.fleet_redis_password = "s3cret"     # censored by `celery report` / `inspect conf`
    settings = load_settings(app.conf)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .admission.config import LimitConfig, parse_limits
from .checks import MAX_SECONDS, check_max_wait, check_name, check_port, number, suggest
from .durability.steps import DEFAULT_STEP_MAX_BYTES, DEFAULT_STEP_TTL_S
from .errors import ConfigError
from .resilience.fallback import check_policy
from .store.connect import SCHEMES, check_transport_options, own_client, sentinel_options_of
from .store.sync import HEALTH_S, has_password, mask_url

__all__ = [
    "FleetSettings",
    "load_settings",
    "SETTINGS",
    "DEFAULT_MAX_WAIT_S",
    "DEFAULT_MAX_COUNTDOWN_S",
    "BACKOFF",
    "DEFER_MODES",
    "visibility_timeout",
    "hide_url_password",
    "defer_signing_key",
    "split_password",
]

log = logging.getLogger("celery_fleet")

DEFAULT_MAX_WAIT_S = 30.0
DEFAULT_MAX_COUNTDOWN_S = 300.0
DEFAULT_BACKOFF_BASE_S = 0.1
DEFAULT_BACKOFF_MAX_S = 30.0
#: ``fleet_defer``: keep rescheduled tasks in the fleet's Redis until due (published by the
#: leader's pump, see pump.py), or publish them at once with a countdown (an ETA message).
DEFER_MODES = ("redis", "countdown")
#: How reschedule countdowns grow with the reschedule count (``fleet_backoff``).
BACKOFF = ("full", "decorrelated")
#: Kombu's default visibility timeout of the Redis and SQS transports (seconds).
DEFAULT_VISIBILITY_TIMEOUT_S = 3600.0
_REDIS_SCHEMES = SCHEMES  # redis, rediss, unix, sentinel, redis+cluster, rediss+cluster
# Brokers that hand an unacknowledged message to another consumer after a visibility
# timeout: an ETA longer than that is delivered again and again (kombu#337).
_VISIBILITY_BROKERS = ("redis://", "rediss://", "sentinel://", "sqs://", "unix://")

#: Every app setting celery-fleet reads, with what it means.
SETTINGS = {
    "fleet_redis_url": "Redis URL of the fleet's shared state (default: the broker URL)",
    "fleet_redis_password": "password for fleet_redis_url, kept out of the URL",
    "fleet_redis_transport_options": "for fleet_redis_url: Sentinel master_name, sentinel_kwargs, "
    "min_other_sentinels, socket timeouts (default with the broker's sentinel:// URL: "
    "its broker_transport_options' Sentinel options)",
    "fleet_redis_client": "a redis.Redis or RedisCluster client, or a zero-argument factory "
    "of one (called in each process), instead of fleet_redis_url",
    "fleet_redis_health_timeout": "seconds a call to the fleet's Redis may go unanswered "
    "before Redis counts as away and fleet_store_down answers (default 1.5; a frozen Redis "
    "is an outage like a dead one)",
    "fleet_namespace": "prefix of every Redis key (default 'fleet')",
    "fleet_limits": "limit name -> options",
    "fleet_max_wait": "seconds fleet.slot() waits for admission in place (default 30)",
    "fleet_max_countdown": "the longest reschedule countdown in seconds (default 300)",
    "fleet_step_ttl": "seconds a task's durable step results are kept (default 7 days)",
    "fleet_step_max_bytes": "the largest JSON result one durable step may store (default 1 MiB)",
    "fleet_backoff": "reschedule backoff: 'full' (default) or 'decorrelated' jitter",
    "fleet_backoff_base": "seconds of the first reschedule backoff, doubling after (default 0.1)",
    "fleet_backoff_max": "seconds the reschedule backoff grows to at most (default 30)",
    "fleet_step_jitter": "seconds: a random delay in [0, x) before each slot request (default 0)",
    "fleet_dedupe_ttl": "seconds an idempotency key's record is kept after its last event (1 day)",
    "fleet_claim_lease": "seconds a running key's claim lives without renewal (default 15)",
    "fleet_metrics_port": "TCP port a worker serves Prometheus /metrics on (default: none)",
    "fleet_defer": "where rescheduled tasks wait: 'redis' (default; published when due by the "
    "fleet's leader) or 'countdown' (an ETA message)",
    "fleet_pump_period": "seconds between two rounds of the deferred-task pump (default 1)",
    "fleet_pump_lease": "seconds of the pump leader's lease: the failover time (default 15)",
    "fleet_defer_signing_key": "secret (str or bytes) the deferred tasks in the fleet's Redis "
    "are signed with (default: derived from the broker URL, password included)",
    "fleet_store_down": "while the fleet's Redis is unreachable: 'local' (default), 'open', "
    "'closed'",
    "fleet_expected_processes": "fleet processes sharing the budgets when Redis is unreachable "
    "(default: the number last seen live)",
}


@dataclass(frozen=True)
class FleetSettings:
    """The validated ``fleet_*`` settings of one Fleet."""

    redis_url: str
    namespace: str
    limits: dict[str, LimitConfig]
    max_wait_s: float
    max_countdown_s: float
    redis_password: str | None = field(default=None, repr=False)
    step_ttl_s: float = DEFAULT_STEP_TTL_S
    step_max_bytes: int = DEFAULT_STEP_MAX_BYTES
    backoff: str = "full"
    backoff_base_s: float = DEFAULT_BACKOFF_BASE_S
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S
    step_jitter_s: float = 0.0
    dedupe_ttl_s: float = 86_400.0
    claim_lease_s: float = 15.0
    store_down: str = "local"
    defer: str = "redis"
    pump_period_s: float = 1.0
    pump_lease_s: float = 15.0
    expected_processes: int | None = None
    #: ``fleet_redis_health_timeout``: the longest a call waits for Redis's reply (s).
    health_timeout_s: float = HEALTH_S
    #: The HMAC key of deferred items (:func:`defer_signing_key`).
    defer_signing_key: bytes | None = field(default=None, repr=False)
    redis_transport_options: dict[str, Any] = field(default_factory=dict, repr=False)
    #: The user's own client or factory (``fleet_redis_client``); ``redis_url`` then
    #: describes where it connects.
    redis_client: Any = field(default=None, repr=False)


def load_settings(
    conf: Mapping[str, Any],
    *,
    redis_url: str | None = None,
    limits: Mapping[str, Any] | None = None,
    namespace: str | None = None,
    max_wait: float | None = None,
    store_down: str | None = None,
    redis_client: Any = None,
    redis_transport_options: Mapping[str, Any] | None = None,
) -> FleetSettings:
    """Read and validate the ``fleet_*`` settings of ``conf``; keyword arguments win."""
    reject_unknown_settings(conf)
    password = conf.get("fleet_redis_password")
    if password is not None and not isinstance(password, str):
        raise ConfigError("fleet_redis_password must be a string")
    client = redis_client if redis_client is not None else conf.get("fleet_redis_client")
    transport_options = (
        redis_transport_options
        if redis_transport_options is not None
        else conf.get("fleet_redis_transport_options")
    )
    url, transport = _resolve_redis(redis_url, client, conf, password, transport_options)
    max_countdown = number(
        conf.get("fleet_max_countdown", DEFAULT_MAX_COUNTDOWN_S),
        "fleet_max_countdown",
        lo_open=0.0,
        hi=MAX_SECONDS,
    )
    check_visibility_timeout(conf, max_countdown)
    check_port(conf.get("fleet_metrics_port"), "fleet_metrics_port")
    backoff = conf.get("fleet_backoff", "full")
    if backoff not in BACKOFF:
        raise ConfigError(f"fleet_backoff must be one of {BACKOFF}, got {backoff!r}")
    backoff_max = number(
        conf.get("fleet_backoff_max", DEFAULT_BACKOFF_MAX_S),
        "fleet_backoff_max",
        lo_open=0.0,
        hi=MAX_SECONDS,
    )
    expected = conf.get("fleet_expected_processes")
    if expected is not None:
        if isinstance(expected, bool) or not isinstance(expected, int):
            raise ConfigError(f"fleet_expected_processes must be an int, got {expected!r}")
        expected = int(number(expected, "fleet_expected_processes", lo=1.0, hi=1_000_000.0))
    return FleetSettings(
        store_down=check_policy(
            store_down if store_down is not None else conf.get("fleet_store_down", "local")
        ),
        expected_processes=expected,
        health_timeout_s=number(
            conf.get("fleet_redis_health_timeout", HEALTH_S),
            "fleet_redis_health_timeout",
            lo=0.05,
            hi=60.0,
        ),
        backoff=backoff,
        backoff_max_s=min(backoff_max, max_countdown),
        backoff_base_s=number(
            conf.get("fleet_backoff_base", DEFAULT_BACKOFF_BASE_S),
            "fleet_backoff_base",
            lo_open=0.0,
            hi=min(backoff_max, max_countdown),
        ),
        dedupe_ttl_s=number(
            conf.get("fleet_dedupe_ttl", 86_400.0), "fleet_dedupe_ttl", lo=1.0, hi=MAX_SECONDS
        ),
        claim_lease_s=number(
            conf.get("fleet_claim_lease", 15.0), "fleet_claim_lease", lo=1.0, hi=86_400.0
        ),
        step_jitter_s=number(
            conf.get("fleet_step_jitter", 0.0), "fleet_step_jitter", lo=0.0, hi=60.0
        ),
        defer=_check_defer(conf.get("fleet_defer", "redis")),
        pump_period_s=number(
            conf.get("fleet_pump_period", 1.0), "fleet_pump_period", lo=0.05, hi=60.0
        ),
        pump_lease_s=number(
            conf.get("fleet_pump_lease", 15.0), "fleet_pump_lease", lo=1.0, hi=600.0
        ),
        defer_signing_key=defer_signing_key(conf, url),
        redis_url=url,
        namespace=check_name(
            namespace if namespace is not None else conf.get("fleet_namespace") or "fleet",
            "fleet_namespace",
        ),
        limits=parse_limits(
            limits if limits is not None else conf.get("fleet_limits"),
            "limits" if limits is not None else "fleet_limits",
        ),
        max_wait_s=check_max_wait(
            max_wait if max_wait is not None else conf.get("fleet_max_wait", DEFAULT_MAX_WAIT_S),
            "fleet_max_wait",
        ),
        max_countdown_s=max_countdown,
        redis_password=password,
        redis_transport_options=transport,
        redis_client=client,
        step_ttl_s=number(
            conf.get("fleet_step_ttl", DEFAULT_STEP_TTL_S), "fleet_step_ttl", lo=1.0, hi=MAX_SECONDS
        ),
        step_max_bytes=int(
            number(
                conf.get("fleet_step_max_bytes", DEFAULT_STEP_MAX_BYTES),
                "fleet_step_max_bytes",
                lo=1.0,
                hi=512 * 1024 * 1024,
            )
        ),
    )


def defer_signing_key(conf: Mapping[str, Any], fleet_url: str = "") -> bytes | None:
    """The key deferred items are signed with: from ``fleet_defer_signing_key``, else from
    the broker URL (its password, if any, is the secret), else None.

    Every process of the app (workers, and whatever reschedules) derives the same key. A
    key derived from a broker URL without a password only proves integrity: someone who
    can write to the fleet's Redis and knows that URL can sign; set
    ``fleet_defer_signing_key`` when the fleet's Redis is not the broker's.
    """
    given = conf.get("fleet_defer_signing_key")
    if given is not None:
        if isinstance(given, str):
            given = given.encode()
        if not isinstance(given, bytes) or len(given) < 16:
            raise ConfigError(
                "fleet_defer_signing_key must be a str or bytes of at least 16 characters "
                "(a random secret, the same in every process of the app)"
            )
        return hashlib.sha256(b"celery-fleet defer key\0" + given).digest()
    broker = conf.get("broker_url")
    if not isinstance(broker, str) or not broker:
        return None
    if (
        conf.get("fleet_defer", "redis") == "redis"
        and not has_password(broker)
        and _server(broker) != _server(fleet_url)
    ):
        log.warning(
            "celery-fleet: the fleet's Redis (%s) is not the broker's, and deferred tasks are "
            "signed with a key derived from the broker URL, which has no password: whoever "
            "can write to the fleet's Redis and knows that URL could add a task the pump "
            "publishes. Set fleet_defer_signing_key to a random secret",
            mask_url(fleet_url),
        )
    return hashlib.sha256(b"celery-fleet defer broker\0" + broker.encode()).digest()


def _server(url: str) -> str:
    """``host:port`` of a URL (its first part), without credentials: which server it is."""
    try:
        netloc = urlsplit(url.split(";")[0]).netloc
    except ValueError:
        return url
    return netloc.rpartition("@")[2].lower()


def _check_defer(value: object) -> str:
    if value not in DEFER_MODES:
        raise ConfigError(f"fleet_defer must be one of {DEFER_MODES}, got {value!r}")
    return str(value)


def reject_unknown_settings(conf: Mapping[str, Any]) -> None:
    """Raise naming every ``fleet_*`` setting celery-fleet does not know (any case)."""
    unknown = sorted(
        key
        for key in list(conf.keys())
        if isinstance(key, str) and key.lower().startswith("fleet_") and key not in SETTINGS
    )
    if unknown:
        raise ConfigError(
            f"unknown celery-fleet setting(s) {suggest(unknown, SETTINGS)}; "
            f"known: {sorted(SETTINGS)}"
        )


def visibility_timeout(conf: Mapping[str, Any]) -> float | None:
    """The broker's ``visibility_timeout`` in seconds when it redelivers unacknowledged
    messages (Redis, SQS), else None. A message waiting for its ETA is unacknowledged."""
    broker = conf.get("broker_url")
    if not isinstance(broker, str) or not broker.startswith(_VISIBILITY_BROKERS):
        return None
    options = conf.get("broker_transport_options") or {}
    visibility = options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT_S)
    if isinstance(visibility, bool) or not isinstance(visibility, (int, float)):
        return None
    return float(visibility)


def check_visibility_timeout(conf: Mapping[str, Any], max_countdown_s: float) -> None:
    """Refuse a reschedule countdown the broker would redeliver before it is due.

    With the Redis (and SQS) broker a message waiting for its ETA is unacknowledged; past
    ``visibility_timeout`` the broker hands it to another worker too, so the task runs
    twice. Every countdown celery-fleet sets is at most ``fleet_max_countdown``.
    """
    visibility = visibility_timeout(conf)
    if visibility is not None and max_countdown_s >= visibility:
        raise ConfigError(
            f"fleet_max_countdown = {max_countdown_s:g} s is not below the broker's "
            f"visibility_timeout = {visibility:g} s: a rescheduled task would be delivered "
            f"again before its countdown ends and run twice. Lower fleet_max_countdown or "
            f"raise broker_transport_options['visibility_timeout']"
        )


def _resolve_redis(
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
    if isinstance(broker, str) and broker.startswith(_REDIS_SCHEMES):
        return broker
    raise ConfigError(
        "fleet_redis_url is not set and the broker "
        f"({mask_url(broker) if isinstance(broker, str) else broker!r}) is not Redis: "
        "set app.conf.fleet_redis_url = 'redis://host:6379/1' or pass Fleet(redis_url=...)"
    )


def _check_url(url: object, setting: str) -> str:
    if not isinstance(url, str) or not url.startswith(_REDIS_SCHEMES):
        raise ConfigError(
            f"{setting} must be a {', '.join(_REDIS_SCHEMES)} URL, got "
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
