"""Holding a slot: wait for admission, keep the lease alive, settle, release.

:class:`Slot` is the context manager behind ``fleet.slot(...)``. Entering asks Redis once;
when refused (and allowed to wait) it takes a ticket in the limit's line and blocks on its
own wake-up until its turn, asking again when woken, when an exact wait (a rate window, a
pause) has passed, and every ``REFRESH_S`` to keep the ticket. Tickets are served oldest
first, by the age of the :class:`~celery_fleet.admission.run.Run` it belongs to, so a caller that
started earlier is never passed by a newcomer. When the wait would end past ``max_wait``
it leaves the line and raises :class:`~celery_fleet.Throttled`.
While it is held, a :class:`LeaseKeeper` thread renews its lease so a five-minute call
keeps its slot; leaving the block releases it, whatever happened inside.

Time is injectable (:class:`Clock`) so tests of waits are deterministic.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ..checks import check_max_wait
from ..errors import (
    Backpressure,
    CircuitOpen,
    FleetError,
    LeaseLost,
    QualityDegraded,
    QuotaExhausted,
    StoreUnavailable,
    Throttled,
)
from ..logfields import log_fields
from ..quality.judge import Verdict
from ..resilience.replay import met_outage
from ..store.calls import drive
from .core import REFRESH_S, WAKE_GRACE_MS, Admission, ReleaseAhead
from .decision import Decision, Release
from .judging import Judging
from .keeper import Clock, Holder, LeaseKeeper, SystemClock, lease_fields
from .lanes import check_lane
from .line import LANE_SPAN, check_since
from .providers import OK, Signal, classify, parse_headers
from .run import Run

__all__ = ["Clock", "SystemClock", "Slot", "LeaseKeeper", "check_max_wait"]

log = logging.getLogger("celery_fleet")

#: The slots each thread holds right now, to catch a nested wait that can never end.
_held = threading.local()


def _held_here() -> list[Slot]:
    slots: list[Slot] | None = getattr(_held, "slots", None)
    if slots is None:
        slots = _held.slots = []
    return slots


#: The wait a provider 429 or overload gets when the provider names none.
DEFAULT_RETRY_MS = 1000

#: The signals :meth:`Slot.raise_pushback` turns into a fleet error.
_PUSHBACK = frozenset({"quota", "rate_limited", "overloaded"})

#: How often the second in line asks: just past the grace a woken first has to ask.
NEXT_IN_LINE_S = WAKE_GRACE_MS / 1000.0 + 0.5


class Slot(Judging):
    """A held admission to one limit, used as a context manager.

    Example::

        with fleet.slot("openai", tokens=2000) as slot:
            resp = client.chat.completions.create(...)
            slot.settle(tokens=resp.usage.total_tokens)

    Attributes after entering: ``lease_id``, ``tokens`` (the current reservation),
    ``waited_s`` (time spent waiting for admission), ``attempts`` (admission round trips),
    ``ahead`` (tickets before this one at the last refusal), ``reason`` (the last refusal's,
    "" when admitted at once), ``lane`` (its priority lane, None on a limit without lanes)
    and ``lost`` (True if the lease expired while held, e.g. the
    process was frozen).

    A wait that did not end at the first ask (admitted after a refusal, or given up) is
    told to the slot watchers as one ``"waited"`` event (:meth:`tell_waited`): the
    OpenTelemetry span of the wait is made from it. An admission at once tells only
    ``"admitted"``.
    """

    def __init__(
        self,
        admission: Admission,
        keeper: LeaseKeeper,
        limit: str,
        tokens: int,
        max_wait_s: float,
        clock: Clock,
        validate: Callable[[Any], object] | None = None,
        run: Run | None = None,
        jitter_s: float = 0.0,
        lane: str | None = None,
        key: str | None = None,
    ) -> None:
        self.admission = admission
        #: The caller's key (tenant) on a limit with keys (tenancy.py); None: no key.
        self.key = key
        self.keeper = keeper
        #: The limit this slot is admitted against: the one asked for (``asked``), or its
        #: quality fallback while that one's quality breaker is open (quality/breaker.py).
        self.limit = limit
        self.asked = limit
        #: The verdict of :meth:`judge`, counted by the quality breaker on release.
        self.judged: Verdict | None = None
        self._asked_lane_key = (lane, key)
        self.tokens = tokens
        self.max_wait_s = max_wait_s
        self.clock = clock
        self.lease_id: str | None = None
        self.decision: Decision | None = None
        self.waited_s = 0.0
        self.attempts = 0
        self.lost = False
        self.last_renewed = 0.0
        #: When the current lease was taken (clock's monotonic time), and by which task
        #: (set by the keeper; ``celery inspect fleet`` shows them).
        self.held_since = 0.0
        self.holder: Holder = None
        cfg = admission.limit(limit)
        self.validator = validate or cfg.validate
        self.verdict: Signal | None = None
        self.run = run if run is not None else Run()
        self.ahead = 0
        self.reason = ""
        self.jitter_s = jitter_s
        chosen = (
            check_lane(cfg.lanes, limit, lane)
            if lane is not None or cfg.lanes is not None
            else None
        )
        #: the priority lane this slot waits in (None: the limit has no lanes; see
        #: admission/lanes.py); its tickets end with the lane's marker
        self.lane = chosen.name if chosen is not None else None
        #: The ticket this slot waits (or last waited) with, and whether Redis may hold
        #: it in the limit's line (then leaving sends a leave).
        self.ticket = ""
        self.in_line = False
        #: the limit's runtime generation when this slot last asked (see Admission.wait_turn)
        self.generation = 0
        self._held_in: list[Slot] = []

    def new_ticket(self) -> str:
        """A new ticket (and lease id) of this slot: in its lane, if the limit has lanes,
        and marked with its key, if any."""
        return self.admission.new_ticket(self.limit, self.key, self.lane)

    def acquire(self) -> Slot:
        """Wait for admission (see the class docstring); raise Throttled past ``max_wait``."""
        if self.lease_id is not None:
            raise FleetError(f"slot for {self.limit!r} is already held; a Slot is not reentrant")
        routed = self.routed()
        if routed != self.limit:  # the quality breaker's fallback
            self.route(routed)
        if self.jitter_s > 0:  # step jitter: callers that finished together ask apart
            self.clock.sleep(random.uniform(0.0, self.jitter_s))
        return self._acquire(self.new_ticket())

    def _acquire(self, ticket: str, first: Decision | None = None) -> Slot:
        """Wait with ``ticket`` (the ticket while waiting, the lease once admitted) from the
        answer ``first`` to an ask already made, or from a first ask."""
        start = self.clock.monotonic()
        join = self.max_wait_s > 0
        self.ticket, self.in_line = ticket, join and first is not None
        self.reason = ""
        try:
            decision, asked_at = self._wait_turn(ticket, join, start, first)
        except BaseException as exc:
            if join:  # whatever ended the wait (Throttled, Ctrl-C, Redis): give the place up
                self._leave(self.ticket, exc)
            self.waited_s = self.clock.monotonic() - start
            self.run.waited_s += self.waited_s
            self.tell_waited(exc)
            raise
        self.waited_s = self.clock.monotonic() - start
        self.run.waited_s += self.waited_s
        if self.attempts > 1:
            self.tell_waited(None)
        self.decision = decision
        self.lease_id = decision.lease_id
        self.lost = False  # a new lease: the last one's fate is not this one's
        # Taken before the round trip, so the local deadline never outlives Redis's.
        self.last_renewed = asked_at
        self.keeper.track(self)
        # Remembered on the slot: it may be released from another thread than this one.
        self._held_in = _held_here()
        self._held_in.append(self)
        if self.admission.watchers:
            self.admission.tell(
                "admitted", self.limit, waited_s=self.waited_s, attempts=self.attempts
            )
        return self

    def next(self, tokens: int | None = None) -> Slot:
        """End this call and hold the limit again for the next one: an agent's next step.

        The release (reporting this call as in ``__exit__`` without an exception: ok, or
        what :meth:`fail`/:meth:`validate` said) and the next admission go in one round
        trip; when that admission is refused the slot waits its turn as on entering.
        ``tokens`` is the next call's reservation (default: the current one). Returns the
        slot, held again, with a fresh lease; leaving the ``with`` block releases it.
        """
        if self.lease_id is None:
            raise FleetError(f"next() needs a held slot of {self.limit!r}")
        cfg = self.admission.limit(self.limit)
        tokens = self.tokens if tokens is None else cfg.check_tokens(tokens)
        down = self.admission.store_down
        try:
            route = self.routed()
        except QualityDegraded:  # pause: the held slot goes back first
            self.release(self.verdict or OK)
            raise
        if down.down or down.owns(self.lease_id) or route != self.limit:
            # the store is away (two steps, each local), or the quality breaker moved the
            # next call to another limit
            self.release(self.verdict or OK)
            self.attempts, self.verdict, self.tokens = 0, None, tokens
            self.route(route)
            return self._acquire(self.new_ticket())
        lease_id, signal = self._let_go(self.verdict or OK)
        self._post_count()
        ticket = self.new_ticket()
        wait = signal.retry_after_ms if signal.kind in ("rate_limited", "overloaded") else None
        release = self.admission.release_command(self.limit, lease_id, signal.outcome, wait or 0)
        ahead = ReleaseAhead(lease_id, release, self._check_released)
        join = self.max_wait_s > 0
        self.attempts, self.verdict, self.tokens = 0, None, tokens
        asked_at = self.clock.monotonic()
        # The ask of entering, with the release riding ahead of it (resent with it after a
        # dropped connection): one round trip for both.
        order = self.admission.order_of(self.limit, self.run)
        steps = self.admission.acquire_steps(cfg, tokens, ticket, order, join, ahead)
        self.generation = self.admission.generation(self.limit)
        try:
            with self.admission.store.deadline(self.remaining_s(asked_at)):
                decision = drive(steps, self.admission.store)
            self.admission.remember_place(self.limit, self.run, decision)
        except StoreUnavailable as exc:
            # Redis did not answer (both are owed to it now): the policy answers an ask
            # made afresh, with a new ticket (Redis may still run this one when it thaws).
            down.cover(exc)
            return self._acquire(self.new_ticket())
        if decision.allowed:  # the usual case: no wait, no second round trip
            self.attempts = 1
            self.waited_s = 0.0
            self.decision, self.lease_id, self.last_renewed = decision, decision.lease_id, asked_at
            self.lost = False
            self.keeper.track(self)
            self._held_in = _held_here()
            self._held_in.append(self)
            if self.admission.watchers:
                self.admission.tell("admitted", self.limit, waited_s=0.0, attempts=1)
            return self
        return self._acquire(ticket, decision)

    def _wait_turn(
        self, ticket: str, join: bool, start: float, first: Decision | None = None
    ) -> tuple[Decision, float]:
        """Ask until admitted: returns the decision and the local time of the winning ask."""
        while True:
            self.attempts += 1
            asked_at = self.clock.monotonic()
            if first is not None:
                decision, first = first, None
            else:
                was_in_line, self.in_line = self.in_line, join  # asking: it may join
                self.generation = self.admission.generation(self.limit)
                decision = self._ask(ticket, join, start)
                self.admission.remember_place(self.limit, self.run, decision)
                ticket = self.ticket = self.fresh_ticket(ticket, was_in_line)
            if not self.run.since_ms:
                self.run.since_ms = int(decision.at_ms)  # the run's age in every line
            if decision.allowed:
                return decision, asked_at
            move, seconds = self.next_move(decision, start)
            if move == "sleep":
                self.clock.sleep(seconds)
            else:
                self._wait_for_wake_up(ticket, seconds, decision.wait_ms / 1000.0)

    def _ask(self, ticket: str, join: bool, start: float) -> Decision:
        """One ask with ``ticket``, within this wait's deadline.

        The usual case runs lean: ``fleet.slot()`` checked the tokens, the ticket is this
        slot's own, so a slot without a key asks :meth:`Admission.ask` directly (no second
        round of checks), and sets no deadline when the store's own health deadline is
        nearer anyway (a context variable set and reset per ask costs more than it says).
        """
        admission = self.admission
        remaining = self.remaining_s(start)
        if self.key is not None or remaining < admission.store.health_s:
            with admission.store.deadline(remaining):
                order = admission.order_of(self.limit, self.run)
                # the key again: its name stays known to this process (keyed.py's LRU)
                return admission.try_acquire(
                    self.limit, self.tokens, ticket, order, join, key=self.key
                )
        order = admission.order_of(self.limit, self.run)
        if type(order) is not int or not 0 <= order < LANE_SPAN:
            order = check_since(order)  # a Run's since_ms is the caller's to set
        return admission.ask(admission.limit(self.limit), self.tokens, ticket, order, join)

    def remaining_s(self, start: float) -> float:
        """How long this wait may still take (s): a Redis call waits no longer than that
        (``math.inf`` when there is no deadline; ``max_wait=0`` asks once, bounded by the
        store's health deadline alone)."""
        if self.max_wait_s <= 0:
            return math.inf
        return self.max_wait_s - (self.clock.monotonic() - start)

    def fresh_ticket(self, ticket: str, was_in_line: bool) -> str:
        """The ticket for the next ask, after an ask with ``ticket``: a new one when that
        ask met an outage, since it may still run when Redis thaws (making a lease that is
        released by its ticket when Redis answers, or joining the line: it leaves then).
        Keeps :attr:`in_line` true only while Redis may hold the ticket in line."""
        if met_outage(ticket):
            if self.in_line:
                self.admission.replays.add("leave", self.limit, ticket)
            self.in_line = False
            return self.new_ticket()
        if self.admission.store_down.down:  # answered by the policy: Redis saw nothing
            self.in_line = was_in_line
        return ticket

    def next_move(self, decision: Decision, start: float) -> tuple[str, float]:
        """What a refused ask does next: ``("sleep", s)`` (an exact wait), ``("wait", s)``
        (for a wake-up, at most ``s``), or raise ``Throttled``/``CircuitOpen`` (give up
        now). The one decision :class:`Slot` and :class:`~celery_fleet.admission.aslot.AsyncSlot`
        share; they differ only in how they sleep and wait."""
        self.ahead, self.reason = decision.ahead, decision.reason
        if decision.reason == "store_down":  # fleet_store_down="closed": backpressure
            self._refused(decision)
            raise Throttled(self.limit, decision.wait_ms, decision.reason)
        if decision.reason == "circuit_open":
            # Do not hold a worker for the reset timeout: a task reschedules instead.
            self._refused(decision)
            raise CircuitOpen(self.limit, decision.wait_ms, decision.reason)
        if decision.reason == "in_flight" and self.max_wait_s == math.inf:
            self._refuse_self_deadlock()
        remaining = self.max_wait_s - (self.clock.monotonic() - start)
        wait_s = decision.wait_ms / 1000.0
        # A rate or pause wait is exact: when it ends past the deadline, give up now.
        # The in-flight wait is a guess (a holder may finish any moment): keep waiting.
        # A place in line is an estimate good enough to give up on when far off.
        exact = decision.reason not in ("in_flight", "queued")
        hopeless = wait_s > (remaining if exact else 2 * remaining)
        self._warn_if_line_too_long(decision)
        if remaining <= 0 or (decision.reason != "in_flight" and hopeless):
            self._refused(decision)
            raise Throttled(self.limit, decision.wait_ms, decision.reason)
        if exact:
            # First in line (or paused): nobody can shorten this wait, so sleep it out,
            # in pieces shorter than the grace a woken ticket has to ask again.
            return "sleep", min(remaining, NEXT_IN_LINE_S - 1.0, wait_s + 0.001)
        # Woken when a release or the admission before it makes this ticket's turn.
        # Second in line asks more often: a first that died after being woken is
        # dropped by the next ask past its grace, and nobody else is asking then.
        # The others re-ask at a jittered interval: tickets that joined together
        # do not keep asking together.
        # The first in line asks as often: a cap full of leases nobody releases (their
        # holders died, or their releases were lost) frees only as they expire, and
        # nobody is woken for that; its ask sweeps them and wakes the ones behind it.
        every = NEXT_IN_LINE_S if decision.ahead <= 1 else REFRESH_S * random.uniform(0.5, 1)
        return "wait", min(remaining, every)

    def _wait_for_wake_up(self, ticket: str, timeout_s: float, wait_s: float) -> None:
        """Block on this ticket's wake-up; while the store is away (a local refusal),
        sleep the estimated wait instead, in short steps."""
        sleep_s = self.outage_sleep_s(timeout_s, wait_s)
        if sleep_s is not None:
            self.clock.sleep(sleep_s)
            return
        try:
            self.admission.wait_turn(self.limit, ticket, timeout_s, self.generation)
        except StoreUnavailable as exc:
            self.admission.store_down.cover(exc)  # the next ask goes by the policy

    def outage_sleep_s(self, timeout_s: float, wait_s: float) -> float | None:
        """While the store is away nobody wakes a ticket: how long to sleep instead (the
        estimated wait, in short steps); None while Redis answers."""
        if not self.admission.store_down.down:
            return None
        return max(0.001, min(timeout_s, wait_s, 0.25))

    def tell_waited(self, error: BaseException | None) -> None:
        """Tell the watchers how a wait that did not end at the first ask ended:
        ``outcome`` ``"admitted"``, ``"refused"`` (``Throttled``/``CircuitOpen``: the
        fleet's ``wait_ms`` with it) or ``"error"`` (anything else: Redis, a cancel), with
        ``waited_s``, ``attempts``, ``ahead`` and the last refusal's ``reason``."""
        if not self.admission.watchers:
            return
        fields: dict[str, Any] = {
            "outcome": "admitted",
            "reason": self.reason,
            "waited_s": self.waited_s,
            "attempts": self.attempts,
            "ahead": self.ahead,
        }
        if isinstance(error, Backpressure):  # Throttled, CircuitOpen
            fields.update(outcome="refused", wait_ms=error.wait_ms, reason=error.reason)
        elif error is not None:
            fields.update(outcome="error", error=type(error).__name__)
        self.admission.tell("waited", self.limit, **fields)

    def _refused(self, decision: Decision) -> None:
        if self.admission.watchers:
            self.admission.tell(
                "refused", self.limit, reason=decision.reason, wait_ms=decision.wait_ms
            )

    def _leave(self, ticket: str, why: BaseException | None = None) -> None:
        """Give up ``ticket``'s place in line; while Redis is away (or the wait ended
        because it did not answer) not now, but when it answers again (replay.py)."""
        if not self.leaving_now(ticket, why):
            return
        try:
            self.admission.leave(self.limit, ticket)
        except StoreUnavailable:
            self.admission.replays.add("leave", self.limit, ticket)
        except FleetError:  # the ticket expires by itself
            log.debug("celery-fleet: could not leave the line of %r", self.limit)

    def leaving_now(self, ticket: str, why: BaseException | None) -> bool:
        """Give up ``ticket``'s place here; True when the leave is to be sent to Redis now,
        False when there is nothing to tell (only the store-down policy was asked) or it
        is owed until Redis answers (it is away, or did not answer the wait)."""
        if not self.in_line:
            return False
        self.in_line = False
        if isinstance(why, StoreUnavailable) or self.admission.store_down.down:
            self.admission.replays.add("leave", self.limit, ticket)
            return False
        return True

    def _warn_if_line_too_long(self, decision: Decision) -> None:
        """Log once per limit when the middle waiter's wait exceeds this slot's max_wait."""
        warned = self.admission.warned_lines
        if self.limit in warned or self.max_wait_s == math.inf or decision.line < 4:
            return
        per_place_s = decision.wait_ms / 1000.0 / (decision.ahead + 1)
        middle_s = per_place_s * decision.line / 2
        if middle_s > self.max_wait_s:
            warned.add(self.limit)
            log.warning(
                "celery-fleet: limit %r has %d callers in line; the middle one waits about "
                "%.1f s, longer than max_wait=%.1f s: most will give up and reschedule. "
                "Raise max_wait, lower worker concurrency, or use wait_after_call / "
                "durable steps (docs/tasks.md, Sizing).",
                self.limit,
                decision.line,
                middle_s,
                self.max_wait_s,
                extra=log_fields(limit=self.limit),
            )

    def _refuse_self_deadlock(self) -> None:
        """Raise instead of waiting for ever on a limit this thread already holds.

        With no deadline, a slot nested in another slot of the same limit waits for a
        unit that only this thread (or others doing the same) can free: a silent
        deadlock once the cap is full of such holders.
        """
        if any(s.limit == self.limit and s.admission is self.admission for s in _held_here()):
            raise FleetError(
                f"nested slot of limit {self.limit!r} in a thread that already holds one, "
                f"with no deadline (max_wait=inf, e.g. on_limit='wait'): the cap is full and "
                f"this wait could never end. Give the inner slot a finite max_wait, or do "
                f"not take the same limit twice."
            )

    def settle(self, tokens: int) -> int:
        """Replace the reservation by actual usage; return the delta charged (+) or refunded (-).

        Settling again with the same number changes nothing.
        """
        if self.lease_id is None:
            raise FleetError(f"settle() on a slot for {self.limit!r} that is not held")
        lease_id = self.lease_id
        try:
            delta = self.admission.settle(self.limit, lease_id, tokens, self.tokens, must_hold=True)
        except LeaseLost:
            self.tokens = tokens
            self.lost = True
            raise
        self.tokens = tokens
        if self.lost:
            raise LeaseLost(self.limit, lease_id, "not renewed within its TTL")
        return delta

    def ensure_held(self) -> None:
        """Raise :class:`~celery_fleet.LeaseLost` unless this slot's lease is still held.

        A lease is not a fence: a holder frozen past its TTL (SIGSTOP, a long GIL-holding C
        call) keeps running while the fleet hands its slot to somebody else. Call this
        before an expensive step to learn that early; it renews the lease (one round trip),
        so a lease Redis forgot is put back while the cap has room.
        """
        lease_id = self.lease_id
        if lease_id is None:
            raise FleetError(f"ensure_held() on a slot for {self.limit!r} that is not held")
        down = self.admission.store_down
        if down.owns(lease_id):
            return  # held by this process alone
        now = self.clock.monotonic()
        ttl = self.admission.limit(self.limit).lease_s
        outage = down.down or self.keeper.stranded(self)
        if not self.lost and not outage and now - self.last_renewed >= ttl:
            self.keeper.lose(self, "not renewed within its TTL")
        if not self.lost:
            try:
                lost, _restored = self.admission.renew(self.limit, [(lease_id, self.tokens)])
            except StoreUnavailable as exc:
                down.cover(exc)
                return  # nobody can say now; the keeper renews it when Redis is back
            if lost:
                self.keeper.lose(self, "expired while held")
            else:
                self.last_renewed = now
        if self.lost:
            raise LeaseLost(self.limit, lease_id, "expired while held; its slot may be reused")

    def observe(self, headers: Any) -> int:
        """Read the provider's rate-limit headers (OpenAI ``x-ratelimit-*``, Anthropic
        ``anthropic-ratelimit-*``) and lower the fleet's buckets when the provider says fewer
        remain, or its limit is below the declared one. Never raises local state. One round
        trip; returns the number of windows lowered. Raises :class:`~celery_fleet.LeaseLost`
        (after lowering) when this slot's lease is gone."""
        try:
            return self.admission.observe(self.limit, parse_headers(headers), self.lease_id)
        except LeaseLost:
            self.lost = True
            raise

    def validate(self, result: Any) -> bool:
        """Run the ``validate`` hook on a call's result; a falsy answer (or an exception)
        marks this call a failure for the breaker: a 200 with garbage output."""
        if self.validator is None:
            return True
        try:
            ok = bool(self.validator(result))
        except Exception:
            ok = False
        if not ok:
            self.verdict = Signal("invalid_output", detail="validate() rejected the result")
        return ok

    def fail(self, detail: str = "") -> None:
        """Count this call as a failure of the dependency even though nothing was raised."""
        self.verdict = Signal("invalid_output", detail=detail)

    def release(self, signal: Signal | None = None) -> None:
        """Give the slot back (idempotent), reporting ``signal`` (default: no verdict)."""
        if self.lease_id is None:
            return
        lease_id, command = self.release_command(signal)
        if command is None:
            return
        counted = self.quality_command() if self.judged is not None else None
        if counted is not None:
            self._release_counted(lease_id, command, counted)
            return

        def done(reply: Any) -> None:
            if reply.__class__ is int and reply:
                return  # a lean release's "released" (the usual reply): nothing to tell
            if isinstance(reply, StoreUnavailable):
                self._owe_release(lease_id, reply)
            elif isinstance(reply, FleetError):
                log.warning(
                    "celery-fleet: releasing %r failed (%s); its lease will expire",
                    self.limit,
                    reply,
                    extra=lease_fields(self),
                )
            else:
                self._check_released(lease_id, self.admission.released(self.limit, reply))

        # Written now, its reply read later: nobody on the caller's path needs it, and a
        # task pays one round trip for its slot instead of two (see batch.Combiner.post).
        posted = self.admission.store.post(command, done)
        if posted:
            self.admission.posted_release(self.limit, command, posted, lease_id)
        else:
            try:
                (reply,) = self.admission.store.send(command)
            except StoreUnavailable as exc:
                self._owe_release(lease_id, exc)
                return
            self._check_released(lease_id, self.admission.released(self.limit, reply))

    def _release_counted(
        self, lease_id: str, command: tuple[str, bytes], counted: tuple[str, bytes]
    ) -> None:
        """The release with the quality verdict's count in the same write."""
        quality, limit = self.admission.quality, self.limit

        def done(replies: list[Any]) -> None:
            reply, count = replies
            quality.counted(limit, count)
            if isinstance(reply, StoreUnavailable):
                self._owe_release(lease_id, reply)
            elif isinstance(reply, FleetError):
                log.warning("celery-fleet: releasing %r failed (%s)", limit, reply)
            else:
                self._check_released(lease_id, self.admission.released(limit, reply))

        if not self.admission.store.post_all([command, counted], done):
            try:
                replies = self.admission.store.send(command, counted)
            except StoreUnavailable as exc:
                self._owe_release(lease_id, exc)
                return
            done(replies)

    def _owe_release(self, lease_id: str, error: StoreUnavailable) -> None:
        """A release that may not have reached Redis: sent again when Redis answers (as
        ``neutral``: if it did run, the breaker must not count the call twice)."""
        log.warning(
            "celery-fleet: releasing %r failed (%s); it is sent again when Redis answers, "
            "or its lease will expire",
            self.limit,
            error,
            extra=lease_fields(self),
        )
        self.admission.replays.add("release", self.limit, lease_id)
        self.admission.store_down.failed(error)

    def release_command(self, signal: Signal | None) -> tuple[str, tuple[str, bytes] | None]:
        """Let the held lease go in this process; the release for Redis to run (None when
        there is nothing to tell Redis: a local lease, or Redis is away)."""
        lease_id, signal = self._let_go(signal or Signal("other"))
        down = self.admission.store_down
        if down.owns(lease_id) or down.unreachable:
            if down.owns(lease_id):
                down.release(self.limit, lease_id)
            else:  # the store is away: no call now, the release is sent when it answers
                self.admission.replays.add("release", self.limit, lease_id, signal.outcome)
            return lease_id, None
        wait = signal.retry_after_ms if signal.kind in ("rate_limited", "overloaded") else None
        return lease_id, self.admission.release_of(self.limit, lease_id, signal.outcome, wait or 0)

    def _let_go(self, signal: Signal) -> tuple[str, Signal]:
        """This process's side of a release: forget the lease; the caller tells Redis."""
        lease_id, self.lease_id = self.lease_id, None
        assert lease_id is not None
        self.run.calls += 1
        self.keeper.untrack(self)
        if self in self._held_in:
            self._held_in.remove(self)
        return lease_id, signal

    def _check_released(self, lease_id: str, result: Release) -> None:
        if not result.released:
            if self.lease_id is None:  # not when a late reply finds the slot held again
                self.lost = True
            log.warning(
                "celery-fleet: lease %s of limit %r had expired before release "
                "(held longer than its TTL without renewal?)",
                lease_id,
                self.limit,
                extra=lease_fields(self),
            )

    def __enter__(self) -> Slot:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release, telling the fleet how the call ended; turn provider pushback into
        fleet errors: a 429 or an overload becomes :class:`Throttled` (a task reschedules),
        an exhausted quota :class:`QuotaExhausted` (fails fast, never loops)."""
        signal = (self.verdict or OK) if exc is None else self.exit_signal(exc)
        try:
            self.release(signal)
        except FleetError as release_error:
            # The body's own result or exception matters more: the lease expires by itself.
            log.warning(
                "celery-fleet: releasing %r failed (%s); its lease will expire",
                self.limit,
                release_error,
                extra=lease_fields(self),
            )
        if signal.kind in _PUSHBACK:
            self.raise_pushback(signal, exc)

    def exit_signal(self, exc: BaseException | None) -> Signal:
        """What leaving the block with ``exc`` (or none) tells the fleet about the call."""
        if exc is None:
            return self.verdict or OK
        if isinstance(exc, FleetError):
            return Signal("other")  # a nested slot's refusal says nothing about this call
        try:
            return classify(exc)
        except Exception:  # never let reading an error keep the slot from its release
            log.warning("celery-fleet: could not classify %r", exc, exc_info=True)
            return Signal("other")

    def raise_pushback(self, signal: Signal, exc: BaseException | None) -> None:
        """After the release: a provider's pushback as the fleet error a task understands."""
        if signal.kind == "quota":
            raise QuotaExhausted(self.limit, signal.detail) from exc
        if signal.kind in ("rate_limited", "overloaded"):
            wait = signal.retry_after_ms if signal.retry_after_ms is not None else DEFAULT_RETRY_MS
            if self.admission.watchers:
                self.admission.tell(
                    "pushback", self.limit, status=signal.status or signal.kind, retry_after_ms=wait
                )
            raise Throttled(self.limit, wait, f"provider {signal.status or signal.kind}") from exc

    def __repr__(self) -> str:
        state = f"lease={self.lease_id}" if self.lease_id else "not held"
        return f"<Slot {self.limit!r} tokens={self.tokens} {state}>"
