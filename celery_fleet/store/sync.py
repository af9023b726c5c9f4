"""The Redis connection and the Lua scripts, per process and fork-safe.

A :class:`RedisStore` creates its client lazily and again in every process it finds
itself in (it compares ``os.getpid()``), because a client created before Celery's prefork
``fork()`` would share its sockets with the children. Scripts are run by SHA1 with
EVALSHA; when the server answers NOSCRIPT the source is loaded and the call repeated, so
``SCRIPT FLUSH`` or a failover to a fresh replica is transparent.

Every Redis error is translated here: connection problems, and a Redis that cannot take
writes (``OOM`` under ``maxmemory`` with ``noeviction``, ``READONLY`` from a replica)
become :class:`~celery_fleet.errors.StoreUnavailable` naming the URL (password masked);
anything else a :class:`~celery_fleet.errors.FleetError`; no raw ``redis.exceptions``
reach the API.

A frozen Redis (SIGSTOP, ``DEBUG SLEEP``, a stalled host) is an outage like a dead one:
every script call waits for its reply no longer than :attr:`RedisStore.health_s` (and no
longer than the caller's own deadline, :meth:`RedisStore.deadline`), then fails with a
:class:`~celery_fleet.errors.StoreUnavailable` that is not ``dropped`` (not sent again).

The fleet's keys must never be evicted: a lost lease lets the cap be exceeded, a lost
bucket admits a burst. On its first connection in a process the store reads
``maxmemory`` and ``maxmemory-policy`` and logs a loud warning when Redis may evict them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from importlib import resources
from typing import Any, cast
from urllib.parse import urlsplit

import redis
from redis.exceptions import NoScriptError

from ..errors import ConfigError, FleetError, StoreUnavailable
from .cluster import ClusterCombiner
from .combiner import Combiner, Packed, pack_command
from .compat import read_reply, take_connection
from .connect import Client, ClientSource, Target, is_cluster, make_client, own_client, parse_url
from .specs import IDEMPOTENT, SCRIPTS, SPECS

__all__ = [
    "RedisStore",
    "mask_url",
    "has_password",
    "script_source",
    "eviction_risk",
    "IDEMPOTENT",
    "SCRIPTS",
]

log = logging.getLogger("celery_fleet")

#: Connections per process and client, unless the URL says otherwise (see RedisStore).
MAX_CONNECTIONS = 10_000
#: The longest single blocking wait (BLPOP) for a wake-up.
MAX_BLOCK_S = 10.0
#: The longest a script call waits for its reply before Redis counts as away (s): a
#: frozen Redis accepts the call and answers nothing. ``RedisStore(health_s=...)``.
HEALTH_S = 1.5
#: The shortest wait a call gets, whatever its caller's deadline says (s).
MIN_WAIT_S = 0.05

#: The monotonic time by which the current caller (thread or task) needs its answer.
_NO_DEADLINE = float("inf")
_deadline: ContextVar[float] = ContextVar("celery_fleet_deadline", default=_NO_DEADLINE)


@cache
def script_source(name: str) -> str:
    """The text of script ``name`` (``scripts/<folder>/<name>.lua``, its folder declared in
    :mod:`celery_fleet.store.specs`), with each ``--#include _lib/part`` line replaced by
    ``scripts/_lib/part.lua``: Lua scripts in Redis cannot share functions, so the parts
    are pasted in (a part may include another; each goes in once)."""
    files = resources.files("celery_fleet.store.scripts")
    done: set[str] = set()

    def paste(match: re.Match[str]) -> str:
        if match[1] in done:
            return ""
        done.add(match[1])
        return _INCLUDE.sub(paste, files.joinpath(f"{match[1]}.lua").read_text("utf-8"))

    text = files.joinpath(f"{SPECS[name].path}.lua").read_text("utf-8")
    return _INCLUDE.sub(paste, text)


_INCLUDE = re.compile(r"^--#include (_lib/\w+)$", re.MULTILINE)


_live_stores: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for store in list(_live_stores):
        store._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


_QUERY_SECRET = re.compile(r"((?:^|[?&;])(?:password|pass|pwd)=)[^&;#]*", re.IGNORECASE)
# Replies that mean "this Redis cannot take the fleet's writes now": out of memory under
# maxmemory (also when raised inside a script), or a read-only replica after a failover.
# redis-py strips the reply's code into the exception class; inside a script the code may
# come back in the message text instead.
_UNAVAILABLE_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)
_UNAVAILABLE_REPLY = re.compile(r"\b(OOM|READONLY|MASTERDOWN|LOADING)\b")


def mask_url(url: str) -> str:
    """``url`` with its password (in the netloc or a ``password=`` query) as ``***``.

    Never raises, whatever the URL: it is used to build error messages about bad URLs.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    masked = url
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        if ":" in userinfo:
            masked = masked.replace(parts.netloc, f"{userinfo.split(':', 1)[0]}:***@{host}", 1)
    if parts.query:
        head, sep, query = masked.partition("?")
        masked = head + sep + _QUERY_SECRET.sub(r"\1***", query)
    return masked


