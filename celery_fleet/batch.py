"""The hot path's wire: script calls packed once, and coalesced across a process's threads.

Two costs dominate a decision on the client side, and both are paid per call by redis-py:

- **Packing.** ``execute_command`` encodes every argument of a 20-argument EVALSHA on every
  call, although all but four of them (lease id, tokens, age, join) are fixed per limit.
  :class:`Packed` encodes the fixed head and tail once, as RESP bytes, and a call only
  encodes what varies.
- **Round trips.** Sixteen threads of one process asking at once pay sixteen round trips,
  each a syscall pair and a wake-up of Redis. :class:`Combiner` sends whatever calls are
  ready in one write and reads their replies in order (flat combining): the first caller
  to find the wire free carries everyone's calls that arrived meanwhile, then hands the
  wire to the next waiting caller. A lone caller pays two uncontended lock operations.

Errors stay per call: a script error answers only its own caller, a dropped connection
fails the calls of that round trip (nothing is retried: an acquire must not be charged
twice), and a script Redis no longer has (NOSCRIPT after a restart or ``SCRIPT FLUSH``) is
loaded and its calls sent again.

This module knows nothing about admission; :class:`~celery_fleet.store.RedisStore` owns one
:class:`Combiner` per process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError

__all__ = ["Packed", "Combiner", "encode"]


def encode(value: object) -> bytes:
    """One argument as redis-py would send it (bytes as is, str as UTF-8, numbers by repr)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        raise TypeError("a bool is not a Redis argument")  # redis-py refuses them too
    if isinstance(value, int | float):
        return repr(value).encode()
    raise TypeError(f"cannot send {type(value).__name__} to Redis")


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


class Packed:
    """An EVALSHA whose keys and trailing arguments are fixed, packed once as RESP.

    ``Packed(script, sha, keys, n_varying, tail).pack(a, b, ...)`` returns the bytes of
    ``EVALSHA sha len(keys) *keys a b ... *tail``: the ``n_varying`` arguments in front of
    the tail are the only ones encoded per call.
    """

    __slots__ = ("script", "_head", "_tail", "_n")

    def __init__(
        self, script: str, sha: str, keys: Sequence[str], n_varying: int, tail: Sequence[object]
    ) -> None:
        self.script = script
        self._n = n_varying
        parts = 3 + len(keys) + n_varying + len(tail)
        fixed = [b"EVALSHA", sha.encode(), str(len(keys)).encode(), *map(encode, keys)]
        self._head = b"*%d\r\n" % parts + b"".join(map(_bulk, fixed))
        self._tail = b"".join(_bulk(encode(x)) for x in tail)

    def pack(self, *varying: object) -> bytes:
        if len(varying) != self._n:
            raise TypeError(f"{self.script}: {self._n} varying arguments, got {len(varying)}")
        return self._head + b"".join([_bulk(encode(x)) for x in varying]) + self._tail


class _Call:
    """Some commands of one caller, sent together, and their replies or errors."""

    __slots__ = ("commands", "replies", "lead", "done", "finished")

    def __init__(self, commands: list[tuple[str, bytes]]) -> None:
        self.commands = commands  # (script name, packed EVALSHA)
        self.replies: list[Any] = []
        self.lead = False
        self.finished = False
        self.done = threading.Lock()
        self.done.acquire()  # released by whoever carried this call (or hands it the wire)

    def result(self) -> list[Any]:
        return self.replies


class Combiner:
    """Sends a process's packed script calls, coalescing those made at the same time.

    ``client`` returns this process's redis-py client (its pool lends the connection);
    ``load(script)`` loads a script's source after NOSCRIPT. Replies are returned in the
    order of the commands; an error reply is returned as the exception instance (raising is
    the caller's choice), a lost connection raises for the whole call.
    """

    def __init__(
        self, client: Callable[[], redis.Redis], load: Callable[[redis.Redis, str], None]
    ) -> None:
        self._client = client
        self._load = load
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
        self._busy = False
        self._conn: Any = None
        self._conn_of: redis.Redis | None = None

    def send(self, commands: list[tuple[str, bytes]]) -> list[Any]:
        """Send ``(script, packed)`` commands in one round trip (shared with other threads')
        and return their replies, each a value or a ``redis.RedisError`` instance."""
        me = _Call(commands)
        with self._lock:
            self._queue.append(me)
            waiting, self._busy = self._busy, True
        if waiting:
            me.done.acquire()
            if not me.lead:
                return me.result()
        self._carry()
        return me.result()

    def _carry(self) -> None:
        """Take every queued call, send them in one round trip, then pass the wire on."""
        with self._lock:
            batch, self._queue = self._queue, []
        error: BaseException | None = None
        try:
            self._round_trip(batch)
        except BaseException as exc:  # the callers in the batch must not wait forever
            error = exc
            raise
        finally:
            for call in batch:
                if not call.finished:
                    lost = error or RuntimeError("celery-fleet: call not sent")
                    call.replies = [lost] * len(call.commands)
                    call.finished = True
                call.done.release()
            with self._lock:
                if self._queue:
                    heir = self._queue[0]
                    heir.lead = True
                    heir.done.release()
                else:
                    self._busy = False

    def _connection(self) -> tuple[redis.Redis, Any]:
        """The client, and the one connection this combiner writes on (only the carrier of
        a batch touches it, so it needs no pool: borrowing from redis-py's pool costs more
        than a round trip's own client work)."""
        client = self._client()
        if self._conn is None or self._conn_of is not client:
            pool = client.connection_pool
            self._conn = pool.connection_class(**pool.connection_kwargs)
            self._conn_of = client
        return client, self._conn

    def _round_trip(self, batch: list[_Call]) -> None:
        client, conn = self._connection()
        try:
            for call in batch:
                call.replies = [None] * len(call.commands)
            todo = [(call, i) for call in batch for i in range(len(call.commands))]
            for attempt in range(2):  # the second only for commands whose script Redis lost
                conn.send_packed_command([b"".join(c.commands[i][1] for c, i in todo)])
                missing: dict[str, None] = {}
                for call, i in todo:
                    try:
                        call.replies[i] = conn.read_response()
                    except redis.ResponseError as exc:
                        call.replies[i] = exc
                        if isinstance(exc, NoScriptError) and attempt == 0:
                            missing[call.commands[i][0]] = None
                todo = [(c, i) for c, i in todo if c.commands[i][0] in missing]
                if not todo:
                    break
                for script in missing:
                    self._load(client, script)
            for call in batch:
                call.finished = True
        except redis.RedisError as exc:
            conn.disconnect()  # the next round trip connects again
            for call in batch:
                call.replies = [exc] * len(call.commands)
                call.finished = True
