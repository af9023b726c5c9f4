"""The hot path's wire: script calls packed once, and coalesced across a process's threads.

Three costs dominate a decision on the client side, and redis-py pays each per call:

- **Packing.** A call's fixed arguments are encoded once per limit
  (:class:`~celery_fleet.store.packing.Packed`); only what varies is encoded per call.
- **Round trips.** Sixteen threads of one process asking at once pay sixteen round trips,
  each a syscall pair and a wake-up of Redis. :class:`Combiner` sends whatever calls are
  ready in one write and reads their replies in order (flat combining): the first caller
  to find the wire free carries everyone's calls that arrived meanwhile, then hands the
  wire to the next waiting caller. A lone caller pays two uncontended lock operations.
- **A write of its own for a reply nobody needs now.** A release is posted: held for the
  process's next call on this wire, which writes it just ahead of itself (or a flusher
  within :data:`~celery_fleet.store.posting.FLUSH_S`), or taken back by an ask of the same
  limit and run inside it (:meth:`Combiner.send`'s ``rider``). A busy process thus pays
  one round trip and one write per decision (:mod:`celery_fleet.store.posting`). Anything
  this process asks Redis after a post is ordered after it (a call takes the held ones
  first; :class:`~celery_fleet.store.sync.RedisStore` drains before the calls that bypass
  this wire). One exception: a post an ask takes back runs inside that ask, so a call of
  another thread that got onto the wire ahead of the ask (queued before it, or between
  the take and its queueing) still sees the post's lease held. Only concurrent callers
  meet it: between them the order was never promised, and a slot freed a round trip
  later goes to one of them either way.

Errors stay per call: a script error answers only its own caller, a dropped connection
fails the calls of that round trip (nothing is retried: an acquire must not be charged
twice), and a script Redis no longer has (NOSCRIPT after a restart or ``SCRIPT FLUSH``) is
loaded and its calls sent again.

**A frozen Redis** (SIGSTOP, a long ``DEBUG SLEEP``, a stalled VM) accepts connections and
writes but answers nothing. Every call carries a deadline (``bound()``, taken in the
caller's thread: the caller's remaining ``max_wait``, at most a short health deadline),
the carrier reads replies no later than the batch's last deadline, and a waiter stops
waiting at its own. A round trip that times out fails every call queued behind it at
once, with the same timeout, rather than writing them to the server that just did not
answer.

The connection the combiner writes on (opened within a deadline, checked before a
write, closed never under a round trip) is :mod:`celery_fleet.store.wire`'s.

This module knows nothing about admission; :class:`~celery_fleet.store.sync.RedisStore` owns one
:class:`Combiner` per process.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import NoScriptError

from . import replies as bare
from .compat import read_reply
from .packing import Packed, encode, pack_command
from .posting import FLUSH_S, Posting, _Call, _live, _multiprocessing_child, flush_all
from .replies import BareReader
from .wire import READ_SLACK_S, Wire

__all__ = ["Packed", "Combiner", "encode", "pack_command", "flush_all", "FLUSH_S"]

log = logging.getLogger("celery_fleet")


class Combiner(Wire, Posting):
    """Sends a process's packed script calls, coalescing those made at the same time.

    ``client`` returns this process's redis-py client (its connection settings are used for
    the combiner's own connection); ``load(client, script)`` loads a script's source after
    NOSCRIPT. Replies are returned in the order of the commands; an error reply is returned
    as the exception instance (raising is the caller's choice). ``bound()`` is how long (s)
    a call made now may wait for its reply, read in the caller's thread (default: no bound
    but the connection's socket timeout); past it the call's reply is a
    ``redis.TimeoutError``. ``health()`` is the longest any call waits (the socket timeout
    of the combiner's connection). ``flush_s`` is how long a posted call waits for another
    call to carry it before the flusher writes it (:data:`FLUSH_S`).
    """

    def __init__(
        self,
        client: Callable[[], redis.Redis],
        load: Callable[[redis.Redis, str], None],
        bound: Callable[[], float] | None = None,
        health: Callable[[], float] | None = None,
        flush_s: float = FLUSH_S,
    ) -> None:
        self._client = client
        self._load = load
        self._bound = bound or (lambda: math.inf)
        self._health = health or (lambda: math.inf)
        self._lock = threading.Lock()
        #: Callers waiting for the wire (posted calls are never queued: they are held).
        self._queue: list[_Call] = []
        self._busy = False
        self._conn: Any = None
        self._conn_of: redis.Redis | None = None
        #: Reads the connection's replies off its socket (None: redis-py's parser reads).
        self._reader: BareReader | None = None
        #: Posted calls not written yet, in post order: the next batch writes them first.
        #: A deque: appending and popping are atomic, so posting takes no lock.
        self._held: deque[_Call] = deque()
        #: Posted calls written to the wire whose replies are not read yet, in wire order.
        self._unread: list[_Call] = []
        self._poll: Any = None
        self._polled_sock: Any = None
        #: Monotonic time of the wire's last reply: a socket that answered just now is
        #: not polled before the next write (see STALE_CHECK_S).
        self._answered_at = -math.inf
        #: Scripts Redis answered for on this wire (a posted call must not meet NOSCRIPT).
        self._loaded: set[str] = set()
        #: Monotonic time the carrier reads the current batch's replies until.
        self._until = math.inf
        #: The socket timeout of the combiner's connection (s), and whether the current
        #: batch's reads need a nearer one of their own.
        self._conn_timeout = math.inf
        self._own_timeout = False
        #: Whether the current round trip met NOSCRIPT (a script Redis lost).
        self._lost = False
        #: The wire was just checked (_wire_ready, a poster writing at once): the round
        #: trip that follows at once does not check it again (a syscall).
        self._wire_checked = False
        #: close() found a carrier on the wire: set when the carrier, leaving it, closed
        #: the connection (closing it under the carrier broke its round trip with raw
        #: OSError / AttributeError from the socket or redis-py's handshake).
        self._closing: threading.Event | None = None
        self.flush_s = flush_s
        #: The flusher: one daemon thread, started by the first post, asleep on ``_wake``
        #: until armed (``_flusher_idle``: an arming must wake it).
        self._wake = threading.Condition(threading.Lock())
        self._flusher: threading.Thread | None = None
        self._flusher_idle = False
        #: Something is held with the wire free: the flusher is to look (see _arm).
        self._armed = False
        #: The process this combiner belongs to: a forked child never writes its calls.
        self._pid = os.getpid()
        #: Write a posted call at once (its reply still read later) instead of holding it:
        #: in a multiprocessing Pool's worker, killed as soon as the pool ends.
        self.write_now = _multiprocessing_child()
        #: Posts the flusher wrote in a row, and when the last post was made: while the
        #: first is at WRITE_AT_ONCE_AFTER posts are written at once (see posting).
        self._unpaid = 0
        self._posted_at = -math.inf
        _live.add(self)

    def send(self, commands: list[tuple[str, bytes]], rider: _Call | None = None) -> list[Any]:
        """Send ``(script, packed)`` commands in one round trip (shared with other threads',
        and writing the posted calls held so far just ahead of them) and return their
        replies, each a value or a ``redis.RedisError`` instance.

        ``rider``: a posted call this caller :meth:`take`-s out of the held ones and folded
        into its first command (a release riding in an acquire: one script call for both).
        Its callback gets ``[1]`` from that command's reply, ``[0]`` when the reply is
        ``["lost", reply]`` (the first command's own reply is then the second element), or
        the command's error. When the send raises (an interrupt), the rider is held again."""
        me = _Call(commands, None, self._bound())
        if me.at - self._posted_at < self.flush_s:
            self._unpaid = 0  # a call soon after a post: holding pays again
        try:
            with self._lock:
                if not self._busy:  # the usual case: a lone caller carries its own call
                    self._busy = True
                    if self._queue:
                        batch, self._queue = self._queue, []
                        batch.append(me)
                    else:
                        batch = [me]
                    done = None
                else:
                    self._queue.append(me)
                    done = me.wait_here()
            if done is None:
                self._carry(batch)
                replies = me.replies
            else:
                replies = self._wait_for_wire(me, done)
        except BaseException:
            if rider is not None:
                # Broken off (an interrupt: a gevent Timeout while queued, Celery's soft
                # time limit, ^C), maybe before the ask was written: the rider is held
                # again for the next call, as it was before it was taken. Run twice, a
                # lean release finds its lease gone (reported lost); dropped, its slot
                # would stay taken for the lease's whole TTL.
                self._hold_again(rider)
            raise
        if rider is not None:
            replies[0] = self._settle_rider(rider, replies[0])
        return replies

    def _wait_for_wire(self, me: _Call, done: threading.Lock) -> list[Any]:
        """A queued caller: wait until its call is carried (its replies), or until it is
        handed the wire (it carries the queue), or its deadline passes."""
        try:
            left = me.until - time.monotonic()
            if not done.acquire(timeout=min(max(left, 0.0), threading.TIMEOUT_MAX)):
                return self._give_up(me)
        except BaseException:  # Ctrl-C, a gevent Timeout: never leave the wire stuck
            self._abandon(me)
            raise
        if not me.lead:
            return me.replies
        self._carry(None)
        return me.replies

    def _give_up(self, me: _Call) -> list[Any]:
        """A waiter's deadline passed before its replies came: its replies if they came
        meanwhile, else a timeout each (a call already written may still run)."""
        self._abandon(me)
        with self._lock:
            if me.finished and not (me.lead and me in self._queue):
                return me.replies
        error = redis.TimeoutError("no reply within the caller's deadline (Redis frozen?)")
        return [error] * len(me.commands)

    def _abandon(self, me: _Call) -> None:
        """A caller stopped waiting: take its call out of the queue, or, if it had just been
        handed the wire, hand the wire on (a call already being carried finishes alone)."""
        rearm = False
        with self._lock:
            if me in self._queue:
                self._queue.remove(me)
                if me.lead:
                    rearm = self._hand_on()
        if rearm:
            self._arm()

    def _hand_on(self) -> bool:
        """(Under the lock) give the wire to the first waiting caller (it writes the held
        posted calls first), or free it; True when freed with posted calls held (the
        caller then arms the flusher, once out of the lock). A close asked meanwhile
        closes the connection first (nobody is on it now)."""
        if self._closing is not None:
            self._close_connection()
        if self._queue:
            heir = self._queue[0]
            heir.lead = True
            heir.hand_back()
            return False
        self._busy = False
        return bool(self._held)

    def _carry(self, first: list[_Call] | None, open_only: bool = False) -> None:
        """Send the batch ``first`` (or every queued call), with the held posted calls
        ahead of it, in one round trip; then pass the wire on to a caller that waits
        (one carries at most one batch of its own). With ``open_only`` (a poster writing
        its release at once) the held calls are written only when the wire is open and
        fit to write on; else they stay held, for the flusher to open the wire."""
        answered: list[_Call] = []
        try:
            error: BaseException | None = None
            if first is None:
                with self._lock:
                    first, self._queue = self._queue, []
            batch = first
            held = self._held
            left_held = False
            try:
                # (On the wire from here: whatever breaks off, the finally frees it.)
                left_held = open_only and bool(held) and not self._wire_ready(answered)
                if held and not left_held:
                    # taken after the queue: a call queued after a post goes after it
                    posted = []
                    while held:
                        try:
                            posted.append(held.popleft())
                        except IndexError:
                            break
                    batch = posted + batch
                # Nothing to write when the flusher (or flush) finds what it saw held gone:
                # an ask took it back to ride in (take), or a carrier wrote it meanwhile.
                timed_out = self._round_trip(batch, answered) if batch else None
                if timed_out is not None:
                    self._fail_queued(timed_out, answered)
            except BaseException as exc:  # the callers in the batch must not wait forever
                error = exc
                raise
            finally:
                self._wire_checked = False  # (left set when an ask took the held ones back)
                for call in batch:
                    if not call.finished and call not in self._unread:
                        call.fail(error or RuntimeError("celery-fleet: call not sent"))
                        if call.callback is not None and call not in answered:
                            answered.append(call)
                    if call.done is not None:  # call.hand_back(), inline
                        call.done.release()
                with self._lock:
                    if self._queue or self._closing is not None:
                        # a close waits: replies due are read before (None), off the lock
                        due = self._closing is not None and self._unread
                        rearm = None if due else self._hand_on()
                    else:  # _hand_on() with nobody waiting, inline: free the wire
                        self._busy = False
                        rearm = bool(self._held)
                if rearm is None:
                    rearm = self._read_due_then_hand_on(answered)
                if rearm:
                    if left_held:  # the wire is to open: the flusher's
                        self._arm_flusher()
                    else:
                        self._arm()
        finally:
            # Off the wire: a callback may itself call Redis.
            for call in answered:
                if call.callback is None:
                    continue
                try:
                    call.callback(call.replies)
                except Exception:  # never into the unrelated caller that read it
                    log.exception("celery-fleet: handling a posted reply failed")

    def _read_due_then_hand_on(self, answered: list[_Call]) -> bool:
        """(The carrier, leaving the wire while a close waits) Read the replies of the
        posted calls written and not read yet, then hand the wire on (:meth:`_hand_on`
        closes the connection): closed unread, they failed as dropped though they ran."""
        try:
            due = _Call([], None, self._bound())  # read up to it: everything written before
            timed_out = self._round_trip([due], answered)
            if timed_out is not None:
                self._fail_queued(timed_out, answered)
        except Exception:  # failed with it, in the round trip
            log.debug("celery-fleet: reading replies due before a close failed", exc_info=True)
        finally:
            with self._lock:
                rearm = self._hand_on()
        return rearm

    def _fail_queued(self, error: redis.TimeoutError, answered: list[_Call]) -> None:
        """Redis did not answer in time: fail every call queued meanwhile with the same
        timeout instead of writing it to the server that just did not answer (a frozen
        Redis would make each batch wait its whole deadline again). Posted calls held
        meanwhile fail with it: a release is then owed, as when its write fails."""
        with self._lock:
            stuck, self._queue = self._queue, []
        while self._held:
            try:
                stuck.append(self._held.popleft())
            except IndexError:
                break
        for call in stuck:
            call.fail(error)
            if call.callback is not None:
                answered.append(call)
            call.hand_back()

    def _round_trip(self, batch: list[_Call], answered: list[_Call]) -> redis.TimeoutError | None:
        """Write ``batch``, then read replies up to the last call someone waits for; posted
        calls after it stay unread. Posted calls whose replies were read (or that failed)
        are added to ``answered``, whatever happens. Returns the timeout when Redis did not
        answer by the batch's last deadline (the calls of the batch failed with it)."""
        client, conn = self._connection(answered)
        if self._wire_checked:  # just now, by _wire_ready (on the wire): not again
            self._wire_checked = False
        else:
            self._check(conn)  # before taking the unread ones: their replies are due
        if conn._sock is None:
            self._loaded = set()  # a new connection, maybe a new server: scripts unknown
            if self._unread:
                # Written on a socket closed since (close(), or the connection of a client
                # replaced): their replies went with it. Read off this one, they would take
                # the callers' replies (out of step).
                gone = redis.ConnectionError("closed before the reply was read")
                for call in self._unread:
                    call.fail(gone)
                    answered.append(call)
                self._unread = []
        # wire order: the unread ones were written before
        pending = self._unread + batch if self._unread else batch
        self._unread = []
        self._lost = False
        error: BaseException | None = None
        # Nobody waits past the batch's last deadline: read no longer than that (on the
        # socket's own timeout, the health deadline, unless the deadline is clearly
        # nearer: a caller's remaining max_wait; READ_SLACK_S is what a round trip's own
        # work may have used of a health-long deadline). Posted calls wait for nobody:
        # their deadlines (health-long, taken when posted) count only when no caller's
        # does, else a release read ahead of a caller held it past its max_wait on a
        # frozen Redis (the release then fails with the caller's call: it is owed).
        if len(pending) == 1:
            until = pending[0].until
        else:
            until = -math.inf
            for call in pending:
                if call.callback is None and call.until > until:
                    until = call.until
            if until == -math.inf:
                until = max(c.until for c in pending)
        self._until = until
        left = until - time.monotonic()
        self._own_timeout = left < math.inf and left <= self._conn_timeout - READ_SLACK_S
        try:
            if len(batch) == 1 and len(batch[0].commands) == 1:  # a lone caller's one call
                data = batch[0].commands[0][1]
            else:
                data = b"".join([p for c in batch for _s, p in c.commands])
            if data:
                if conn._sock is None:
                    self._connect(conn)
                self._write(conn, data)
            last = len(pending) - 1
            while last >= 0 and pending[last].callback is not None:
                last -= 1  # posted calls at the end stay unread
            read = self._read
            for call in pending[: last + 1]:
                commands = call.commands
                if len(commands) == 1:  # the usual call: no comprehension (a frame)
                    call.replies = [read(conn, commands[0][0])]
                else:
                    call.replies = [read(conn, script) for script, _p in commands]
                call.finished = True
            if last >= 0:
                self._answered_at = time.monotonic()
            rest = pending[last + 1 :]
            if self._lost:
                # Commands are about to be sent again: read what is on the wire first.
                for call in rest:
                    call.replies = [read(conn, script) for script, _p in call.commands]
                    call.finished = True
                rest = []
            self._unread = rest
            if self._lost:
                done = [c for c in pending if c.finished]
                self._send_again_what_redis_lost(client, conn, done)
        except BaseException as exc:
            # Whatever broke off the round trip, replies may still be on their way: this
            # socket is out of step for good, and every call not answered fails with it.
            error = exc
            conn.disconnect()
            self._unread = []
            if self._lost:
                # NOSCRIPT answered before the break: those commands never ran, and are
                # not sent again now. They fail with the break, not with NOSCRIPT as their
                # answer: a release is then owed (sent again when Redis answers), not left
                # to its lease's TTL.
                for call in pending:
                    if call.finished and any(isinstance(r, NoScriptError) for r in call.replies):
                        call.finished = False
            if not isinstance(exc, redis.RedisError):
                raise
        finally:
            for call in pending:
                if error is not None and not call.finished:
                    call.fail(error)
                if call.callback is not None and call.finished and call not in answered:
                    answered.append(call)
        return error if isinstance(error, redis.TimeoutError) else None

    def _send_again_what_redis_lost(
        self, client: redis.Redis, conn: Any, calls: list[_Call]
    ) -> None:
        """After NOSCRIPT (Redis restarted or flushed its scripts): load, send those again.

        Commands after a lost one in the same round trip have run already: order between
        them is not kept (a restart clears which scripts this connection saw, so a posted
        release is not sent before its script answered again).
        """
        lost = [
            (call, i)
            for call in calls
            for i, reply in enumerate(call.replies)
            if isinstance(reply, NoScriptError)
        ]
        if not lost:
            return
        for call, _i in lost:
            call.finished = False  # a failure from here on is theirs
        for script in {call.commands[i][0] for call, i in lost}:
            self._load(client, script)
        if conn._sock is None:
            self._connect(conn)
        self._write(conn, b"".join(call.commands[i][1] for call, i in lost))
        for call, i in lost:
            call.replies[i] = self._read(conn, call.commands[i][0])
        for call, _i in lost:
            call.finished = True

    def _write(self, conn: Any, data: bytes) -> None:
        """Write ``data`` on the (connected) connection."""
        if self._reader is not None:
            bare.send(conn, data)  # looked up per call: a benchmark's spy may wrap it
        else:
            conn.send_packed_command([data])

    def _read(self, conn: Any, script: str) -> Any:
        """One reply, waiting no later than the batch's deadline: past it a
        ``redis.TimeoutError`` (the connection is then dropped, out of step)."""
        try:
            reader = self._reader
            if not self._own_timeout:
                reply = conn.read_response() if reader is None else reader.read(conn)
            else:
                left = max(self._until - time.monotonic(), 0.001)
                reply = read_reply(conn, left) if reader is None else reader.read(conn, left)
        except redis.ResponseError as exc:
            if isinstance(exc, NoScriptError):
                self._lost = True  # loaded and sent again at the end of the round trip
            return exc  # an error reply: the connection is still in step
        self._loaded.add(script)
        return reply
