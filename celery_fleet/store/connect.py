"""How the fleet reaches its Redis: one server, a Sentinel-managed master, a Cluster, or the
user's own client.

A :class:`Target` is parsed and checked once, when the
:class:`~celery_fleet.store.sync.RedisStore` is made (at ``Fleet(...)``): a mistake is a
:class:`~celery_fleet.ConfigError` with passwords masked, and nothing connects yet.
:func:`make_client` builds a client from it in each process that needs one (the store calls
it again after a fork, and once more for its blocking client with a longer socket timeout).

- ``redis://``, ``rediss://``, ``unix://``: one Redis, with ``redis.Redis.from_url``.
- ``sentinel://host:26379;sentinel://host2:26379/0``: Celery's (kombu's) syntax for a master
  watched by Sentinels. The password comes from the first URL, as kombu reads it, the
  database from whichever part names it; ``master_name``, ``sentinel_kwargs`` (the
  sentinels' own connection options, e.g. their password) and ``min_other_sentinels`` from
  the transport options. Every new connection asks the sentinels where the master is and
  checks that it says ``ROLE`` master; a failover noticed by any connection of the process
  (an error, a slow reply, a write after an idle second) drops every connection to the old
  master (:mod:`celery_fleet.store.sentinel`), so after a failover the store writes to the new
  master only, also when the old one comes back from a freeze.
- ``redis+cluster://host:7000,host2:7001`` (``rediss+cluster://`` with TLS): Redis Cluster with
  ``redis.cluster.RedisCluster``. Asked for by a scheme of its own rather than a flag beside
  the URL: a cluster node also answers a plain ``redis://`` client (until the first key of
  another node, ``MOVED``), so the URL itself must say what it points at; one string then
  works wherever a URL goes (``Fleet(redis_url=...)``, ``fleet_redis_url``, ``REDIS_URL``), and
  no process can get the URL without the flag. Every fleet script touches one hash slot
  (``{namespace:limit}``); :class:`ClusterCombiner` routes each call by its keys.
- A client: ``redis.Redis`` or ``RedisCluster``, or a zero-argument factory of one
  (:func:`own_client`).

Example::

    target = parse_url("sentinel://s1:26379;sentinel://s2:26379/0", safe_url=...,
                       options={}, transport_options={"master_name": "mymaster"})
    client = make_client(target)                         # the master, asked of the sentinels
    blocking = make_client(target, socket_timeout=15.0)  # the same, for BLPOP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.cluster import REDIS_ALLOWED_KEYS, ClusterNode, RedisCluster
from redis.sentinel import SentinelConnectionPool

from ..checks import number, suggest
from ..errors import ConfigError
from .cluster import ClusterCombiner, FleetCluster, new_cluster
from .sentinel import SLOW_REPLY_S, FleetSentinelPool, manager_for

__all__ = [
    "Client",
    "ClientSource",
    "ClusterCombiner",
    "FleetCluster",
    "Target",
    "SCHEMES",
    "TRANSPORT_OPTIONS",
    "check_transport_options",
    "sentinel_options_of",
    "make_client",
    "own_client",
    "parse_url",
    "is_cluster",
]

log = logging.getLogger("celery_fleet")

#: A client the store can use.
Client = Union[redis.Redis, RedisCluster]  # noqa: UP007 (a runtime alias on Python 3.10)
#: What ``fleet_redis_client`` / ``Fleet(redis_client=...)`` accepts.
ClientSource = Union[redis.Redis, RedisCluster, Callable[[], Any]]  # noqa: UP007

PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL_SCHEME = "sentinel://"
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
#: Every URL scheme the fleet's store accepts.
SCHEMES = (*PLAIN_SCHEMES, SENTINEL_SCHEME, *CLUSTER_SCHEMES)
SENTINEL_PORT = 26379
CLUSTER_PORT = 6379

#: Transport options that say which master the sentinels watch and how to reach them
#: (kombu's names, so ``broker_transport_options`` can be reused as is).
SENTINEL_OPTIONS = frozenset({"master_name", "sentinel_kwargs", "min_other_sentinels"})
#: Transport options for the connections to Redis itself. ``retry_on_timeout`` is not one:
#: an admission sent again after a timeout may be charged twice.
CONNECTION_OPTIONS = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "health_check_interval",
        "max_connections",
        "client_name",
        "username",
        "password",
    }
)
#: Every key ``fleet_redis_transport_options`` accepts.
TRANSPORT_OPTIONS = SENTINEL_OPTIONS | CONNECTION_OPTIONS


@dataclass(frozen=True)
class Target:
    """Where the fleet's Redis is, checked once: what :func:`make_client` builds from.

    ``kind`` is ``"redis"``, ``"sentinel"``, ``"cluster"`` or ``"client"`` (the user's own);
    ``url`` the URL as given (a description for a client), ``safe_url`` with passwords masked.
    """

    kind: str
    url: str
    safe_url: str
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: Sentinels, or a cluster's startup nodes: ``(host, port)``.
    nodes: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    sentinel_kwargs: Mapping[str, Any] | None = field(default=None, repr=False)
    min_other_sentinels: int = 0
    source: Any = field(default=None, repr=False)

    @property
    def cluster(self) -> bool:
        """True when the URL names a Redis Cluster (a client's kind is known once built)."""
        return self.kind == "cluster"


# -- options -------------------------------------------------------------------------------


def check_transport_options(value: object, where: str) -> dict[str, Any]:
    """``value`` (a mapping of :data:`TRANSPORT_OPTIONS`) checked, as a new dict."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a dict, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in TRANSPORT_OPTIONS)
    if unknown:
        raise ConfigError(
            f"{where} has unknown option(s) {suggest(unknown, TRANSPORT_OPTIONS)}; "
            f"known: {sorted(TRANSPORT_OPTIONS)}"
        )
    options = dict(value)
    name = options.get("master_name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"{where}['master_name'] must be a non-empty string, got {name!r}")
    others = options.get("min_other_sentinels", 0)
    if isinstance(others, bool) or not isinstance(others, int) or others < 0:
        raise ConfigError(f"{where}['min_other_sentinels'] must be an int >= 0, got {others!r}")
    kwargs = options.get("sentinel_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{where}['sentinel_kwargs'] must be a dict, got {kwargs!r}")
        _dry_run(dict(kwargs), f"{where}['sentinel_kwargs']")
        options["sentinel_kwargs"] = dict(kwargs)
    for key in ("socket_timeout", "socket_connect_timeout"):
        if options.get(key) is not None:
            number(options[key], f"{where}[{key!r}]", lo_open=0.0, hi=3600.0)
    if options.get("health_check_interval") is not None:
        number(options["health_check_interval"], f"{where}['health_check_interval']", lo=0.0)
    most = options.get("max_connections")
    if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
        raise ConfigError(f"{where}['max_connections'] must be a positive int, got {most!r}")
    for key in ("client_name", "username", "password"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise ConfigError(f"{where}[{key!r}] must be a string")
    return options


def sentinel_options_of(broker_options: object) -> dict[str, Any]:
    """The Sentinel options (``master_name``, ``sentinel_kwargs``, ``min_other_sentinels``) of
    ``broker_transport_options``, for a fleet that shares the broker's ``sentinel://`` URL.
    The broker's other options (visibility timeout, its socket timeouts...) are its own."""
    if not isinstance(broker_options, Mapping):
        return {}
    return {k: v for k, v in broker_options.items() if k in SENTINEL_OPTIONS}


def _dry_run(options: dict[str, Any], where: str) -> None:
    """Build (never connect) a connection from ``options``: an unknown or bad option is a
    ConfigError now, not a TypeError at the first call."""
    try:
        pool = redis.ConnectionPool(**options)
        pool.connection_class(**pool.connection_kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# -- URLs ----------------------------------------------------------------------------------


def parse_url(
    url: object,
    safe_url: str,
    options: Mapping[str, Any],
    transport_options: Mapping[str, Any] | None = None,
) -> Target:
    """Check ``url`` and return its :class:`Target`; nothing connects.

    ``safe_url`` is ``url`` with passwords masked (for messages), ``options`` the store's
    client options (timeouts, ``password`` from ``fleet_redis_password``), and
    ``transport_options`` those of :func:`check_transport_options`. A password in the URL wins
    over ``options``, as with ``redis.Redis.from_url``.
    """
    if not isinstance(url, str) or not url.startswith(SCHEMES):
        raise ConfigError(
            f"invalid Redis URL {safe_url}: the scheme must be one of {', '.join(SCHEMES)}"
        )
    transport = check_transport_options(transport_options, "transport options")
    connection = {k: v for k, v in transport.items() if k in CONNECTION_OPTIONS}
    merged = {**options, **connection}
    if url.startswith(SENTINEL_SCHEME):
        return _sentinel_target(url, safe_url, merged, transport)
    wrong = sorted(set(transport) & SENTINEL_OPTIONS)
    if wrong:
        raise ConfigError(
            f"transport option(s) {wrong} apply to sentinel:// URLs only, and the fleet's "
            f"Redis URL is {safe_url}"
        )
    if url.startswith(CLUSTER_SCHEMES):
        return _cluster_target(url, safe_url, merged)
    try:  # parse and build a connection now (no socket): a bad port or option fails here
        pool = redis.ConnectionPool.from_url(url, **merged)
        pool.connection_class(**pool.connection_kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc).replace(url, safe_url)
        raise ConfigError(f"invalid Redis URL {safe_url}: {message}") from None
    _refuse_decoding(pool.connection_kwargs, safe_url)
    return Target("redis", url, safe_url, merged)


def _refuse_decoding(kwargs: Mapping[str, Any], safe_url: str) -> None:
    """A URL's ``decode_responses`` (redis-py keeps the query's text, so even ``=False``
    is true) would hand the fleet text where its replies are read as bytes."""
    if "decode_responses" in kwargs:
        raise ConfigError(
            f"invalid Redis URL {safe_url}: drop decode_responses (the fleet's client must "
            f"return bytes, and redis-py reads the option's text: even =False decodes)"
        )


def _host_port(netloc: str, default_port: int, safe_url: str) -> tuple[str, int]:
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port or default_port
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {safe_url}: bad port in {netloc!r} ({exc})") from None
    if not parts.hostname:
        raise ConfigError(f"invalid Redis URL {safe_url}: no host in {netloc!r}")
    return parts.hostname, port


def _db(path: str, safe_url: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise ConfigError(f"invalid Redis URL {safe_url}: the path must be a database number")
    return int(text)


def _sentinel_target(
    url: str, safe_url: str, options: dict[str, Any], transport: dict[str, Any]
) -> Target:
    """kombu's ``sentinel://[:password@]host:port[/db];sentinel://host2:port2...``.

    The database is the one the parts name, on any part (Celery's examples put it on the
    last: ``sentinel://s1:26379;sentinel://s2:26379/1``), 0 when none does; parts naming
    different databases are refused. The password is the first URL's, as kombu reads it: a
    later part naming another is refused rather than silently ignored.
    """
    nodes: list[tuple[str, int]] = []
    first = None
    dbs: set[int] = set()
    for part in url.split(";"):
        part = part.strip()
        if not part.startswith(SENTINEL_SCHEME):
            raise ConfigError(
                f"invalid Sentinel URL {safe_url}: every ';'-separated part must be a "
                f"sentinel://host:port URL"
            )
        try:
            parts = urlsplit(part)
        except ValueError as exc:
            raise ConfigError(f"invalid Sentinel URL {safe_url}: {exc}") from None
        if parts.query or parts.fragment:
            raise ConfigError(
                f"invalid Sentinel URL {safe_url}: options go in the transport options "
                f"(fleet_redis_transport_options), not in the URL"
            )
        nodes.append(_host_port(parts.netloc.rsplit("@", 1)[-1], SENTINEL_PORT, safe_url))
        first = first or parts
        if parts.path.strip("/"):
            dbs.add(_db(parts.path, safe_url))
        if parts.password and parts.password != first.password:
            raise ConfigError(
                f"invalid Sentinel URL {safe_url}: only the first URL's password is used "
                f"(as kombu does); put it there, or the sentinels' in sentinel_kwargs"
            )
    assert first is not None
    if len(dbs) > 1:
        raise ConfigError(
            f"invalid Sentinel URL {safe_url}: its parts name different databases "
            f"{sorted(dbs)}; name it once (kombu reads the first part's)"
        )
    master_name = transport.get("master_name")
    if not master_name:
        raise ConfigError(
            f"the Sentinel URL {safe_url} needs a master name: set "
            f"fleet_redis_transport_options = {{'master_name': 'mymaster'}} (a fleet that uses "
            f"the broker's URL reads broker_transport_options['master_name'])"
        )
    master = {**options, "db": dbs.pop() if dbs else 0}
    if first.username:
        master["username"] = unquote(first.username)
    if first.password:
        master["password"] = unquote(first.password)
    _dry_run(master, f"invalid Sentinel URL {safe_url}")
    return Target(
        "sentinel",
        url,
        safe_url,
        master,
        nodes=tuple(nodes),
        master_name=master_name,
        sentinel_kwargs=transport.get("sentinel_kwargs"),
        min_other_sentinels=transport.get("min_other_sentinels", 0),
    )


def _cluster_target(url: str, safe_url: str, options: dict[str, Any]) -> Target:
    """``redis+cluster://[user:password@]host:port[,host2:port2...][/0][?option=value]``."""
    scheme, rest = url.split("://", 1)
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    nodes = tuple(_host_port(h, CLUSTER_PORT, safe_url) for h in hosts.split(",") if h.strip())
    if not nodes:
        raise ConfigError(f"invalid Redis Cluster URL {safe_url}: no host:port")
    if _db(path, safe_url) != 0:
        raise ConfigError(f"invalid Redis Cluster URL {safe_url}: a cluster has database 0 only")
    plain = "rediss" if scheme == "rediss+cluster" else "redis"
    host, port = nodes[0]
    auth = f"{userinfo}@" if userinfo else ""
    try:
        from_url = redis.connection.parse_url(  # type: ignore[no-untyped-call]
            f"{plain}://{auth}{quote(host, safe=':[]')}:{port}/" + (f"?{query}" if query else "")
        )
    except ValueError as exc:
        raise ConfigError(f"invalid Redis Cluster URL {safe_url}: {exc}") from None
    for key in ("host", "port", "db"):
        from_url.pop(key, None)
    merged = {**options, **from_url}
    _refuse_decoding(from_url, safe_url)
    unknown = sorted(set(merged) - set(REDIS_ALLOWED_KEYS))
    if unknown:
        raise ConfigError(f"invalid Redis Cluster URL {safe_url}: unknown option(s) {unknown}")
    _dry_run(dict(merged), f"invalid Redis Cluster URL {safe_url}")
    return Target("cluster", url, safe_url, merged, nodes=nodes)


# -- the user's own client -----------------------------------------------------------------


def own_client(source: object, where: str = "fleet_redis_client") -> Target:
    """The :class:`Target` of a user's client, or of a zero-argument factory of one.

    A factory is called on first use in each process (again in every forked child) and its
    client used as is. An instance is used as is in every process that inherits it: safe
    with redis-py's own connection pools, which drop connections inherited through
    ``fork()``; with a pool that is not fork-aware, pass a factory. Either way a
    ``RedisCluster`` is re-created as :class:`FleetCluster` (same nodes and options) so its
    errors reach the store as redis errors, and the blocking client is built from the
    client's connection settings with a longer socket timeout.
    """
    if isinstance(source, (redis.Redis, RedisCluster)):
        _check_client(source, where)
        if not isinstance(source, RedisCluster):
            _clone_pool(source, {})  # a pool the blocking client cannot copy fails now
        return Target("client", describe(source), describe(source), source=source)
    if callable(source):
        name = getattr(source, "__qualname__", None) or type(source).__name__
        text = f"{where} {name}()"
        return Target("client", text, text, source=source)
    raise ConfigError(
        f"{where} must be a redis.Redis or redis.cluster.RedisCluster client, or a "
        f"zero-argument callable returning one; got {type(source).__name__}"
    )


def _check_client(client: object, where: str) -> Client:
    if not isinstance(client, (redis.Redis, RedisCluster)):
        raise ConfigError(
            f"{where} returned {type(client).__name__}, not a redis.Redis or RedisCluster "
            f"(an asyncio client cannot serve the fleet's threads)"
        )
    if _connection_kwargs(client).get("decode_responses"):
        raise ConfigError(
            f"{where}: the fleet's client must return bytes; build it with "
            f"decode_responses=False (the default)"
        )
    return client


def _connection_kwargs(client: Client) -> dict[str, Any]:
    if isinstance(client, RedisCluster):
        return dict(client.nodes_manager.connection_kwargs)
    return dict(client.connection_pool.connection_kwargs)


def describe(client: Client) -> str:
    """Where ``client`` connects, as a URL without its password (``:***@``)."""
    kwargs = _connection_kwargs(client)
    auth = ":***@" if kwargs.get("password") else ""
    if isinstance(client, RedisCluster):
        nodes = ",".join(f"{n.host}:{n.port}" for n in client.nodes_manager.startup_nodes.values())
        return f"redis+cluster://{auth}{nodes}"
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        sentinels = ";".join(
            "sentinel://{host}:{port}".format_map(s.connection_pool.connection_kwargs)
            for s in pool.sentinel_manager.sentinels
        )
        return f"{sentinels}/{kwargs.get('db', 0)} (master {pool.service_name})"
    if kwargs.get("path"):
        return f"unix://{auth}{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/" + str(
        kwargs.get("db", 0)
    )


def is_cluster(client: object) -> bool:
    """True for a Redis Cluster client."""
    return isinstance(client, RedisCluster)


# -- building clients ----------------------------------------------------------------------


def make_client(target: Target, **overrides: Any) -> Client:
    """A new client of ``target`` (no connection is made, except by ``RedisCluster``, which
    reads the slot map). ``overrides`` replace connection options (the store's blocking
    client: ``socket_timeout``). An unreachable cluster is a ``redis.ConnectionError``."""
    if target.kind == "redis":
        return redis.Redis.from_url(target.url, **{**target.options, **overrides})
    if target.kind == "sentinel":
        return _sentinel_master(target, overrides)
    if target.kind == "cluster":
        nodes = [ClusterNode(h, p) for h, p in target.nodes]  # type: ignore[no-untyped-call]
        return new_cluster(nodes, {**target.options, **overrides}, target.safe_url)
    return _from_own(target, overrides)


def _sentinel_master(target: Target, overrides: Mapping[str, Any]) -> redis.Redis:
    """The master's client: its pool asks the sentinels on every new connection, and all
    of this process's clients of ``target`` share one
    :class:`~celery_fleet.store.sentinel.FleetSentinel`, so a failover one of them notices drops
    every connection to the old master (see :mod:`celery_fleet.store.sentinel`)."""
    sentinel_kwargs = target.sentinel_kwargs
    if sentinel_kwargs is None:  # redis-py's default, from the base (not blocking) options
        sentinel_kwargs = {k: v for k, v in target.options.items() if k.startswith("socket_")}
    manager = manager_for(target.nodes, target.min_other_sentinels, dict(sentinel_kwargs))
    options = {**target.options, **overrides}
    # A client with a longer socket timeout than the store's is for blocking waits: its
    # replies are slow by design, so only its errors make it ask the sentinels again.
    blocking = (options.get("socket_timeout") or 0) > (target.options.get("socket_timeout") or 0)
    assert target.master_name is not None
    # annotated in some redis-py versions only, hence both codes
    client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        target.master_name,
        connection_pool_class=FleetSentinelPool,
        slow_reply_s=None if blocking else SLOW_REPLY_S,
        **options,
    )
    return client


def _from_own(target: Target, overrides: Mapping[str, Any]) -> Client:
    source = target.source
    if isinstance(source, (redis.Redis, RedisCluster)):
        client = source
    else:
        client = _check_client(source(), target.url)
    if isinstance(client, RedisCluster) and (overrides or not isinstance(client, FleetCluster)):
        manager = client.nodes_manager
        own = ("redis_connect_func", "retry")
        options = {k: v for k, v in manager.connection_kwargs.items() if k not in own}
        nodes = [
            ClusterNode(n.host, n.port)  # type: ignore[no-untyped-call]
            for n in manager.startup_nodes.values()
        ]
        # The cluster's Retry: redis-py 6+ keeps it on the client (and refuses one among the
        # node options); 5.x in the node options, on the client only when one was given.
        retry = getattr(client, "retry", None) or manager.connection_kwargs.get("retry")
        return new_cluster(
            nodes,
            {**options, **overrides},
            target.safe_url,
            **({"retry": retry} if retry is not None else {}),
            require_full_coverage=manager._require_full_coverage,
            address_remap=manager.address_remap,
        )
    if overrides:
        assert isinstance(client, redis.Redis)
        return redis.Redis(connection_pool=_clone_pool(client, overrides))
    return client


def _clone_pool(client: redis.Redis, overrides: Mapping[str, Any]) -> redis.ConnectionPool:
    """A new pool like ``client``'s (same class and connection options) with ``overrides``."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
    kwargs.update(overrides)
    kwargs["connection_class"] = pool.connection_class
    most = getattr(pool, "max_connections", None)
    try:
        if isinstance(pool, SentinelConnectionPool):
            return SentinelConnectionPool(  # type: ignore[no-untyped-call]
                pool.service_name,
                pool.sentinel_manager,
                is_master=pool.is_master,
                check_connection=pool.check_connection,
                max_connections=most,
                **kwargs,
            )
        new: redis.ConnectionPool = type(pool)(max_connections=most, **kwargs)
        return new
    except TypeError as exc:
        raise ConfigError(
            f"fleet_redis_client: cannot build a second pool like its {type(pool).__name__} "
            f"(for blocking waits, with a longer socket timeout): {exc}; pass a factory "
            f"returning a client with a redis-py pool instead"
        ) from None
