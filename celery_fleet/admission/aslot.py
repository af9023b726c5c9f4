"""``async with fleet.aslot(...)``: a slot for coroutines that never blocks the event loop.

:class:`AsyncSlot` holds a :class:`~celery_fleet.admission.slot.Slot` for its state and every
decision (what a refusal means, when to give up, what leaving the block tells the fleet)
and differs only in how it does IO: the admission operations run as awaited calls
(:func:`celery_fleet.store.calls.adrive` on an
:class:`~celery_fleet.store.aio.AsyncStore`), a wait for
a wake-up is a future set by the process's shared listener (:mod:`celery_fleet.store.wakeups`),
and a sleep is ``asyncio.sleep``. The lease is renewed by the process's renewal thread, the
same one that renews blocking slots (it never runs on the loop).

Cancellation: a coroutine cancelled while waiting leaves the line, and if its last ask
admitted it before the cancellation arrived (the reply was lost), that lease is found by
asking again with the retry flag and released; one cancelled while holding releases in
``__aexit__``.

This module knows nothing about Celery.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import FleetError, LeaseLost, StoreUnavailable
from ..quality.judge import Verdict, ask_of
from ..store.aio import AsyncStore
from ..store.calls import adrive
from ..store.sync import RedisStore
from .core import Admission
from .decision import Decision
from .judging import (
    await_hook,
    check_verdict,
    judge_answer,
    outcome_of,
    release_judged_steps,
    route_ask,
)
from .keeper import lease_fields
from .providers import Signal, parse_headers
from .slot import Slot

__all__ = ["AsyncSlot"]

log = logging.getLogger("celery_fleet")


class AsyncSlot:
    """A held admission to one limit for coroutines (``async with fleet.aslot(...)``).

    Example::

        async with fleet.aslot("openai", tokens=2000) as slot:
            resp = await client.chat.completions.create(...)
            await slot.settle(resp.usage.total_tokens)

    The attributes of :class:`~celery_fleet.admission.slot.Slot` (``lease_id``, ``tokens``,
    ``waited_s``, ``attempts``, ``ahead``, ``reason``, ``lost``, ``decision``) read the
    same, and a wait past the first ask is told to the watchers as on a Slot.
    """

    def __init__(self, slot: Slot, store: AsyncStore) -> None:
        self.slot = slot
        self.store = store
        self._asking = False  # an ask is in flight (its reply may be lost to a cancel)

    def __getattr__(self, name: str) -> Any:
        if name in _STATE:
            return getattr(self.slot, name)
        raise AttributeError(name)

    @property
    def limit(self) -> str:
        return self.slot.limit

    # -- entering ---------------------------------------------------------------------

    async def acquire(self) -> AsyncSlot:
        """Wait for admission without blocking the loop; ``Throttled`` past ``max_wait``."""
        s = self.slot
        if s.lease_id is not None:
            raise FleetError(f"slot for {s.limit!r} is already held; a slot is not reentrant")
        await self._route()
        if s.jitter_s > 0:
            await asyncio.sleep(random.uniform(0.0, s.jitter_s))
        ticket = s.new_ticket()
        start = s.clock.monotonic()
        join = s.max_wait_s > 0
        s.reason = ""
        try:
            decision, asked_at = await self._wait_turn(ticket, join, start)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                await _shielded(self._give_up(self.slot.ticket, join, self._asking))
            elif join:
                await _shielded(self._leave(self.slot.ticket, exc))
            s.waited_s = s.clock.monotonic() - start
            s.run.waited_s += s.waited_s
            s.tell_waited(exc)  # the span of the wait (observability/tracing.py)
            raise
        s.waited_s = s.clock.monotonic() - start
        s.run.waited_s += s.waited_s
        if s.attempts > 1:
            s.tell_waited(None)
        s.decision, s.lease_id, s.last_renewed = decision, decision.lease_id, asked_at
        s.lost = False  # a new lease: the last one's fate is not this one's
        s.keeper.track(s)
        if s.admission.watchers:
            s.admission.tell("admitted", s.limit, waited_s=s.waited_s, attempts=s.attempts)
        return self

    async def _route(self) -> None:
        """The limit to be admitted against (quality/breaker.py), its state read if stale."""
        s = self.slot
        quality = s.admission.quality
        cfg = quality.config(s.asked)
        if cfg is not None and cfg.gates:
            await quality.arefresh(s.asked, self.store)
            s.route(s.routed(lambda: quality.decide(s.asked, cfg)))
        else:
            s.route(s.asked)

    async def _wait_turn(self, ticket: str, join: bool, start: float) -> tuple[Decision, float]:
        s = self.slot
        cfg = s.admission.limit(s.limit)
        s.ticket, s.in_line = ticket, False
        while True:
            s.attempts += 1
            asked_at = s.clock.monotonic()
            order = s.admission.order_of(s.limit, s.run)
            if s.key is not None:  # its name stays known to this process (keyed.py's LRU)
                s.admission.keyed.hash_of(cfg, s.key)
            steps = s.admission.acquire_steps(cfg, s.tokens, ticket, order, join)
            self._asking = True
            s.generation = s.admission.generation(s.limit)
            was_in_line, s.in_line = s.in_line, join
            with s.admission.store.deadline(s.remaining_s(start)):
                decision = await adrive(steps, self.store)
            self._asking = False
            s.admission.remember_place(s.limit, s.run, decision)
            ticket = s.ticket = s.fresh_ticket(ticket, was_in_line)  # new if it met an outage
            if not s.run.since_ms:
                s.run.since_ms = int(decision.at_ms)
            if decision.allowed:
                return decision, asked_at
            move, seconds = s.next_move(decision, start)  # raises when it gives up
            if move == "sleep":
                await asyncio.sleep(seconds)
            else:
                await self._wait_for_wake_up(ticket, seconds, decision.wait_ms / 1000.0)

    async def _wait_for_wake_up(self, ticket: str, timeout_s: float, wait_s: float) -> None:
        s = self.slot
        sleep_s = s.outage_sleep_s(timeout_s, wait_s)
        if sleep_s is not None:
            await asyncio.sleep(sleep_s)
            return
        await s.admission.await_turn(s.limit, ticket, timeout_s, s.generation)

    async def _leave(self, ticket: str, why: BaseException | None = None) -> None:
        s = self.slot
        if not s.leaving_now(ticket, why):  # nothing to tell Redis, or owed to it
            return
        try:
            await adrive(s.admission.leave_steps(s.limit, ticket), self.store)
        except StoreUnavailable:
            s.admission.replays.add("leave", s.limit, ticket)
        except FleetError:  # the ticket expires by itself
            log.debug("celery-fleet: could not leave the line of %r", s.limit)

    async def _give_up(self, ticket: str, join: bool, admitted_maybe: bool) -> None:
        """Cancelled while asking or waiting: release a lease the lost reply of an ask in
        flight may have granted (looked up by its id, nothing charged), leave the line."""
        self._asking = False
        s = self.slot
        if admitted_maybe:
            cfg = s.admission.limit(s.limit)
            try:
                (reply,) = await self.store.send(s.admission.lookup_command(s.limit, ticket))
                decision = s.admission.decision(s.limit, s.tokens, reply)
                if decision.allowed and decision.lease_id:
                    await adrive(s.admission.release_steps(cfg.name, decision.lease_id), self.store)
            except FleetError:
                log.debug("celery-fleet: could not check a cancelled ask of %r", s.limit)
        if join:
            await self._leave(ticket)

    async def __aenter__(self) -> AsyncSlot:
        return await self.acquire()

    # -- holding ----------------------------------------------------------------------

    async def settle(self, tokens: int) -> int:
        """Replace the reservation by actual usage; the delta charged (+) or refunded (-)."""
        s = self.slot
        if s.lease_id is None:
            raise FleetError(f"settle() on a slot for {s.limit!r} that is not held")
        lease_id = s.lease_id
        steps = s.admission.settle_steps(s.limit, lease_id, tokens, s.tokens, must_hold=True)
        try:
            delta = await adrive(steps, self.store)
        except LeaseLost:
            s.tokens, s.lost = tokens, True
            raise
        s.tokens = tokens
        if s.lost:
            raise LeaseLost(s.limit, lease_id, "not renewed within its TTL")
        return delta

    async def observe(self, headers: Any) -> int:
        """Read the provider's rate-limit headers (see :meth:`Slot.observe`)."""
        s = self.slot
        steps = s.admission.observe_steps(s.limit, parse_headers(headers), s.lease_id)
        try:
            return await adrive(steps, self.store)
        except LeaseLost:
            s.lost = True
            raise

    async def validate(self, result: Any) -> bool:
        """Run the ``validate`` hook (a coroutine function too) on a call's result; a falsy
        answer or an exception marks this call a failure for the breaker."""
        s = self.slot
        if s.validator is None:
            return True
        try:
            answer = s.validator(result)
            ok = bool(await answer) if inspect.isawaitable(answer) else bool(answer)
        except Exception:
            ok = False
        if not ok:
            s.verdict = Signal("invalid_output", detail="validate() rejected the result")
        return ok

    def fail(self, detail: str = "") -> None:
        """Count this call as a failure of the dependency even though nothing was raised."""
        self.slot.fail(detail)

    async def judge(
        self,
        resp: Any,
        *,
        max_tokens: int | None = None,
        json: bool = False,
        response_format: Any = None,
        schema: Any = None,
        request: Any = None,
    ) -> Verdict:
        """:meth:`Slot.judge <celery_fleet.admission.slot.Slot.judge>` (``validate`` may be a
        coroutine function); the verdict is counted in the release's round trip."""
        s = self.slot
        hook = None
        if s.validator is not None:
            try:
                answer = s.validator(resp)
                ok = bool(await answer) if inspect.isawaitable(answer) else bool(answer)
            except Exception:
                ok = False
            hook = lambda _resp: ok  # noqa: E731
        verdict = s.judge_with(
            resp, hook, ask_of(max_tokens, json, response_format, schema, request)
        )
        if verdict.invalid:
            s.verdict = Signal("invalid_output", detail="validate() rejected the result")
        return verdict

    async def release(self, signal: Signal | None = None) -> None:
        """Give the slot back (idempotent), reporting ``signal``: one awaited round trip."""
        s = self.slot
        if s.lease_id is None:
            return
        lease_id, command = s.release_command(signal)
        if command is None:
            return
        counted = s.quality_command()  # the judged verdict, in the same round trip
        try:
            if counted is None:
                (reply,) = await self.store.send(command)
            else:
                limit = s.limit
                reply, count = await self.store.send(command, counted)
                s.admission.quality.counted(limit, count)
        except StoreUnavailable as exc:
            s._owe_release(lease_id, exc)  # sent again when Redis answers
            return
        s._check_released(lease_id, s.admission.released(s.limit, reply))

    async def next(self, tokens: int | None = None) -> AsyncSlot:
        """End this call and hold the limit again for the next step (release, then a new
        admission that waits its turn as on entering)."""
        s = self.slot
        if s.lease_id is None:
            raise FleetError(f"next() needs a held slot of {s.limit!r}")
        cfg = s.admission.limit(s.limit)
        s.tokens = s.tokens if tokens is None else cfg.check_tokens(tokens)
        await self.release(s.verdict or None)
        s.attempts, s.verdict = 0, None
        return await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        s = self.slot
        signal = s.exit_signal(exc)
        try:
            await _shielded(self.release(signal))
        except (FleetError, StoreUnavailable) as release_error:
            log.warning(
                "celery-fleet: releasing %r failed (%s); its lease will expire",
                s.limit,
                release_error,
                extra=lease_fields(s),
            )
        s.raise_pushback(signal, exc)

    def __repr__(self) -> str:
        return f"<AsyncSlot {self.slot!r}>"


