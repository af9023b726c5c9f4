"""A Sentinel-managed master that every connection of a process leaves together.

redis-py's Sentinel pool learns where the master is only when it opens a connection, and
keeps every connection it has. After a failover that is not enough: a master that was
frozen (``SIGSTOP``, a stalled VM) comes back still believing it is the master, and takes
writes until the sentinels demote it, up to ten seconds later. A connection kept to it, or
opened to it while it was frozen, splits the fleet's writes between two masters. So here:

- one :class:`FleetSentinel` per process and Sentinel URL is shared by all of the store's
  clients (its pool and its blocking client); whenever it learns that the master moved, it
  severs every connection it made to another address (in use or idle, and the combiner's
  own): their callers get a ``ConnectionError`` and the next connection asks the
  sentinels again;
- a :class:`FleetSentinelConnection` asks the sentinels again when a reply fails (a timeout,
  a dropped connection, a demoted master) or is slow (the master may have been frozen
  meanwhile), and before it writes after sitting idle as long (a process that made no call
  during the freeze would write to the old master when it resumes); a slow reply from a
  master the sentinels have since replaced is discarded (``ConnectionError``: it was
  written to a master that will be demoted and resynced), and one they cannot confirm (a
  failover under way) has its connection dropped before anything is written to it again;
  a failed reply from a master the sentinels still name (frozen, not failed over yet)
  closes the pool's idle connections to it and marks the others so, so that each call
  does not wait its own socket timeout there;
- a new connection checks that the server it reached says ``ROLE`` master (the sentinels
  name a promoted replica before it has finished taking the role, and a demoted master can
  still be named for a moment).

Nothing here adds a Redis round trip to a call: the checks run on a new connection, an
error, a slow reply, or the first write after a second idle (then one question to a
sentinel: a process calling more often than that never asks).

Example::

    manager = FleetSentinel([("s1", 26379), ("s2", 26379)], sentinel_kwargs={})
    client = manager.master_for("mymaster", redis_class=redis.Redis,
                                connection_pool_class=FleetSentinelPool, socket_timeout=5)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

from redis.connection import SSLConnection
from redis.exceptions import ConnectionError, ResponseError, TimeoutError
from redis.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)

__all__ = [
    "FleetSentinel",
    "FleetSentinelConnection",
    "FleetSentinelPool",
    "FleetSentinelSSLConnection",
    "SLOW_REPLY_S",
    "manager_for",
]

log = logging.getLogger("celery_fleet")

#: A reply slower than this (s) makes the connection ask the sentinels whether its master
#: is still the master (it may have been frozen while they promoted another).
SLOW_REPLY_S = 1.0
#: Asking the sentinels again within this time (s) reuses the last answer: many
#: connections failing at once ask once.
RECHECK_S = 0.2

Address = tuple[str, int]


def _sever(connection: Any) -> None:
    """Shut a connection's socket down without closing it: safe while another thread uses
    it (a blocked read returns, a write fails, both as ``ConnectionError``, and that thread
    disconnects it); an idle one is found closed and replaced by its pool."""
    sock = getattr(connection, "_sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FleetSentinel(Sentinel):
    """A ``redis.sentinel.Sentinel`` that remembers the master each service was last found
    at, and severs every connection it made to another address when that changes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # annotated in some redis-py versions only, hence both codes
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
        self._lock = threading.Lock()
        self._recheck = threading.Lock()
        self.masters: dict[str, Address] = {}
        #: The last :meth:`recheck` of each service: when, and what it found.
        self._answers: dict[str, tuple[float, Address | None]] = {}
        self._connections: weakref.WeakSet[FleetSentinelConnection] = weakref.WeakSet()
        self._pools: weakref.WeakSet[FleetSentinelPool] = weakref.WeakSet()
        #: Failovers this manager followed (for tests and logs).
        self.moves = 0

    def register(self, connection: FleetSentinelConnection) -> None:
        with self._lock:
            self._connections.add(connection)

    def register_pool(self, pool: FleetSentinelPool) -> None:
        with self._lock:
            self._pools.add(pool)

    def unreachable(self, service_name: str, address: Address) -> None:
        """A call to the master at ``address`` timed out or dropped, and the sentinels still
        name it (or none): every idle connection of the service's pools is closed, and every
        other connection to it is dropped before it is written to again, so each call does
        not wait its own socket timeout on a frozen master."""
        with self._lock:
            pools = [p for p in self._pools if p.service_name == service_name]
            suspects = [
                c
                for c in self._connections
                if c.connection_pool.service_name == service_name and (c.host, c.port) == address
            ]
        for connection in suspects:
            connection.unconfirmed = True
        for pool in pools:
            pool.disconnect(inuse_connections=False)

    def discover_master(self, service_name: str) -> Address:
        """Ask the sentinels (redis-py's rules); when the master moved, sever every
        connection to another address before returning the new one."""
        host, port = super().discover_master(service_name)
        address = (str(host), int(port))
        with self._lock:
            old = self.masters.get(service_name)
            self.masters[service_name] = address
            if old is None or old == address:
                return address
            self.moves += 1
            stale = [
                c
                for c in self._connections
                if c.connection_pool.service_name == service_name and (c.host, c.port) != address
            ]
        log.warning(
            "celery-fleet: Sentinel master %r moved from %s:%s to %s:%s; dropping %d "
            "connection(s) to the old one",
            service_name,
            *old,
            *address,
            len(stale),
        )
        for connection in stale:
            _sever(connection)
        return address

    def recheck(self, service_name: str) -> Address | None:
        """The master the sentinels name now (asked again unless they were just asked),
        or None when none is named (a failover under way) or no sentinel answers."""
        with self._recheck:
            asked, answer = self._answers.get(service_name, (None, None))
            if asked is not None and time.monotonic() - asked < RECHECK_S:
                return answer
            try:
                answer = self.discover_master(service_name)
            except (MasterNotFoundError, ConnectionError, TimeoutError):
                answer = None  # the last master found stays known, to compare the next with
            self._answers[service_name] = (time.monotonic(), answer)
            return answer


