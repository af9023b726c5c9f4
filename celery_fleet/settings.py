"""The app-level ``fleet_*`` settings, declared once in :data:`ALL_SETTINGS`.

``Fleet(app)`` reads them from ``app.conf`` (its keyword arguments override some), checks
them all at once and keeps the result in a frozen :class:`FleetSettings`. Every mistake is
a :class:`~celery_fleet.ConfigError` naming the setting and the bad value, raised at
start-up: an unknown ``fleet_*`` setting names the closest known one (``fleet_limts`` ->
``fleet_limits``), and a reschedule countdown the broker would redeliver is refused.

Each :class:`Setting` in the table says its name, type, default, accepted values, the
``Fleet(...)`` keyword that overrides it and what it does; :func:`load_settings`, the
misspelling check, the keyword overrides and the reference page (``docs/settings.md``,
from :func:`settings_reference_markdown`) are all read off it, as Celery reads
``celery/app/defaults.py``. Regenerate the page after changing the table::

    python -m celery_fleet.settings > docs/settings.md

Example::

    app.conf.fleet_redis_url = "redis://fleet-redis:6379/1"
    app.conf.fleet_redis_password = "s3cret"     # censored by `celery report` / `inspect conf`
    settings = load_settings(app.conf)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .admission.config import LimitConfig, parse_limits
from .checks import (
    MAX_SECONDS,
    Check,
    Count,
    Number,
    OneOf,
    check_max_wait,
    check_name,
    check_port,
    number_text,
    suggest,
)
from .distribution.ring import (
    DEFAULT_AFFINITY_LEASE_S,
    DEFAULT_AFFINITY_QUEUES,
    DEFAULT_STEAL_THRESHOLD,
    MAX_AFFINITY_QUEUES,
    MODES,
)
from .durability.steps import DEFAULT_STEP_MAX_BYTES, DEFAULT_STEP_TTL_S
from .errors import ConfigError
from .resilience.fallback import POLICIES
from .store.connect import SCHEMES
from .store.sync import HEALTH_S, has_password, mask_url
from .store.urls import hide_url_password, resolve_redis, server_of, split_password

__all__ = [
    "FleetSettings",
    "load_settings",
    "Setting",
    "ALL_SETTINGS",
    "SETTINGS",
    "KEYWORDS",
    "settings_reference_markdown",
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
# Brokers that hand an unacknowledged message to another consumer after a visibility
# timeout: an ETA longer than that is delivered again and again (kombu#337).
_VISIBILITY_BROKERS = ("redis://", "rediss://", "sentinel://", "sqs://", "unix://")


Rule = Number | Count | OneOf | Check
#: A step joining a setting with others: ``then(parsed, conf, overrides)``.
Then = Callable[[dict[str, Any], Mapping[str, Any], Mapping[str, Any]], None]


def _password(value: object, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    return value


def _connect_to(
    parsed: dict[str, Any], conf: Mapping[str, Any], overrides: Mapping[str, Any]
) -> None:
    """Resolve the four connection settings together (see :func:`_resolve_redis`)."""
    parsed["fleet_redis_url"], parsed["fleet_redis_transport_options"] = resolve_redis(
        overrides.get("redis_url"),
        parsed["fleet_redis_client"],
        conf,
        parsed["fleet_redis_password"],
        parsed["fleet_redis_transport_options"],
    )


def _below_visibility_timeout(
    parsed: dict[str, Any], conf: Mapping[str, Any], overrides: Mapping[str, Any]
) -> None:
    check_visibility_timeout(conf, parsed["fleet_max_countdown"])


#: The values of ``fleet_trace_admissions`` (observability/tracing.py).
TRACE_MODES = ("waits", "all", "off")


def _trace_mode(value: object, where: str) -> str | None:
    if value is not None and value not in TRACE_MODES:
        raise ConfigError(f"{where} must be one of {TRACE_MODES}, got {value!r}")
    return None if value is None else str(value)


def _whole(lo: int, hi: int) -> Check:
    """A rule for an int from ``lo`` to ``hi`` (not a bool, not a float)."""

    def check(value: object, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{where} must be an int from {lo} to {hi}, got {value!r}")
        return value

    return Check(check, f"an int from {lo} to {hi}")


def _signing_key(
    parsed: dict[str, Any], conf: Mapping[str, Any], overrides: Mapping[str, Any]
) -> None:
    parsed["fleet_defer_signing_key"] = defer_signing_key(conf, parsed["fleet_redis_url"])


# -- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One ``fleet_*`` app setting: everything celery-fleet says and does about it.

    ``field`` is its :class:`FleetSettings` attribute; ``keyword`` the ``Fleet(...)``
    argument that overrides it (None: no keyword); ``example`` a valid non-default value as
    Python source (the reference shows it, a test loads it); ``default_text`` describes a
    default that is not a plain value. ``blank_is_default``: an empty value in
    ``app.conf`` (``""``, None) means the default. ``names_keyword``: an error in a keyword
    override names the keyword rather than the setting. ``then`` runs once the setting is
    checked, for a check that joins it with settings before it or with the broker's
    (``then(parsed, conf, overrides)`` may replace values in ``parsed``).

    Example (a new setting is one more entry in :data:`ALL_SETTINGS`, one more
    :class:`FleetSettings` field, and a regenerated ``docs/settings.md``)::

        Setting(
            name="fleet_pump_lease", section=_RESCHEDULE, type="float, seconds",
            default=15.0, rule=Number(lo=1.0, hi=600.0), field="pump_lease_s",
            doc="The pump leader's lease: ...", example="30",
        )
    """

    name: str
    section: str
    type: str
    default: Any
    rule: Rule
    field: str
    doc: str
    example: str
    keyword: str | None = None
    default_text: str | None = None
    blank_is_default: bool = False
    names_keyword: bool = False
    then: Then | None = None

    def given(self, conf: Mapping[str, Any], overrides: Mapping[str, Any]) -> tuple[Any, str]:
        """The value to check (a keyword override wins over ``app.conf``) and the name an
        error about it gives."""
        if self.keyword is not None and overrides.get(self.keyword) is not None:
            return overrides[self.keyword], self.keyword if self.names_keyword else self.name
        value = conf.get(self.name, self.default)
        if self.blank_is_default:
            value = value or self.default
        return value, self.name