#: The Slot attributes an AsyncSlot shows as its own.
_STATE = frozenset(
    {
        *("lease_id", "tokens", "waited_s", "attempts", "ahead", "reason", "lost"),
        *("decision", "run", "verdict", "key", "asked", "judged"),
    }
)


async def _shielded(awaitable: Any) -> Any:
    """Run cleanup to its end even if the task is cancelled again meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task  # finish the cleanup, then honour the cancellation
        raise


class AsyncMethods:
    """The asyncio side of :class:`~celery_fleet.Fleet`: ``aslot``, ``atry_acquire``,
    ``arelease``, ``aguarded`` (mixed into Fleet; its blocking methods build what these
    await)."""

    store: RedisStore
    admission: Admission
    _astore: AsyncStore | None = None

    if TYPE_CHECKING:

        def slot(self, name: str, tokens: int = 0, max_wait: float | None = None,
                 validate: Any = None, jitter: float | None = None, *,
                 lane: str | None = None, key: str | None = None) -> Slot: ...  # fmt: skip

    @property
    def astore(self) -> AsyncStore:
        """The asyncio store on this fleet's Redis (made on first use)."""
        if self._astore is None:
            self._astore = AsyncStore(self.store)
        return self._astore

    def aslot(
        self,
        name: str,
        tokens: int = 0,
        max_wait: float | None = None,
        validate: Any = None,
        jitter: float | None = None,
        *,
        lane: str | None = None,
        key: str | None = None,
    ) -> AsyncSlot:
        """``async with fleet.aslot(name, tokens=...) as slot:``: :meth:`Fleet.slot` for
        coroutines, with the same arguments and semantics; waits never block the loop.
        Arguments are validated here, before any Redis call."""
        slot = self.slot(
            name,
            tokens=tokens,
            max_wait=max_wait,
            validate=validate,
            jitter=jitter,
            lane=lane,
            key=key,
        )
        return AsyncSlot(slot, self.astore)

    async def aclose(self) -> None:
        """Close this fleet's connections of the running loop: call it before a loop you
        made for the occasion ends (``asyncio.run``); a long-lived loop needs none."""
        if self._astore is not None:
            await self._astore.aclose()

    async def atry_acquire(
        self, name: str, tokens: int = 0, *, key: str | None = None, lane: str | None = None
    ) -> Decision:
        """:meth:`Fleet.try_acquire`, awaited: ask once without waiting."""
        quality = self.admission.quality
        qcfg = quality.config(name)
        if qcfg is not None:  # the fallback's own breaker too, while this one is open
            await quality.arefresh(name, self.astore)
        decide = (lambda: quality.decide(name, qcfg)) if qcfg is not None else None
        routed = route_ask(self.admission, name, tokens, key, lane, decide)
        if isinstance(routed, Decision):
            return routed
        name, tokens, key, lane = routed
        cfg = self.admission.limit(name)
        ticket = self.admission.new_ticket(name, key, lane)
        steps = self.admission.acquire_steps(cfg, tokens, ticket)
        return await adrive(steps, self.astore)

    async def ajudge(
        self,
        name: str,
        resp: Any,
        *,
        max_tokens: int | None = None,
        json: bool = False,
        response_format: Any = None,
        schema: Any = None,
        request: Any = None,
        validate: Any = None,
    ) -> Verdict:
        """:meth:`Fleet.judge`, awaiting a ``validate`` coroutine function (the limit's by
        default); nothing is sent: pass the verdict to :meth:`arelease`."""
        cfg = self.admission.limit(name)
        ask = ask_of(max_tokens, json, response_format, schema, request)
        ok = await await_hook(cfg.validate if validate is None else validate, resp)
        hook = None if ok is None else (lambda _resp: ok)
        return judge_answer(self.admission, name, resp, ask, hook)

    async def arelease(
        self, decision: Decision, outcome: str = "ok", *, verdict: Verdict | None = None
    ) -> Any:
        """:meth:`Fleet.release`, awaited (``verdict`` counted in the same round trip)."""
        if not decision.allowed or decision.lease_id is None:
            from ..errors import ConfigError

            raise ConfigError("arelease() needs an admitted decision (it holds no lease)")
        checked = check_verdict(verdict)
        steps = release_judged_steps(
            self.admission, decision.limit, decision.lease_id, outcome_of(outcome, checked),
            checked,
        )  # fmt: skip
        return await adrive(steps, self.astore)

    def aguarded(
        self,
        name: str,
        *,
        tokens: Any = 0,
        max_wait: float | None = None,
        validate: Any = None,
        usage: Any = None,
        key: Any = None,
        lane: Any = None,
    ) -> Any:
        """:meth:`Fleet.guarded` for coroutine functions (``async def``): the same
        arguments, ``key`` and ``lane`` included."""
        from .guarded import aguarded

        return aguarded(
            self,
            name,
            tokens=tokens,
            max_wait=max_wait,
            validate=validate,
            usage=usage,
            key=key,
            lane=lane,
        )