class FleetSentinelPool(SentinelConnectionPool):
    """``SentinelConnectionPool`` with :class:`FleetSentinelConnection`, that owns a
    connection only while it goes to the master its manager last found (and the sentinels
    did not fail to confirm it after a slow reply): one it does not own is dropped when it
    comes back to the pool, and by the combiner before it writes."""

    def __init__(self, service_name: str, sentinel_manager: FleetSentinel, **kwargs: Any):
        ssl = kwargs.pop("ssl", False)
        kwargs.setdefault(
            "connection_class", FleetSentinelSSLConnection if ssl else FleetSentinelConnection
        )
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        if isinstance(sentinel_manager, FleetSentinel):
            sentinel_manager.register_pool(self)

    def owns_connection(self, connection: Any) -> bool:
        if getattr(connection, "unconfirmed", False):
            return False
        master = self.sentinel_manager.masters.get(self.service_name)
        if master is not None and (connection.host, connection.port) != master:
            return False
        return bool(super().owns_connection(connection))  # type: ignore[no-untyped-call]


class FleetSentinelConnection(SentinelManagedConnection):
    """A connection to a Sentinel-managed master that asks the sentinels again after an
    error or a slow reply, and checks ``ROLE`` when it connects (see the module).

    ``slow_reply_s`` (None: never) is how slow a reply must be to make it ask, and how
    long the connection may sit idle before a write makes it ask first; the store's
    blocking client passes None (its replies are slow by design).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.slow_reply_s: float | None = kwargs.pop("slow_reply_s", SLOW_REPLY_S)
        #: A slow reply came and the sentinels named no master then: drop before writing.
        self.unconfirmed = False
        #: When this connection last connected or read a reply (monotonic).
        self.last_reply_at = 0.0
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        manager = self.connection_pool.sentinel_manager
        self._manager: FleetSentinel | None = None
        if isinstance(manager, FleetSentinel):
            self._manager = manager
            manager.register(self)

    def connect_to(self, address: Address) -> None:
        """Connect to ``address`` and check that it says it is the master."""
        self.unconfirmed = False
        self.last_reply_at = time.monotonic()
        super().connect_to(address)  # type: ignore[no-untyped-call]
        if not self.connection_pool.is_master:
            return
        self.send_command("ROLE")  # type: ignore[no-untyped-call]
        try:
            role = self.read_response()
        except ResponseError:  # ROLE not allowed (ACL): redis-py's own check only
            return
        name = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        if name != "master" or self.unconfirmed:  # a slow ROLE the sentinels did not confirm
            self.disconnect()  # type: ignore[no-untyped-call]
            raise ConnectionError(
                f"{address[0]}:{address[1]}, named master {self.connection_pool.service_name!r} "
                f"by the sentinels, says it is a {name}"
            )

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            # annotated in some redis-py versions only, hence both codes
            reply = super().read_response(*args, **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
        except (ConnectionError, TimeoutError):
            address = (self.host, self.port)
            master = self._ask_again()
            if self._manager is not None and master in (None, address):
                self._manager.unreachable(self.connection_pool.service_name, address)
            raise
        slow = self.slow_reply_s
        self.last_reply_at = now = time.monotonic()
        if slow is not None and now - started > slow and self._sock is not None:
            address = (self.host, self.port)
            master = self._ask_again()
            if master is None:
                # Not confirmed (a failover under way): its pool, and the combiner, drop it
                # before it is written to again. Not now: more replies may be due on it.
                self.unconfirmed = True
            elif master != address:
                self.disconnect()  # whatever else is on the wire came from there too
                raise ConnectionError(
                    f"a reply from {address[0]}:{address[1]} came after the sentinels "
                    f"made {master[0]}:{master[1]} the master: discarded"
                )
        return reply

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Send, unless the connection sat idle (``slow_reply_s``) through a failover: a
        process that made no call while its master was frozen would otherwise write to it
        when it resumes. Then ``ConnectionError``, nothing sent, and the caller's next
        connection goes to the new master."""
        idle = self.slow_reply_s
        if (
            idle is not None
            and self._sock is not None
            and time.monotonic() - self.last_reply_at > idle
        ):
            address = (self.host, self.port)
            master = self._ask_again()
            if master is not None and master != address:
                self.disconnect()
                raise ConnectionError(
                    f"the sentinels made {master[0]}:{master[1]} the master while this "
                    f"connection to {address[0]}:{address[1]} was idle: not sent"
                )
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

    def _ask_again(self) -> Address | None:
        manager = self._manager
        if manager is None or not self.connection_pool.is_master:
            return None
        return manager.recheck(self.connection_pool.service_name)


class FleetSentinelSSLConnection(FleetSentinelConnection, SSLConnection):
    """:class:`FleetSentinelConnection` over TLS."""


_managers: dict[tuple[Any, ...], FleetSentinel] = {}
_managers_lock = threading.Lock()


def manager_for(
    nodes: tuple[Address, ...], min_other_sentinels: int, sentinel_kwargs: dict[str, Any]
) -> FleetSentinel:
    """This process's :class:`FleetSentinel` for these sentinels: every client of a store
    (and of any store on the same sentinels) shares it, so what one connection learns about
    a failover reaches all. A forked child makes its own."""
    key = (os.getpid(), nodes, min_other_sentinels, repr(sorted(sentinel_kwargs.items())))
    with _managers_lock:
        manager = _managers.get(key)
        if manager is None:
            manager = FleetSentinel(
                list(nodes),
                min_other_sentinels=min_other_sentinels,
                sentinel_kwargs=dict(sentinel_kwargs),
            )
            _managers[key] = manager
        return manager
