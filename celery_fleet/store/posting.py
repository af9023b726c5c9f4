"""Posted calls: a reply nobody needs now, written with the process's next call.

A release's answer (was the lease still held, did the breaker change) matters to nobody on
the task's path. :meth:`Posting.post` holds the call and returns: the process's next call on
the wire (any limit, any thread) writes it just ahead of itself, in the same write, and its
reply is read with that call's (replies come back in order), or later by
:meth:`Posting.drain`, and handed to a callback. When nothing follows, the flusher thread
writes it within :data:`FLUSH_S`. The flusher sleeps on a condition until a call is held
with the wire free (a post then, or a carrier leaving the wire with no caller after it): an
idle process pays nothing, and on a busy wire the callers carry what is held while it
sleeps. A post an ask of the same limit :meth:`Posting.take`-s back rides inside that ask
(one script call for both; :meth:`~celery_fleet.store.combiner.Combiner.send`'s ``rider``).

A process that exits writes what it holds first (:func:`flush_all`: ``atexit``,
multiprocessing's exit in its children, and a Celery prefork child's
``worker_process_shutdown``), and a forked child never writes what its parent held.

:class:`Posting` is the posting half of :class:`~celery_fleet.store.combiner.Combiner` (mixed
into it: the wire, its lock and its carriers are the combiner's).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__all__ = ["Posting", "flush_all", "FLUSH_S", "FLUSHER_IDLE_S", "WRITE_AT_ONCE_AFTER"]

log = logging.getLogger("celery_fleet")

#: A posted call that no other call carries is written by the flusher within this long (s).
FLUSH_S = 0.001
#: The flusher thread ends after this long (s) with nothing to look at (a post starts one).
FLUSHER_IDLE_S = 5.0
#: After this many posts in a row that the flusher had to write (no call came within
#: ``flush_s`` to carry them), the next posts are written at once by their poster (their
#: replies read later), until a call comes within ``flush_s`` of a post again. Holding
#: pays only when a call follows soon; when none does, the flusher's wake-ups cost the
#: process ~115 µs of CPU a post (a prefork child: one task at a time, milliseconds
#: apart) where writing at once costs one ``send``.
WRITE_AT_ONCE_AFTER = 2


class _Call:
    """Some commands of one caller, sent together, and their replies or errors. A call
    with a ``callback`` is posted: nobody waits for it; the callback gets its replies."""

    __slots__ = ("commands", "replies", "lead", "done", "finished", "callback", "at", "until")

    def __init__(
        self,
        commands: list[tuple[str, bytes]],
        callback: Callable[[list[Any]], None] | None = None,
        bound: float = math.inf,
    ) -> None:
        self.commands = commands  # (script name, packed EVALSHA)
        #: Monotonic time it was made (sent or posted).
        self.at = time.monotonic()
        #: Monotonic time after which nobody waits for these replies any more.
        self.until = self.at + bound
        self.replies: list[Any] = []
        self.lead = False
        self.finished = False
        self.callback = callback
        #: Released by whoever carried this call (or hands it the wire); made (under the
        #: combiner's lock) only for a caller that has to wait: a lone caller needs none.
        self.done: threading.Lock | None = None

    def wait_here(self) -> threading.Lock:
        """(Under the combiner's lock) the lock this caller waits on, taken."""
        self.done = threading.Lock()
        self.done.acquire()
        return self.done

    def hand_back(self) -> None:
        """Wake this call's waiter, if it waits."""
        if self.done is not None:
            self.done.release()

    def fail(self, error: BaseException) -> None:
        self.replies = [error] * len(self.commands)
        self.finished = True


_live: weakref.WeakSet[Posting] = weakref.WeakSet()


def _flush_loop(ref: weakref.ReferenceType[Posting]) -> None:
    """The flusher thread of one combiner: writes posted calls nobody carried in time. It
    holds the combiner only while something is held, so an unused one can be collected."""
    while True:
        combiner = ref()
        if combiner is None or not combiner._sleep_until_held():
            return
        try:
            combiner._flush_held()
        except Exception:  # the calls failed with it (their callbacks owe them): carry on
            log.debug("celery-fleet: writing posted calls failed", exc_info=True)
        del combiner


def flush_all() -> None:
    """Write and read what this process's combiners hold: a release must not be lost with
    the process (their callbacks run, owing what fails). Run at interpreter exit
    (``atexit``), and from Celery's ``worker_process_shutdown`` in a prefork child, which
    leaves with ``os._exit`` (no ``atexit``)."""
    for combiner in list(_live):
        # _busy too: the flusher may have taken a release off _held and not written it yet
        if combiner._pid == os.getpid() and (combiner._held or combiner._unread or combiner._busy):
            try:
                combiner.drain()
            except Exception:
                log.debug("celery-fleet: writing posted calls at exit failed", exc_info=True)


def _forget_after_fork() -> None:
    """In a forked child: the parent's held calls are the parent's to write, never the
    child's (a prefork child would release its parent's leases a second time)."""
    for combiner in list(_live):
        combiner._held = deque()
        combiner._unread = []


#: The process that registered :func:`flush_all` with multiprocessing's exit (see below).
_mp_exit_pid: int | None = None


def _multiprocessing_child() -> bool:
    """In a child of multiprocessing, have its exit run :func:`flush_all` (once per
    process); True in a ``multiprocessing.Pool``'s worker, which writes a post at once.

    A child of the ``fork`` or ``forkserver`` method leaves with ``os._exit`` after its
    target returns, past ``atexit`` (multiprocessing runs only its own finalizers): a
    release held for the next call was lost with it, its slot taken until the lease
    expired. Its finalizer registry is cleared as it starts, so this runs when a combiner
    is made (a child makes its own: the parent's belongs to the parent). A ``Pool``'s
    worker is killed by SIGTERM (``Pool.terminate()``, which ``with Pool(...)`` runs as it
    ends) often within the millisecond a release is held after its last task: there a post
    is written at once, its reply still read later. Other children hold posts as any
    process (the benchmarks' workers stand for Celery's prefork children, which are
    billiard's, not these, and flush on ``worker_process_shutdown``). A process that never
    imported multiprocessing is none of its children."""
    global _mp_exit_pid
    process = sys.modules.get("multiprocessing.process")
    util = sys.modules.get("multiprocessing.util")
    if process is None or util is None or process.parent_process() is None:
        return False
    pid = os.getpid()
    if _mp_exit_pid != pid:
        _mp_exit_pid = pid
        util.Finalize(None, flush_all, exitpriority=10)
    pool = sys.modules.get("multiprocessing.pool")
    target = getattr(process.current_process(), "_target", None)
    return pool is not None and target is getattr(pool, "worker", None)


class Posting:
    """Posting, taking back and flushing held calls: the half of a combiner that holds what
    a call posts until the next call (or the flusher) writes it."""

    _lock: threading.Lock
    _busy: bool
    _pid: int
    _held: deque[_Call]
    _unread: list[_Call]
    _loaded: set[str]
    _bound: Callable[[], float]
    _wake: threading.Condition
    _flusher: threading.Thread | None
    _flusher_idle: bool
    _armed: bool
    flush_s: float
    write_now: bool
    #: Posts the flusher wrote in a row (see WRITE_AT_ONCE_AFTER); monotonic time of the
    #: last post.
    _unpaid: int
    _posted_at: float
    _conn: Any

    if TYPE_CHECKING:

        def send(
            self, commands: list[tuple[str, bytes]], rider: _Call | None = None
        ) -> list[Any]: ...

        def _carry(self, first: list[_Call] | None, open_only: bool = False) -> None: ...

    @staticmethod
    def _settle_rider(rider: _Call, reply: Any) -> Any:
        """Hand a folded posted call its share of ``reply``; return the sender's share."""
        own = reply
        if isinstance(reply, BaseException):
            rider.replies = [reply]
        elif type(reply) is list and len(reply) == 2 and reply[0] == b"lost":
            rider.replies, own = [0], reply[1]
        else:
            rider.replies = [1]
        rider.finished = True
        try:
            if rider.callback is not None:
                rider.callback(rider.replies)
        except Exception:  # never into the caller that carried it
            log.exception("celery-fleet: handling a posted reply failed")
        return own

    def take(self, call: _Call) -> bool:
        """Take the posted ``call`` back from the held ones (True), to fold it into a call
        of the taker's (:meth:`send`'s ``rider``); False when it was written already (or
        this is a forked child's copy). Atomic against the carriers: a deque's remove
        runs under the GIL, and a carrier pops what is held from the left."""
        if self._pid != os.getpid():
            return False
        try:
            self._held.remove(call)
        except ValueError:
            return False
        return True

    def _hold_again(self, call: _Call) -> None:
        """Hold a :meth:`take`-n call again, first in line (its ask never answered)."""
        if self._pid != os.getpid():
            return
        now = time.monotonic()  # its deadline as long as when it was posted, from now
        call.at, call.until = now, now + (call.until - call.at)
        self._held.appendleft(call)
        if not self._busy:
            self._arm()

    def post(
        self, commands: list[tuple[str, bytes]], callback: Callable[[list[Any]], None]
    ) -> _Call | None:
        """Hold ``commands`` for the process's next call on this wire (written ahead of it,
        in its write), or the flusher within :attr:`flush_s` (at once with
        :attr:`write_now`, in a multiprocessing Pool's worker), and return without its reply;
        ``callback(replies)`` runs, once, in whichever thread reads them later.

        Returns the held call (for :meth:`take`); None, with nothing held, while a script
        of theirs has not answered on this connection yet: the caller should :meth:`send`
        instead (so a posted call never meets NOSCRIPT on a fresh connection, e.g. after a
        Redis restart).
        """
        loaded = self._loaded
        for script, _packed in commands:
            if script not in loaded:
                return None
        call = _Call(commands, callback, self._bound())
        self._posted_at = call.at
        self._held.append(call)
        if not self._busy:  # else the carrier on the wire arms the flusher when it leaves
            self._arm()
        return call

    def pending(self) -> float:
        """How long (s, monotonic) the oldest posted call has waited for its reply to be
        read (held or unread); 0 if none."""
        oldest = self._held_or_unread()
        return time.monotonic() - oldest.at if oldest is not None else 0.0

    def _held_or_unread(self) -> _Call | None:
        unread = self._unread
        if unread:
            return unread[0]
        try:
            return self._held[0]
        except IndexError:
            return None

    def drain(self) -> None:
        """Write and read every posted call now (their callbacks run): after it returns,
        nothing this process posted is still on its way."""
        if self._held or self._unread or self._busy:
            self.send([])  # waits its turn, and reads everything written before it

    def flush(self, open_only: bool = False) -> None:
        """Write the held posted calls now, unless another thread is on the wire (it, or
        the caller after it, writes them); their replies stay unread. With ``open_only``
        (a poster writing at once) only on a wire that is open and fit to write on: one to
        open is left to the flusher, the calls still held."""
        if not self._held or self._pid != os.getpid():
            return
        with self._lock:
            if self._busy:
                return
            self._busy = True
        self._carry([], open_only)

    def _arm(self) -> None:
        """Make the flusher look at what is held (waking it only if it sleeps idle); with
        :attr:`write_now`, write it now (a post met a carrier that had taken the held ones
        already: it calls this as it leaves the wire)."""
        if self.write_now:
            self.flush()
            return
        if self._unpaid >= WRITE_AT_ONCE_AFTER and self._wire_open():
            # On the wire, a socket the server closed is dropped and the calls stay held:
            # the flusher is armed as the poster leaves the wire.
            self.flush(open_only=True)
            return
        self._arm_flusher()

    def _arm_flusher(self) -> None:
        """Make the flusher look at what is held, waking it only if it sleeps idle."""
        self._armed = True  # set before looking: an idle flusher looks at it after
        if self._flusher_idle or self._flusher is None:
            self._wake_flusher()

    def _wire_open(self) -> bool:
        """Whether the wire is connected: a poster writes at once only on an open wire (a
        connection to open, maybe to a frozen Redis, is the flusher's to wait for, not
        the caller leaving its slot). A hint, read off the wire: the poster that goes on
        looks again on it (a socket the server closed is one to open too)."""
        conn = self._conn
        return conn is not None and conn._sock is not None

    def _wake_flusher(self) -> None:
        with self._wake:
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(
                    target=_flush_loop,
                    args=(weakref.ref(self),),
                    name="fleet-flusher",
                    daemon=True,
                )
                self._flusher.start()
            self._wake.notify()

    def _sleep_until_held(self) -> bool:
        """(Flusher) Sleep until armed; False when the flusher should end: not armed for
        :data:`FLUSHER_IDLE_S` (the next arming starts another), or a fork."""
        with self._wake:
            self._flusher_idle = True  # set before looking: an arming after it wakes us
            if not self._armed:
                self._wake.wait(FLUSHER_IDLE_S)
            if not self._armed or self._pid != os.getpid():
                self._flusher = None  # under the condition: an arming now starts another
                return False
            self._armed = self._flusher_idle = False
        return True

    def _flush_held(self) -> None:
        """(Flusher) Write what is held once its oldest call has waited :attr:`flush_s`,
        unless a caller carries it before. It is armed only when a call is held with the
        wire free (a post then, or a carrier leaving the wire with no caller after it): on
        a busy wire the callers carry what is held, and the flusher sleeps. While it keeps
        being armed (posts on a free wire: one thread's loop of slots) it looks again every
        :attr:`flush_s` instead of sleeping on the condition, so those posts wake nobody."""
        lingered = False
        while True:
            try:
                oldest = self._held[0]
            except IndexError:  # carried
                if not self._armed:
                    # Nothing held and nothing posted since the last look: look once more
                    # before sleeping on the condition. A loop of slots takes each release
                    # back into its next ask before the flusher looks (it is then found
                    # carried, unarmed); without this, every post woke the flusher again.
                    if lingered:
                        return
                    lingered = True
                else:
                    lingered = False
                self._armed = False
                time.sleep(self.flush_s)
                continue
            left = oldest.at + self.flush_s - time.monotonic()
            if left > 0:
                time.sleep(left)
                continue
            with self._lock:
                busy, self._busy = self._busy, True
            if busy:  # a carrier on the wire takes them, or arms the flusher as it leaves
                return
            self._unpaid += 1  # nobody came to carry it: holding did not pay
            self._carry([])  # as it leaves, it arms the flusher again if more are held


atexit.register(flush_all)
os.register_at_fork(after_in_child=_forget_after_fork)