_CONNECTION = "Connection"
_ADMISSION = "Admission and waiting"
_RESCHEDULE = "Rescheduling"
_DURABILITY = "Durable steps and idempotency"
_OUTAGE = "When the fleet's Redis is away"
_METRICS = "Metrics"
_DISTRIBUTION = "Distribution: who runs where"

#: Every app setting celery-fleet reads, in the order they are checked (a setting whose
#: bounds name another comes after it).
ALL_SETTINGS: tuple[Setting, ...] = (
    Setting(
        name="fleet_redis_url",
        section=_CONNECTION,
        type="str (URL)",
        default=None,
        rule=Check(None, f"a {', '.join(f'`{s}`' for s in SCHEMES)} URL"),
        field="redis_url",
        keyword="redis_url",
        blank_is_default=True,
        names_keyword=True,
        default_text="the broker URL when the broker is Redis",
        doc="Redis of the fleet's shared state: `sentinel://` takes the master name from "
        "`fleet_redis_transport_options`, `redis+cluster://` a Redis Cluster.",
        example='"redis://fleet-redis:6379/1"',
    ),
    Setting(
        name="fleet_redis_password",
        section=_CONNECTION,
        type="str",
        default=None,
        rule=Check(_password, "a str"),
        field="redis_password",
        doc="Password of `fleet_redis_url`, kept out of the URL: Celery censors it in "
        "`celery report` and `celery inspect conf` (a password inside the URL is moved here).",
        example='"s3cret"',
    ),
    Setting(
        name="fleet_redis_transport_options",
        section=_CONNECTION,
        type="dict",
        default=None,
        rule=Check(None, "a dict of Sentinel and connection options"),
        field="redis_transport_options",
        keyword="redis_transport_options",
        default_text="with the broker's `sentinel://` URL, its `broker_transport_options`' "
        "Sentinel options; else none",
        doc="Options of `fleet_redis_url`: Sentinel `master_name`, `sentinel_kwargs`, "
        "`min_other_sentinels`, socket timeouts.",
        example='{"socket_timeout": 2.0}',
    ),
    Setting(
        name="fleet_redis_client",
        section=_CONNECTION,
        type="redis.Redis, RedisCluster or factory",
        default=None,
        rule=Check(
            None,
            "a client, or a zero-argument callable returning one; not with "
            "`fleet_redis_url`, its password or transport options",
        ),
        field="redis_client",
        keyword="redis_client",
        then=_connect_to,
        doc="A client you built, or a factory of one called in each process (again after a "
        "fork), used instead of `fleet_redis_url`.",
        example='lambda: redis.Redis(host="fleet-redis", db=1)',
    ),
    Setting(
        name="fleet_redis_health_timeout",
        section=_CONNECTION,
        type="float, seconds",
        default=HEALTH_S,
        rule=Number(lo=0.05, hi=60.0),
        field="health_timeout_s",
        doc="How long a call to the fleet's Redis may go unanswered before Redis counts as "
        "away and `fleet_store_down` answers (a frozen Redis is an outage like a dead one).",
        example="3.0",
    ),
    Setting(
        name="fleet_namespace",
        section=_CONNECTION,
        type="str",
        default="fleet",
        rule=Check(check_name, "1-100 letters, digits and `_.:/@+-`"),
        field="namespace",
        keyword="namespace",
        blank_is_default=True,
        doc="Prefix of every Redis key: fleets sharing one Redis keep apart by it.",
        example='"billing-fleet"',
    ),
    Setting(
        name="fleet_limits",
        section=_ADMISSION,
        type="dict",
        default=None,
        rule=Check(parse_limits, "limit name -> options (`rpm`, `tpm`, `max_in_flight`...)"),
        field="limits",
        keyword="limits",
        names_keyword=True,
        default_text="no limits",
        doc="The limits tasks and slots are admitted by: each name's budgets, concurrency, "
        "headroom, breaker and adaptive options.",
        example='{"openai": {"rpm": 500, "tpm": 200_000, "max_in_flight": 20}}',
    ),
    Setting(
        name="fleet_max_wait",
        section=_ADMISSION,
        type="float, seconds",
        default=DEFAULT_MAX_WAIT_S,
        rule=Check(check_max_wait, f">= 0, <= {MAX_SECONDS}, or `math.inf` (no deadline)"),
        field="max_wait_s",
        keyword="max_wait",
        doc="How long `fleet.slot()` (and a task's first slot) waits for admission in place "
        "before it gives up or reschedules.",
        example="10",
    ),
    Setting(
        name="fleet_step_jitter",
        section=_ADMISSION,
        type="float, seconds",
        default=0.0,
        rule=Number(lo=0.0, hi=60.0),
        field="step_jitter_s",
        doc="A random delay in [0, x) before each slot request, spreading steps that would "
        "start together.",
        example="0.2",
    ),
    Setting(
        name="fleet_max_countdown",
        section=_RESCHEDULE,
        type="float, seconds",
        default=DEFAULT_MAX_COUNTDOWN_S,
        rule=Number(lo_open=0.0, hi=MAX_SECONDS),
        field="max_countdown_s",
        then=_below_visibility_timeout,
        doc="The longest reschedule countdown; it must be below the broker's "
        "`visibility_timeout`, or the broker delivers the waiting task again.",
        example="600",
    ),
    Setting(
        name="fleet_backoff",
        section=_RESCHEDULE,
        type="str",
        default="full",
        rule=OneOf(BACKOFF),
        field="backoff",
        doc="How reschedule countdowns grow with the reschedule count: full or decorrelated "
        "jitter.",
        example='"decorrelated"',
    ),
    Setting(
        name="fleet_backoff_max",
        section=_RESCHEDULE,
        type="float, seconds",
        default=DEFAULT_BACKOFF_MAX_S,
        rule=Number(lo_open=0.0, hi=MAX_SECONDS, capped_by=("fleet_max_countdown",)),
        field="backoff_max_s",
        doc="The longest a reschedule backoff grows to.",
        example="60",
    ),
    Setting(
        name="fleet_backoff_base",
        section=_RESCHEDULE,
        type="float, seconds",
        default=DEFAULT_BACKOFF_BASE_S,
        rule=Number(lo_open=0.0, at_most=("fleet_backoff_max",)),
        field="backoff_base_s",
        doc="The first reschedule backoff, doubling with each reschedule after.",
        example="0.5",
    ),
    Setting(
        name="fleet_defer",
        section=_RESCHEDULE,
        type="str",
        default="redis",
        rule=OneOf(DEFER_MODES),
        field="defer",
        doc="Where rescheduled tasks wait: in the fleet's Redis, published when due by the "
        "fleet's leader, or at the broker as an ETA message (`'countdown'`).",
        example='"countdown"',
    ),
    Setting(
        name="fleet_pump_period",
        section=_RESCHEDULE,
        type="float, seconds",
        default=1.0,
        rule=Number(lo=0.05, hi=60.0),
        field="pump_period_s",
        doc="Time between two rounds of the pump that publishes due deferred tasks.",
        example="0.5",
    ),
    Setting(
        name="fleet_pump_lease",
        section=_RESCHEDULE,
        type="float, seconds",
        default=15.0,
        rule=Number(lo=1.0, hi=600.0),
        field="pump_lease_s",
        doc="The pump leader's lease: how long until another process takes over from a "
        "leader that died.",
        example="30",
    ),
    Setting(
        name="fleet_defer_signing_key",
        section=_RESCHEDULE,
        type="str or bytes",
        default=None,
        rule=Check(None, "16 or more characters, the same in every process of the app"),
        field="defer_signing_key",
        then=_signing_key,
        default_text="derived from the broker URL, its password included",
        doc="Secret the deferred tasks kept in the fleet's Redis are signed with; set it "
        "when the fleet's Redis is not the broker's.",
        example='"a-random-secret-of-16-or-more-characters"',
    ),
    Setting(
        name="fleet_step_ttl",
        section=_DURABILITY,
        type="float, seconds",
        default=DEFAULT_STEP_TTL_S,
        rule=Number(lo=1.0, hi=MAX_SECONDS),
        field="step_ttl_s",
        default_text=f"{DEFAULT_STEP_TTL_S:g} (7 days)",
        doc="How long a task's durable step results are kept.",
        example="86_400",
    ),
    Setting(
        name="fleet_step_max_bytes",
        section=_DURABILITY,
        type="int, bytes",
        default=DEFAULT_STEP_MAX_BYTES,
        rule=Number(lo=1.0, hi=512 * 1024 * 1024, whole=True),
        field="step_max_bytes",
        default_text=f"{DEFAULT_STEP_MAX_BYTES} (1 MiB)",
        doc="The largest JSON result one durable step may store.",
        example="65_536",
    ),
    Setting(
        name="fleet_dedupe_ttl",
        section=_DURABILITY,
        type="float, seconds",
        default=86_400.0,
        rule=Number(lo=1.0, hi=MAX_SECONDS),
        field="dedupe_ttl_s",
        default_text="86400 (1 day)",
        doc="How long an idempotency key's record is kept after its last event.",
        example="3600",
    ),
    Setting(
        name="fleet_claim_lease",
        section=_DURABILITY,
        type="float, seconds",
        default=15.0,
        rule=Number(lo=1.0, hi=86_400.0),
        field="claim_lease_s",
        doc="How long a running idempotency key's claim lives without renewal.",
        example="30",
    ),
    Setting(
        name="fleet_store_down",
        section=_OUTAGE,
        type="str",
        default="local",
        rule=OneOf(POLICIES),
        field="store_down",
        keyword="store_down",
        doc="What admission does while the fleet's Redis does not answer: keep each "
        "process's share of the budgets (`'local'`), admit everything, or refuse everything.",
        example='"open"',
    ),
    Setting(
        name="fleet_expected_processes",
        section=_OUTAGE,
        type="int",
        default=None,
        rule=Count(lo=1.0, hi=1_000_000.0),
        field="expected_processes",
        default_text="the number of fleet processes last seen live",
        doc="How many fleet processes share the budgets while Redis is away (the `'local'` "
        "policy divides by it).",
        example="8",
    ),
    Setting(
        name="fleet_distribution",
        section=_DISTRIBUTION,
        type="str",
        default="shared",
        rule=OneOf(MODES),
        field="distribution",
        doc="How tasks with an `affinity=` key are assigned to workers: one shared queue "
        "(plain Celery), dedicated affinity queues each consumed by its home worker, or "
        "dedicated queues an idle worker steals from past `fleet_steal_threshold` "
        "(docs/distribution.md).",
        example='"steal"',
    ),
    Setting(
        name="fleet_affinity_queues",
        section=_DISTRIBUTION,
        type="int",
        default=DEFAULT_AFFINITY_QUEUES,
        rule=_whole(1, MAX_AFFINITY_QUEUES),
        field="affinity_queues",
        doc="The number of affinity queues (`<namespace>.affinity.<n>`) affinity keys are "
        "hashed into; the same in every process of the fleet.",
        example="64",
    ),
    Setting(
        name="fleet_steal_threshold",
        section=_DISTRIBUTION,
        type="int",
        default=DEFAULT_STEAL_THRESHOLD,
        rule=_whole(1, 1_000_000),
        field="steal_threshold",
        doc="In `'steal'` mode, an idle worker consumes a peer's affinity queue deeper than "
        "this, until it falls below half of it.",
        example="8",
    ),
    Setting(
        name="fleet_affinity_lease",
        section=_DISTRIBUTION,
        type="float, seconds",
        default=DEFAULT_AFFINITY_LEASE_S,
        rule=Number(lo=0.5, hi=600.0),
        field="affinity_lease_s",
        doc="The lease of a worker's presence and of its affinity queues: the queues of a "
        "worker that died move to their new homes within it.",
        example="30",
    ),
    Setting(
        name="fleet_metrics_port",
        section=_METRICS,
        type="int",
        default=None,
        rule=Check(check_port, "a TCP port 1-65535, or None"),
        field="metrics_port",
        default_text="none (not served)",
        doc="TCP port each worker serves Prometheus `/metrics` on (the `[prometheus]` extra).",
        example="9808",
    ),
    Setting(
        name="fleet_trace_admissions",
        section=_METRICS,
        type="str",
        default=None,
        rule=Check(_trace_mode, "one of `'waits'`, `'all'`, `'off'`"),
        field="trace_admissions",
        default_text="`'waits'` when OpenTelemetry is installed, else off",
        doc="Which admissions record an OpenTelemetry `fleet.admission` span: those that "
        "waited or were refused, every one, or none (the `[otel]` extra; "
        "docs/integrations/opentelemetry.md).",
        example='"all"',
    ),
)

