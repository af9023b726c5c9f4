"""The combiner's connection: opened within a call's deadline, checked before a write,
replaced when its client is, and closed never under a round trip.

:class:`~celery_fleet.store.combiner.Combiner` writes on one connection of its own (no
pool: only the carrier of a batch touches it). This is that connection's life, apart from
the round trips on it:

- **Opening** within the batch's deadline: a frozen Redis completes the TCP handshake (the
  kernel does) but never answers redis-py's opening commands.
- **Checking** before a write (a ``poll``, no ``recv``): a socket the server closed (a
  restart, ``CLIENT KILL``, its idle timeout) or one with bytes nobody asked for is
  replaced before a command is written to it; so is one a Sentinel pool disowned.
- **Replacing** when the client changes, and **closing**: the replies of posted calls
  written and not read yet are read off the old connection first (they ran; failed as
  dropped, a release would be owed again and Redis taken for away), and a close waits for
  the carrier on the wire to leave it (closing the socket under a round trip surfaced raw
  ``OSError``/``AttributeError`` to its callers).
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from .posting import _Call
from .replies import BareReader, reader_for

log = logging.getLogger("celery_fleet")

#: A read waits on the socket's own timeout when the batch's deadline is at most this much
#: nearer (s): setting a timeout per read costs two syscalls on the hot path.
READ_SLACK_S = 0.1
#: A connection that answered within this long (s) is not polled for a close before the
#: next write (a syscall per round trip). 0: always polled. At 50 ms a Redis restarted
#: inside the window failed the next call as dropped, and a call that is not resent (a
#: lock's acquire: not idempotent) raised where the poll reconnects before writing (the
#: chaos suite's fencing scenario); the syscall is cheaper than that seam.
STALE_CHECK_S = 0.0
_HAS_POLL = hasattr(select, "poll")
#: Pools whose ``owns_connection`` is only the pid check the combiner makes itself (a
#: Sentinel pool's also asks whether the connection still goes to the master).
_PID_ONLY_POOLS = (redis.ConnectionPool, redis.BlockingConnectionPool)


class Wire:
    """The connection half of a combiner (see the module); the round trips are the
    combiner's own."""

    _client: Callable[[], redis.Redis]
    _health: Callable[[], float]
    _lock: threading.Lock
    _busy: bool
    _pid: int
    _conn: Any
    _conn_of: redis.Redis | None
    _reader: BareReader | None
    _unread: list[_Call]
    _closing: threading.Event | None
    _until: float
    _conn_timeout: float
    _own_timeout: bool
    _wire_checked: bool
    _poll: Any
    _polled_sock: Any
    _answered_at: float

    if TYPE_CHECKING:

        def drain(self) -> None: ...

        def _carry(self, first: list[_Call] | None, open_only: bool = False) -> None: ...

        def _read(self, conn: Any, script: str) -> Any: ...

    def close(self) -> None:
        """Write and read what is held (:meth:`drain`), then close the wire's connection
        (its store is closed: a later call would open a new one).

        Never under a round trip: with another thread on the wire (a call made after the
        drain), that carrier closes the connection as it leaves it, and this waits for
        that (at most the health deadline from the start of close(): its round trip ends
        by then on a live Redis). Nor with replies due (posted calls written after the
        drain): they are read first (closed unread, a release that ran failed as dropped:
        owed again, and Redis taken for away)."""
        if self._pid != os.getpid():
            return
        health = self._health()
        until = time.monotonic() + health + READ_SLACK_S
        try:
            self.drain()
        finally:
            closing: threading.Event | None = None
            carry = False
            with self._lock:
                if self._busy or self._unread:
                    closing = self._closing = self._closing or threading.Event()
                    if not self._busy:  # replies due, the wire free: read them here
                        self._busy = carry = True
                else:
                    self._close_connection()
            if carry:
                self._carry([])  # closes the connection as it leaves the wire
            elif closing is not None:
                closing.wait(None if math.isinf(health) else max(until - time.monotonic(), 0))

    def _close_connection(self) -> None:
        """(Under the lock, nobody on the wire) Close the connection; wake close()."""
        conn, self._conn, self._conn_of = self._conn, None, None
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:  # already broken
                log.debug("celery-fleet: closing the wire failed", exc_info=True)
        closing, self._closing = self._closing, None
        if closing is not None:
            closing.set()

    def _connection(self, answered: list[_Call]) -> tuple[redis.Redis, Any]:
        """The client, and the one connection this combiner writes on (only the carrier of
        a batch touches it, so it needs no pool: borrowing from redis-py's pool costs more
        than a round trip's own client work). Posted calls whose replies are due on a
        connection replaced are read there first (added to ``answered``)."""
        client = self._client()
        if self._conn is None or self._conn_of is not client:
            old = self._conn
            if old is not None:  # a client replaced: its connection is not reused
                try:
                    if self._unread and old._sock is not None:
                        self._read_due_on(old, answered)
                finally:
                    old.disconnect()
            pool = client.connection_pool
            options = dict(pool.connection_kwargs)
            # Its socket timeout is the health deadline: a read needs no timeout of its
            # own (two more syscalls) unless its caller's deadline is nearer.
            timeout = min(options.get("socket_timeout") or math.inf, self._health())
            if timeout < math.inf:
                options["socket_timeout"] = timeout
            self._conn = pool.connection_class(**options)
            self._reader = reader_for(self._conn)
            self._conn_of = client
            self._conn_timeout = timeout
        return client, self._conn

    def _read_due_on(self, conn: Any, answered: list[_Call]) -> None:
        """Read the replies of the posted calls written on ``conn`` and not read yet (its
        client replaced: they ran, and failed as dropped a release would be owed again and
        Redis taken for away), within their deadlines."""
        due, self._unread = self._unread, []
        self._until = until = max(call.until for call in due)
        left = until - time.monotonic()
        self._own_timeout = left < math.inf and left <= self._conn_timeout - READ_SLACK_S
        error: BaseException | None = None
        try:
            for call in due:
                call.replies = [self._read(conn, script) for script, _p in call.commands]
                call.finished = True
        except BaseException as exc:
            error = exc
            if not isinstance(exc, redis.RedisError):
                raise
        finally:
            for call in due:
                if not call.finished:
                    call.fail(error or redis.ConnectionError("reply not read"))
                answered.append(call)

    def _wire_ready(self, answered: list[_Call]) -> bool:
        """(On the wire) Whether the connection is open and fit to write on without
        opening one: :meth:`_check` drops a socket the server closed (a restart, CLIENT
        KILL, its idle timeout), which the round trip would open again, its handshake
        waiting up to the health deadline on a frozen Redis: the flusher's to open)."""
        try:
            _client, conn = self._connection(answered)
            self._check(conn)
        except Exception:  # the flusher's round trip meets it, and answers the calls
            log.debug("celery-fleet: looking at the wire failed", exc_info=True)
            return False
        self._wire_checked = conn._sock is not None  # the round trip that follows skips it
        return self._wire_checked

    def _connect(self, conn: Any) -> None:
        """Open the connection within the batch's deadline: a frozen Redis completes the
        TCP handshake (the kernel does) but never answers redis-py's opening commands,
        which would otherwise wait the whole socket timeout.

        The class's own connect(): a Sentinel connection asks the sentinels where the
        master is there; sending alone would dial its default address (localhost:6379),
        a different Redis."""
        if self._until == math.inf:
            conn.connect()
            return
        left = max(self._until - time.monotonic(), 0.001)
        saved = conn.socket_timeout, conn.socket_connect_timeout
        conn.socket_timeout = min(left, saved[0] or math.inf)
        conn.socket_connect_timeout = min(left, saved[1] or math.inf)
        try:
            conn.connect()
        finally:
            conn.socket_timeout, conn.socket_connect_timeout = saved
        # Replies are read with their own deadline; a write gets the usual timeout.
        if conn._sock is not None:
            conn._sock.settimeout(saved[0])
            # redis-py's parser took the lowered timeout for the connection's own when it
            # connected, and sets it back on the socket after every read with a timeout of
            # its own (redis-py 8): a later health-long read would then time out at this
            # batch's deadline. Set up again now (the handshake's replies are all read).
            conn._parser.on_connect(conn)

    def _stale(self, conn: Any) -> bool:
        """True when the socket has something to read (poll, no recv: a syscall)."""
        if not _HAS_POLL:  # Windows: redis-py's own (slower) check
            return bool(conn.can_read(timeout=0))
        sock = conn._sock
        if sock is not self._polled_sock:
            self._poll = select.poll()
            self._poll.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            self._polled_sock = sock
        return bool(self._poll.poll(0))

    def _check(self, conn: Any) -> None:
        """With no reply due, a readable socket was closed by the server (a restart, a
        timeout) or is out of step: start a fresh connection before writing, as redis-py's
        pool does on checkout. A command written to a dead socket may or may not have run
        (its round trip fails as dropped). Checking costs a syscall, so a socket that
        answered within :data:`STALE_CHECK_S` is taken as alive: a close inside that
        window fails the next round trip as dropped, as a close during it would.

        Nor is a connection its client's pool would no longer hand out: a Sentinel pool
        disowns one to a master that failed over (as soon as any of its connections asked
        the sentinels), while the old master may still take writes until it is demoted."""
        if self._unread or conn._sock is None:
            return
        try:
            stale = time.monotonic() - self._answered_at > STALE_CHECK_S and self._stale(conn)
            if self._reader is not None and self._reader.pending(conn):
                stale = True  # bytes nobody asked for: out of step
        except (OSError, ValueError, redis.ConnectionError):
            stale = True
        pool = getattr(self._conn_of, "connection_pool", None)
        if stale or (
            pool is not None
            and type(pool) not in _PID_ONLY_POOLS
            and not pool.owns_connection(conn)
        ):
            conn.disconnect()