def has_password(url: str) -> bool:
    """True when ``url`` carries a password (``mask_url`` would hide something)."""
    return mask_url(url) != url


def eviction_risk(maxmemory: int, policy: str) -> str | None:
    """Why Redis may evict the fleet's keys under this configuration, or None if it won't.

    Every fleet key has a TTL, so the ``volatile-*`` policies evict them first, and the
    ``allkeys-*`` ones may pick them; only ``noeviction`` (or no ``maxmemory``) is safe.
    """
    if maxmemory <= 0 or policy == "noeviction":
        return None
    return (
        f"maxmemory-policy is {policy!r} with maxmemory {maxmemory}: when memory is full "
        f"Redis evicts celery-fleet's keys (leases, buckets, breakers; all have TTLs, so "
        f"volatile-* policies pick them first) and the fleet silently exceeds its caps. "
        f"Use a Redis (or instance) with maxmemory-policy noeviction for fleet_redis_url"
    )


class RedisStore:
    """One Redis URL, a lazily created client per process, and the registered scripts.

    Example::

        store = RedisStore("redis://127.0.0.1:6379/1")
        reply = store.run("acquire", keys=[...], args=[...])
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: ClientSource | None = None,
        transport_options: Mapping[str, Any] | None = None,
        health_s: float = HEALTH_S,
        **client_options: Any,
    ) -> None:
        # redis-py 8 caps a pool at 100 connections; every waiter blocked on its wake-up
        # holds one, so a worker with 200 threads would fail with "Too many connections".
        # A max_connections in the URL's query still wins.
        self._options = {
            "socket_timeout": 5.0,
            "socket_connect_timeout": 5.0,
            "max_connections": MAX_CONNECTIONS,
            **client_options,
        }
        # Parsed now, nothing connects: a bad URL, port or option is a ConfigError at
        # start-up (connect.py: plain, sentinel:// and redis+cluster:// URLs, own clients).
        if client is not None:
            if url is not None or transport_options:
                raise ConfigError("give the fleet's store a Redis URL or a client, not both")
            self.target: Target = own_client(client)
        elif url is None:
            raise ConfigError("the fleet's store needs a Redis URL or a client")
        else:
            safe = ";".join(mask_url(part) for part in url.split(";"))
            self.target = parse_url(url, safe, self._options, transport_options)
        self.url = self.target.url
        self.safe_url = self.target.safe_url
        if not 0 < health_s < float("inf"):
            raise ConfigError(f"health_s must be a positive number of seconds, got {health_s!r}")
        #: The longest a script call waits for its reply (s); past it Redis counts as away.
        #: A shorter ``socket_timeout`` of the client's options wins.
        self.health_s = float(health_s)
        socket_timeout = self.target.options.get("socket_timeout")
        if isinstance(socket_timeout, int | float) and 0 < socket_timeout < self.health_s:
            self.health_s = float(socket_timeout)
        self._checked_pid: int | None = None
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._client: Client | None = None
        self._blocking: Client | None = None
        self._blocking_pid: int | None = None
        self._combiner: Combiner | ClusterCombiner | None = None
        self._combiner_pid: int | None = None
        _live_stores.add(self)
        self._shas = {name: _sha1(script_source(name)) for name in SCRIPTS}

    def _after_fork(self) -> None:
        # A fork while another thread held the lock would leave it held forever here.
        self._lock = threading.Lock()
        self._client, self._pid = None, None
        self._blocking, self._blocking_pid = None, None
        self._combiner, self._combiner_pid = None, None

    @property
    def client(self) -> Client:
        """This process's client (created on first use, and again after a fork): a
        ``redis.Redis`` (one server, or a Sentinel-managed master) or a ``RedisCluster``."""
        pid = os.getpid()
        if self._pid != pid or self._client is None:
            with self._lock:
                if self._pid != pid or self._client is None:
                    client = make_client(self.target)
                    self._client, self._pid = client, pid
                    if self._checked_pid != pid:
                        self._checked_pid = pid
                        # Off the caller's path: a process's first call may meet a frozen
                        # Redis, and CONFIG GET would cost it the socket timeout.
                        threading.Thread(
                            target=self._warn_if_evicting,
                            args=(client,),
                            name="fleet-eviction-check",
                            daemon=True,
                        ).start()
        return self._client

    def _warn_if_evicting(self, client: Client) -> None:
        """Log loudly, once per process, when this Redis may evict the fleet's keys (in a
        thread of its own, started with the process's client)."""
        try:
            conf = client.config_get("maxmemory*")
        except Exception:  # CONFIG is disabled on many managed Redis services; or Redis away
            log.debug("celery-fleet: cannot read maxmemory-policy of %s", self.safe_url)
            return
        maxmemory = int(conf.get("maxmemory") or 0)
        risk = eviction_risk(maxmemory, str(conf.get("maxmemory-policy") or ""))
        if risk:
            log.warning("celery-fleet: Redis at %s: %s", self.safe_url, risk)

    def reset(self) -> None:
        """Forget this process's client (called from ``worker_process_init``).

        The old client is not closed: after a fork its sockets belong to the parent.
        """
        with self._lock:
            self._client, self._pid = None, None
            self._blocking, self._blocking_pid = None, None
            self._combiner, self._combiner_pid = None, None

    def close(self) -> None:
        """Close this process's connections to Redis (``Fleet.close``): the combiner's
        wire, the client's pool, the blocking client's. A client given by the user
        (``redis_client=``) is theirs: only its connections the combiner made are closed.
        A later call would open new connections."""
        with self._lock:
            mine = self._pid == os.getpid()
            client, self._client, self._pid = self._client, None, None
            blocking, self._blocking, self._blocking_pid = self._blocking, None, None
            combiner, self._combiner, self._combiner_pid = self._combiner, None, None
        if not mine:
            return  # after a fork the sockets are the parent's
        closing = getattr(combiner, "close", None)
        if closing is not None:
            closing()
        clients = [blocking] if self.target.kind == "client" else [client, blocking]
        for c in clients:
            if c is None:
                continue
            try:
                c.close()
            except Exception:  # closing what may already be broken
                log.debug("celery-fleet: closing a Redis client failed", exc_info=True)

    @staticmethod
    @contextmanager
    def deadline(seconds: float) -> Iterator[None]:
        """Within the block, no call of this thread (or task) waits for Redis longer than
        ``seconds`` from now (a caller's remaining ``max_wait``); nested blocks keep the
        earlier deadline."""
        until = min(_deadline.get(), time.monotonic() + max(seconds, 0.0))
        token = _deadline.set(until)
        try:
            yield
        finally:
            _deadline.reset(token)

    def wait_s(self) -> float:
        """How long a call made now may wait for its reply: :attr:`health_s`, or less when
        the caller's deadline is nearer (never below :data:`MIN_WAIT_S`)."""
        until = _deadline.get()
        if until == _NO_DEADLINE:  # the usual case: no clock read
            return self.health_s
        return max(MIN_WAIT_S, min(self.health_s, until - time.monotonic()))

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run one script by EVALSHA: exactly one round trip (two after SCRIPT FLUSH).

        Called directly rather than through redis-py's ``Script`` wrapper, which copies the
        arguments on every call: this is the hot path. When the server answers NOSCRIPT
        (flush, failover, a fresh server) the source is loaded and the call made again.
        A script in :data:`IDEMPOTENT` is sent once more, on a new connection, when the
        connection drops under it (running it twice changes nothing).
        """
        try:
            return self._run(script, keys, args)
        except StoreUnavailable as exc:
            if not (exc.dropped and script in IDEMPOTENT):
                raise
            return self._run(script, keys, args)

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        if self._plain():
            # On the combiner's wire, so a frozen Redis costs this call its deadline, not
            # the socket timeout (and it is ordered after this process's posted calls).
            packed = Packed(script, self._shas[script], keys, 0, args).pack()
            (reply,) = self._send(((script, packed),))
            return reply
        self.drain()
        try:
            client = self.client
            try:
                return client.execute_command(
                    "EVALSHA", self._shas[script], len(keys), *keys, *args
                )  # type: ignore[no-untyped-call]
            except NoScriptError:
                client.script_load(script_source(script))
                return client.execute_command(
                    "EVALSHA", self._shas[script], len(keys), *keys, *args
                )  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            raise self._translate(exc, f"script {script!r}") from exc

    def packed(
        self, script: str, keys: list[str], n_varying: int, tail: list[Any], n_after: int = 0
    ) -> Packed:
        """A call template of ``script`` for :meth:`send`: fixed keys and trailing arguments
        encoded once, ``n_varying`` arguments in front of the tail (and ``n_after`` after
        it) given per call."""
        return Packed(script, self._shas[script], keys, n_varying, tail, n_after)

    def send(self, *commands: tuple[str, bytes]) -> list[Any]:
        """Run packed script calls (``(script, Packed.pack(...))``) in one round trip,
        coalesced with those other threads of this process send at the same moment.

        Returns the replies in order; the first error among them is raised, translated as
        in :meth:`run`. When the connection drops under calls that are all
        :data:`IDEMPOTENT`, they are sent once more.
        """
        try:
            return self._send(commands)
        except StoreUnavailable as exc:
            if not (exc.dropped and all(script in IDEMPOTENT for script, _ in commands)):
                raise
            return self._send(commands)

    def send_riding(self, command: tuple[str, bytes], rider: Any) -> Any:
        """:meth:`send` one call with a posted call folded into it (``rider``, taken back
        with :meth:`take_posted`: see ``Combiner.send``); its reply. Not sent again after
        a dropped connection: the rider is then owed by its callback."""
        (reply,) = self._send((command,), rider)
        return reply

    def take_posted(self, handle: Any) -> bool:
        """Take a call :meth:`post` held back (its handle), to fold it into the next call
        (:meth:`send_riding`); False when it is on its way already, or on a Cluster."""
        combiner = self._combiner
        if combiner is None or self._combiner_pid != os.getpid():
            return False
        take = getattr(combiner, "take", None)
        return take is not None and handle is not True and bool(take(handle))

    def _send(self, commands: tuple[tuple[str, bytes], ...], rider: Any = None) -> list[Any]:
        combiner = self._combiner  # the property's work only when it has any to do
        if combiner is None or self._combiner_pid != os.getpid():
            combiner = self.combiner
        try:
            if rider is not None:
                replies = combiner.send(list(commands), rider)  # type: ignore[call-arg]
            else:
                replies = combiner.send(list(commands))
        except redis.RedisError as exc:
            raise self._translate(exc, "script call") from exc
        if len(replies) != len(commands):
            raise FleetError(f"celery-fleet: {len(commands)} calls, {len(replies)} replies")
        for i, reply in enumerate(replies):
            if isinstance(reply, BaseException):  # the usual reply is none: one check
                script = commands[i][0]
                if isinstance(reply, redis.RedisError):
                    raise self._translate(reply, f"script {script!r}") from reply
                raise FleetError(
                    f"celery-fleet script {script!r} on {self.safe_url} was not answered: "
                    f"the thread carrying it failed with {reply!r}"
                ) from reply
        return replies

    def post(self, command: tuple[str, bytes], callback: Callable[[Any], None]) -> Any:
        """Write one packed script call now and return without waiting for its reply;
        ``callback`` gets the reply later (or the :class:`FleetError` it translates to),
        in whichever thread reads it. Falsy, with nothing sent, when the call must be
        :meth:`send`-ed instead (its script has not answered on this connection yet);
        else a handle for :meth:`take_posted`.

        On a plain Redis the call is held for this process's next call, which writes it
        just ahead of itself (one write for both), or written within about a millisecond
        when nothing follows (:mod:`~celery_fleet.store.combiner`)."""

        def done(replies: list[Any]) -> None:
            reply = replies[0]
            if isinstance(reply, BaseException):  # only an error is translated
                reply = self._posted_reply(command, reply)
            callback(reply)

        combiner = self._combiner  # the property's work only when it has any to do
        if combiner is None or self._combiner_pid != os.getpid():
            combiner = self.combiner
        return combiner.post([command], done)

    def post_all(
        self, commands: list[tuple[str, bytes]], callback: Callable[[list[Any]], None]
    ) -> Any:
        """:meth:`post` for calls written together (one write, one round trip): a
        release and the quality verdict riding on it. ``callback`` gets every reply,
        each translated as in :meth:`post`."""

        def done(replies: list[Any]) -> None:
            callback([self._posted_reply(c, r) for c, r in zip(commands, replies, strict=True)])

        return self.combiner.post(commands, done)

    def _posted_reply(self, command: tuple[str, bytes], reply: Any) -> Any:
        if isinstance(reply, redis.RedisError):
            return self._translate(reply, f"script {command[0]!r}")
        if isinstance(reply, BaseException):
            return FleetError(f"celery-fleet script {command[0]!r} was not answered: {reply!r}")
        return reply

    def posted_pending(self) -> bool:
        """True while a call this process posted (a blocking slot's release) is held or
        its reply unread: a call on another wire of this process (an asyncio loop's) must
        :meth:`drain` first. Written is not enough: Redis serves connections in no set
        order, and a carrier on the wire may hold the release back a moment longer."""
        combiner = self._combiner
        if combiner is None or self._combiner_pid != os.getpid():
            return False
        return bool(getattr(combiner, "_held", None) or getattr(combiner, "_unread", None))

    def drain(self) -> None:
        """Read the replies of posted calls now. Every other call of this store does it
        first, so nothing this process asks is answered ahead of what it posted."""
        combiner = self._combiner
        if combiner is not None and self._combiner_pid == os.getpid():
            combiner.drain()

    @property
    def combiner(self) -> Combiner | ClusterCombiner:
        """This process's :class:`~celery_fleet.store.combiner.Combiner` (again after a fork),
        or for
        a Redis Cluster a :class:`~celery_fleet.store.cluster.ClusterCombiner` (same interface)."""
        pid = os.getpid()
        if self._combiner_pid != pid or self._combiner is None:
            cluster = self.target.cluster
            if self.target.kind == "client":  # a factory's client tells what it is
                try:
                    cluster = is_cluster(self.client)
                except redis.RedisError as exc:
                    raise self._translate(exc, "connect") from exc
            with self._lock:
                if self._combiner_pid != pid or self._combiner is None:
                    if cluster:
                        self._combiner = ClusterCombiner(lambda: self.client, self._load)
                    else:

                        def plain() -> redis.Redis:  # no typing.cast: a call per round trip
                            return self.client  # type: ignore[return-value]

                        health = lambda: self.health_s  # noqa: E731
                        self._combiner = Combiner(plain, self._load, self.wait_s, health)
                    self._combiner_pid = pid
        return self._combiner

    def _plain(self) -> bool:
        """True when this process's combiner is the plain one (not a Cluster's)."""
        return isinstance(self.combiner, Combiner)

    def _load(self, client: Client, script: str) -> None:
        client.script_load(script_source(script))

    def call(self, command: str, *args: Any) -> Any:
        """Run one plain Redis command with the same error translation as :meth:`run`,
        once more when the connection drops under it (the fleet only sends idempotent
        plain commands: reads, ``HDEL``, ``DEL``).

        On a plain Redis it goes on the combiner's wire, so like a script call it waits no
        longer than the caller's deadline and the health deadline: a status read or the
        ``INFO`` of a hand-over on a frozen Redis must not cost the socket timeout. The
        reply is parsed as redis-py would (its response callback for ``command``)."""
        for last in (False, True):
            try:
                if self._plain():
                    (reply,) = self._send(((command, pack_command(command, *args)),))
                    # a plain combiner means a plain redis.Redis client, never a Cluster
                    client = cast(redis.Redis, self.client)
                    parsers: Mapping[str, Callable[[Any], Any]] = client.response_callbacks
                    parse = parsers.get(command.upper())
                    return parse(reply) if parse is not None else reply
                self.drain()
                return self.client.execute_command(command, *args)  # type: ignore[no-untyped-call]
            except StoreUnavailable as error:
                if last or not error.dropped:
                    raise
            except redis.RedisError as exc:
                translated = self._translate(exc, command)
                if last or not getattr(translated, "dropped", False):
                    raise translated from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def write_many(self, commands: Sequence[tuple[Any, ...]]) -> None:
        """Send plain write commands (``("HINCRBY", key, field, 1)``...) in one round trip,
        not sent again after any error (a count written twice would be wrong).

        On a plain Redis they go on the combiner's wire, so a frozen Redis costs the health
        deadline, not the socket timeout (the counters flush of ``Fleet.close()``); on a
        Cluster, in a pipeline of the client's (keys on several nodes)."""
        if not commands:
            return
        if self._plain():
            self._send(tuple((str(c[0]), pack_command(*c)) for c in commands))
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for c in commands:
                    pipe.execute_command(*c)
                pipe.execute()
        except redis.RedisError as exc:
            raise self._translate(exc, "pipeline") from exc

    def _translate(self, exc: redis.RedisError, what: str) -> FleetError:
        """The fleet error for a Redis error: unreachable or unwritable Redis is
        :class:`StoreUnavailable`; anything else a :class:`FleetError` naming ``what``."""
        message = str(exc).replace(self.url, self.safe_url)
        if isinstance(exc, _UNAVAILABLE_ERRORS) or _UNAVAILABLE_REPLY.search(message):
            dropped = isinstance(exc, redis.ConnectionError)  # not a timeout: not frozen
            return StoreUnavailable(self.safe_url, f"{type(exc).__name__}: {message}", dropped)
        return FleetError(f"celery-fleet {what} failed on {self.safe_url}: {message}")

    def blpop(self, key: str, timeout_s: float) -> bool:
        """Block until ``key`` (a list) has an element, pop it and return True; False after
        ``timeout_s`` (at most :data:`MAX_BLOCK_S`).

        Runs on a second client of this process whose socket timeout outlasts the block,
        so a long wait is not mistaken for a dead server.
        """
        timeout = min(max(timeout_s, 0.01), MAX_BLOCK_S)  # 0 would block forever
        self.drain()
        try:
            reply = self._blpop(key, timeout)
        except redis.RedisError as exc:
            error = self._translate(exc, "BLPOP")
            if getattr(error, "dropped", False) and self.ping_once():
                # The pop may have happened with its reply lost: say "woken", so the
                # waiter asks again now (asking is always safe; a lost wake-up is not).
                return True
            raise error from exc
        return reply is not None

    def _blpop(self, key: str, timeout: float) -> Any:
        """BLPOP, waiting for its reply no longer than the block plus :attr:`health_s`: a
        frozen Redis answers nothing, and the socket timeout would hold the caller 15 s."""
        client = self.blocking_client
        if not isinstance(client, redis.Redis):  # a Cluster: its own connection handling
            return client.execute_command("BLPOP", key, f"{timeout:.3f}")  # type: ignore[no-untyped-call]
        pool = client.connection_pool
        conn = take_connection(pool)
        try:
            conn.send_command("BLPOP", key, f"{timeout:.3f}")
            return read_reply(conn, timeout + self.health_s)
        finally:
            pool.release(conn)  # a connection that timed out was disconnected by redis-py

    def ping_once(self) -> bool:
        """True when Redis answers one PING (no retry), False when it does not."""
        try:
            self.client.execute_command("PING")  # type: ignore[no-untyped-call]
        except redis.RedisError:
            return False
        return True

    @property
    def blocking_client(self) -> Client:
        """This process's client for blocking calls (socket timeout beyond ``MAX_BLOCK_S``)."""
        pid = os.getpid()
        if self._blocking_pid != pid or self._blocking is None:
            with self._lock:
                if self._blocking_pid != pid or self._blocking is None:
                    self._blocking = make_client(self.target, socket_timeout=MAX_BLOCK_S + 5.0)
                    self._blocking_pid = pid
        return self._blocking

    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` (naming the URL) unless Redis answers."""
        self.call("PING")

    def __repr__(self) -> str:
        return f"RedisStore({self.safe_url!r})"