#: Each setting's one-line description, by name.
SETTINGS: dict[str, str] = {s.name: s.doc for s in ALL_SETTINGS}
#: The setting each ``Fleet(...)`` keyword argument overrides, by keyword.
KEYWORDS: dict[str, Setting] = {s.keyword: s for s in ALL_SETTINGS if s.keyword is not None}
_BY_NAME: dict[str, Setting] = {s.name: s for s in ALL_SETTINGS}


def _default(name: str) -> Any:
    return _BY_NAME[name].default


@dataclass(frozen=True)
class FleetSettings:
    """The validated ``fleet_*`` settings of one Fleet (one field per :class:`Setting`)."""

    redis_url: str
    namespace: str
    limits: dict[str, LimitConfig]
    max_wait_s: float
    max_countdown_s: float
    redis_password: str | None = field(default=None, repr=False)
    step_ttl_s: float = _default("fleet_step_ttl")
    step_max_bytes: int = _default("fleet_step_max_bytes")
    backoff: str = _default("fleet_backoff")
    backoff_base_s: float = _default("fleet_backoff_base")
    backoff_max_s: float = _default("fleet_backoff_max")
    step_jitter_s: float = _default("fleet_step_jitter")
    dedupe_ttl_s: float = _default("fleet_dedupe_ttl")
    claim_lease_s: float = _default("fleet_claim_lease")
    store_down: str = _default("fleet_store_down")
    defer: str = _default("fleet_defer")
    pump_period_s: float = _default("fleet_pump_period")
    pump_lease_s: float = _default("fleet_pump_lease")
    expected_processes: int | None = None
    #: ``fleet_redis_health_timeout``: the longest a call waits for Redis's reply (s).
    health_timeout_s: float = _default("fleet_redis_health_timeout")
    #: The HMAC key of deferred items (:func:`defer_signing_key`).
    defer_signing_key: bytes | None = field(default=None, repr=False)
    redis_transport_options: dict[str, Any] = field(default_factory=dict, repr=False)
    #: The user's own client or factory (``fleet_redis_client``); ``redis_url`` then
    #: describes where it connects.
    redis_client: Any = field(default=None, repr=False)
    #: ``fleet_metrics_port``: checked here, served by the worker's metrics bootstep.
    metrics_port: int | None = None
    #: ``fleet_trace_admissions``: None is "waits" when OpenTelemetry is installed.
    trace_admissions: str | None = None
    distribution: str = _default("fleet_distribution")
    affinity_queues: int = _default("fleet_affinity_queues")
    steal_threshold: int = _default("fleet_steal_threshold")
    affinity_lease_s: float = _default("fleet_affinity_lease")


