"""The fleet's Redis for asyncio callers: the same scripts, on ``redis.asyncio``.

:class:`AsyncStore` mirrors :class:`~celery_fleet.store.sync.RedisStore`'s ``run`` and ``send``
with awaited calls, so the admission logic written once as calls
(:mod:`celery_fleet.store.calls`) runs unchanged in an event loop: the hot path is still one
round trip (one packed ``EVALSHA``, written as the blocking store writes it), ``NOSCRIPT``
loads the script and sends again, a dropped connection is retried once for idempotent
scripts, and every Redis error becomes the same
:class:`~celery_fleet.errors.StoreUnavailable` or :class:`~celery_fleet.errors.FleetError`.

A ``redis.asyncio`` client belongs to the event loop it first ran in: one is made per loop
(and per process). Sentinel and Cluster URLs, and clients of your own, are served by the
blocking API only for now (a :class:`~celery_fleet.errors.ConfigError` says so).

This module knows nothing about Celery.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from ..errors import ConfigError, StoreUnavailable
from .compat import atake_connection
from .sync import IDEMPOTENT, RedisStore, script_source

__all__ = ["AsyncStore"]


class AsyncStore:
    """Awaitable ``run``/``send`` on the Redis of a :class:`RedisStore`."""

    def __init__(self, store: RedisStore) -> None:
        if store.target.kind != "redis":
            raise ConfigError(
                f"fleet.aslot needs a redis://, rediss:// or unix:// fleet Redis for now; "
                f"{store.safe_url} is a {store.target.kind}: use fleet.slot in a thread "
                f"(asyncio.to_thread) there"
            )
        self.store = store
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[int, aioredis.Redis]
        ] = weakref.WeakKeyDictionary()
        self._wires: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[int, _Wire]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def client(self) -> aioredis.Redis:
        """The running loop's client (made on first use, and again after a fork)."""
        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)
        if found is None or found[0] != os.getpid():
            target = self.store.target  # the same options as the blocking client's
            client = aioredis.Redis.from_url(target.url, **target.options)
            found = self._clients[loop] = (os.getpid(), client)
        return found[1]

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA ``script`` (loading it on NOSCRIPT), translated errors; sent again on a
        new connection when the connection drops under an idempotent script."""
        try:
            return await self._run(script, keys, args)
        except StoreUnavailable as exc:
            if not (exc.dropped and script in IDEMPOTENT):
                raise
            return await self._run(script, keys, args)

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        (reply,) = await self._send(((script, self.store.packed(script, keys, 0, args).pack()),))
        return reply

    async def send(self, *commands: tuple[str, bytes]) -> list[Any]:
        """Packed script calls (as :meth:`RedisStore.send` takes them) in one round trip,
        coalesced with those of the loop's other coroutines on one connection; replies in
        order, the first error raised (sent once more when the connection drops under
        calls that are all idempotent)."""
        try:
            return await self._send(commands)
        except StoreUnavailable as exc:
            if not (exc.dropped and all(script in IDEMPOTENT for script, _ in commands)):
                raise
            return await self._send(commands)

    async def _send(self, commands: tuple[tuple[str, bytes], ...]) -> list[Any]:
        # A release a blocking slot of this process left for its next call (within ~1 ms)
        # goes first, answered: this call must not be answered ahead of it (a freed slot
        # taken). In a thread: the blocking wire's turn may take a round trip or more.
        if self.store.posted_pending():
            await asyncio.get_running_loop().run_in_executor(None, self.store.drain)
        replies = await self.wire.send(commands)
        for (script, _packed), reply in zip(commands, replies, strict=True):
            if isinstance(reply, redis.RedisError):
                raise self.store._translate(reply, f"script {script!r}") from reply
        return replies

    @property
    def wire(self) -> _Wire:
        """The running loop's wire (one connection; made on first use)."""
        loop = asyncio.get_running_loop()
        found = self._wires.get(loop)
        if found is None or found[0] != os.getpid():
            found = self._wires[loop] = (os.getpid(), _Wire(self.client, self.store.wait_s))
        return found[1]

    async def aclose(self) -> None:
        """Close the running loop's connections (before the loop ends, e.g. at the end of
        the coroutine ``asyncio.run`` runs; a loop kept for the process needs none)."""
        loop = asyncio.get_running_loop()
        wire = self._wires.pop(loop, None)
        if wire is not None:
            await wire[1]._drop()
        client = self._clients.pop(loop, None)
        if client is not None:
            await client[1].aclose()