def load_settings(conf: Mapping[str, Any], **overrides: Any) -> FleetSettings:
    """Read and check every setting of :data:`ALL_SETTINGS` from ``conf``.

    ``overrides`` are ``Fleet(...)``'s keyword arguments (:data:`KEYWORDS`); one that is
    not None wins over its setting. Raises :class:`ConfigError` naming the first bad
    setting and its value.
    """
    unexpected = sorted(set(overrides) - set(KEYWORDS))
    if unexpected:
        raise TypeError(f"load_settings() got unexpected keyword argument(s) {unexpected}")
    reject_unknown_settings(conf)
    parsed: dict[str, Any] = {}
    for setting in ALL_SETTINGS:
        value, where = setting.given(conf, overrides)
        parsed[setting.name] = setting.rule(value, where, parsed)
        if setting.then is not None:
            setting.then(parsed, conf, overrides)
    return FleetSettings(**{s.field: parsed[s.name] for s in ALL_SETTINGS})


def _default_text(setting: Setting) -> str:
    if setting.default_text is not None:
        return setting.default_text
    default = setting.default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return f"`{number_text(default)}`"
    return f"`{default!r}`"


def settings_reference_markdown() -> str:
    """The settings reference page (``docs/settings.md``), written from :data:`ALL_SETTINGS`.

    Example::

        python -m celery_fleet.settings > docs/settings.md
    """
    lines = [
        "# Settings reference",
        "",
        "<!-- Generated from celery_fleet/settings.py by "
        "`python -m celery_fleet.settings > docs/settings.md`: edit the table there. -->",
        "",
        "celery-fleet reads these settings from your Celery app's configuration "
        "(`app.conf.fleet_limits = {...}`, or a `celeryconfig` module). `Fleet(app)` checks "
        "them all when it is created: a bad value is a `ConfigError` naming the setting and "
        "the value, and a misspelt `fleet_*` name is refused with the closest known one "
        "(`fleet_limts` -> did you mean `fleet_limits`?). Some can also be given to "
        "`Fleet(...)` as keyword arguments, which win over `app.conf`.",
    ]
    for section in dict.fromkeys(s.section for s in ALL_SETTINGS):
        lines += ["", f"## {section}"]
        for s in (s for s in ALL_SETTINGS if s.section == section):
            lines += ["", f"### `{s.name}`", "", s.doc, ""]
            lines.append(f"- Type: {s.type}")
            lines.append(f"- Default: {_default_text(s)}")
            lines.append(f"- Accepted: {s.rule.describe()}")
            if s.keyword is not None:
                lines.append(f"- Overridden by: `Fleet({s.keyword}=...)`")
            lines += ["", "```python", f"app.conf.{s.name} = {s.example}", "```"]
    return "\n".join(lines) + "\n"


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
        and server_of(broker) != server_of(fleet_url)
    ):
        log.warning(
            "celery-fleet: the fleet's Redis (%s) is not the broker's, and deferred tasks are "
            "signed with a key derived from the broker URL, which has no password: whoever "
            "can write to the fleet's Redis and knows that URL could add a task the pump "
            "publishes. Set fleet_defer_signing_key to a random secret",
            mask_url(fleet_url),
        )
    return hashlib.sha256(b"celery-fleet defer broker\0" + broker.encode()).digest()


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


if __name__ == "__main__":
    print(settings_reference_markdown(), end="")