class _Wire:
    """One connection per event loop on which every coroutine's packed calls go, coalesced.

    A caller queues its calls with a future each; a carrier task (one at a time) writes
    whatever is queued in one write, reads the replies in order and resolves the futures,
    until the queue is empty. A caller cancelled meanwhile only drops its future: its reply
    is still read, so the connection stays in step. ``NOSCRIPT`` loads the script and sends
    the call once more; a broken connection fails that batch (as a ``ConnectionError``
    reply) and the next batch opens a new one.
    """

    def __init__(self, client: aioredis.Redis, wait_s: Callable[[], float]) -> None:
        self.client = client
        #: How long the carrier reads a batch's replies (its caller's deadline, at most
        #: the store's health deadline): a frozen Redis is an outage, not a long wait.
        self.wait_s = wait_s
        self.conn: Any = None
        self.pending: list[tuple[tuple[str, bytes], asyncio.Future[Any], int]] = []
        self.carrier: asyncio.Task[None] | None = None

    async def send(self, commands: tuple[tuple[str, bytes], ...]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self.pending += [(c, f, 0) for c, f in zip(commands, futures, strict=True)]
        if self.carrier is None or self.carrier.done():
            self.carrier = loop.create_task(self._carry())
        return [await f for f in futures]

    async def _carry(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                if self.conn is None:
                    self.conn = await atake_connection(self.client.connection_pool)
                await self.conn.send_packed_command(b"".join(c[1] for c, _f, _n in batch))
                replies: list[Any] = []
                until = time.monotonic() + self.wait_s()
                for _ in batch:
                    try:
                        left = max(until - time.monotonic(), 0.001)
                        replies.append(await asyncio.wait_for(self.conn.read_response(), left))
                    except redis.ResponseError as exc:  # an error reply: still in step
                        replies.append(exc)
            except Exception as exc:
                # Whatever broke off the batch fails its callers: a future left unresolved
                # would hang its caller for good (a redis-py API mismatch did, on 5.0).
                await self._drop()
                error: redis.RedisError
                if isinstance(exc, (redis.TimeoutError, TimeoutError, asyncio.TimeoutError)):
                    error = redis.TimeoutError(str(exc))  # a frozen Redis: not resent
                elif isinstance(exc, redis.ConnectionError):
                    error = exc
                elif isinstance(exc, (redis.RedisError, OSError)):
                    error = redis.ConnectionError(f"{type(exc).__name__}: {exc}")
                else:  # a defect, not an outage: not sent again as a dropped connection
                    error = redis.RedisError(f"{type(exc).__name__}: {exc}")
                if isinstance(error, redis.TimeoutError):
                    # Not written to the server that just did not answer: they fail too.
                    batch, self.pending = batch + self.pending, []
                for _c, f, _n in batch:
                    _resolve(f, error)
                continue
            again = []
            for (command, f, n), reply in zip(batch, replies, strict=True):
                if isinstance(reply, NoScriptError) and n == 0:
                    again.append((command, f, 1))
                else:
                    _resolve(f, reply)
            if again:
                try:
                    for script in {c[0] for c, _f, _n in again}:
                        await self.client.script_load(script_source(script))
                except redis.RedisError as exc:
                    for _c, f, _n in again:
                        _resolve(f, exc)
                    continue
                self.pending[:0] = again

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                await conn.disconnect()
            except Exception:  # already broken
                pass


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
