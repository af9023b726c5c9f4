"""How a FleetTask meets backpressure: reschedule, wait or fail (the Celery glue).

:class:`Rescheduling` is the part of :class:`~celery_fleet.FleetTask` that decides, in one
place, what a refused admission does to a task (:meth:`Rescheduling._on_backpressure`): it
republishes the task under the same id with a countdown (not a Celery retry), sleeps in
place (eager), or lets the refusal fail the task, past the task's patience too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from celery.exceptions import Ignore
from kombu.serialization import dumps, loads, prepare_accept_content

from ..admission.run import Run, Throttling
from ..errors import Backpressure, FleetError, ThrottledTooLong
from ..logfields import log_fields
from ..settings import visibility_timeout
from . import idempotency, tracing
from .signals import sends_task_events, task_rescheduled, task_throttled

__all__ = [
    "GUESSED_WAITS",
    "HEADER",
    "THROTTLED",
    "BACKUP_HEADER",
    "RescheduleSource",
    "Rescheduling",
    "SerializingApp",
    "encode",
    "decode",
]

log = logging.getLogger("celery_fleet")

#: The result-backend state of a task waiting out a reschedule countdown.
THROTTLED = "THROTTLED"
#: The message header that carries a task's place in line and its patience so far.
HEADER = "fleet"
#: The header of the broker's backup of a copy deferred in Redis: the copy's item id.
BACKUP_HEADER = "fleet_backup"
#: Set on a backup sent instead of a copy whose deferral in Redis failed (it may or may not
#: have been stored): it runs unless Redis has the copy, also when Redis cannot be asked.
FALLBACK_HEADER = "fleet_backup_fallback"

#: Refusals whose wait nobody knows (an open breaker's reset, a paused quality breaker's
#: half-open, another attempt's claim of an idempotency key, the fleet's Redis away): their
#: reschedules back off exponentially with the count.
GUESSED_WAITS = frozenset({"circuit_open", "quality_degraded", "key_busy", "store_down"})


class _PumpTimes(Protocol):
    """The pump's period and its leader's lease: they bound how late a copy is published."""

    @property
    def pump_period_s(self) -> float: ...

    @property
    def pump_lease_s(self) -> float: ...


class _Sleeper(Protocol):
    def sleep(self, seconds: float) -> None: ...


class _Commands(Protocol):
    def call(self, command: str, *args: Any) -> Any: ...


class _StoreDown(Protocol):
    @property
    def down(self) -> bool: ...


class _Deferred(Protocol):
    """Copies kept in Redis until due (:class:`~celery_fleet.durability.deferred.Deferred`)."""

    def add(self, item_id: str, delay_s: float, message: bytes) -> float: ...

    def fate(self, item_id: str) -> str: ...

    def due_in_ms(self, item_id: str) -> float | None: ...


class _Counting(Protocol):
    def add(self, limit: str, field: str, n: float = 1) -> None: ...


class RescheduleSource(_PumpTimes, Protocol):
    """What the reschedule path uses of a :class:`~celery_fleet.Fleet`: the countdown rule,
    where copies wait (``defer``, the deferred store, whether Redis is known to be away),
    the clock an eager task sleeps on, Redis's time, and the reschedule counter."""

    @property
    def defer(self) -> str: ...

    @property
    def clock(self) -> _Sleeper: ...

    @property
    def store(self) -> _Commands: ...

    @property
    def store_down(self) -> _StoreDown: ...

    @property
    def deferred(self) -> _Deferred: ...

    @property
    def counters(self) -> _Counting: ...

    def reschedule_countdown(
        self, wait_s: float, reschedules: int, previous_s: float = 0.0, guess: bool = False
    ) -> float: ...


class _SerializerConf(Protocol):
    @property
    def task_serializer(self) -> str: ...

    @property
    def accept_content(self) -> Iterable[str] | None: ...


class SerializingApp(Protocol):
    """What :func:`encode` and :func:`decode` use of a Celery app: its serializer settings
    and ``signature()``."""

    @property
    def conf(self) -> _SerializerConf: ...

    def signature(self, fields: Mapping[str, Any]) -> Any: ...


def backup_grace_s(fleet: _PumpTimes) -> float:
    """How long after its copy is due the broker's backup is delivered (and again, as long
    as the copy still waits): two pump periods and two leader failovers."""
    return float(2.0 * (fleet.pump_period_s + fleet.pump_lease_s))


def encode(app: SerializingApp, signature: Any) -> bytes:
    """A signature as the bytes the pump can publish again (the app's task serializer)."""
    serializer = app.conf.task_serializer
    content_type, encoding, body = dumps(dict(signature), serializer=serializer)  # type: ignore[no-untyped-call]
    if isinstance(body, bytes):
        body = body.decode("latin-1")
    return json.dumps({"ct": content_type, "enc": encoding, "body": body}).encode()


def decode(app: SerializingApp, message: bytes) -> Any:
    """The signature :func:`encode` stored."""
    envelope = json.loads(message)
    body = envelope["body"]
    if envelope["enc"] == "binary":
        body = body.encode("latin-1")
    # what the worker takes from the broker, no more
    accept = prepare_accept_content(app.conf.accept_content)  # type: ignore[no-untyped-call]
    fields = loads(body, envelope["ct"], envelope["enc"], accept=accept)  # type: ignore[no-untyped-call]
    return app.signature(fields)


class Rescheduling:
    """Mixin of :class:`~celery_fleet.FleetTask`: the reschedule path."""

    if TYPE_CHECKING:  # FleetTask's property: the Fleet of the task's app

        @property
        def fleet(self) -> RescheduleSource: ...

    # Provided by FleetTask / celery.Task (Celery has no type hints).
    request: Any
    request_stack: Any
    name: str
    ignore_result: bool
    fleet_on_limit: str
    fleet_max_reschedules: int | None
    fleet_max_throttled: float | None
    update_state: Any
    push_request: Any
    pop_request: Any
    signature_from_request: Any
    send_event: Any
    _get_app: Any

    @property
    def throttling(self) -> Throttling:
        """What this run of the task has waited so far (its ``fleet`` header)."""
        return Throttling.from_header(getattr(self.request, HEADER, None))

    def _on_backpressure(self, exc: Backpressure, run: Run) -> None:
        """Decide what a refused admission does to this task: reschedule, wait or fail.

        Republishes the task (same id, same ``retries``: it does not count against
        ``max_retries``) with a countdown of the wait plus jitter, or more: capped
        exponential backoff with jitter over the reschedule count
        (:meth:`Fleet.reschedule_countdown`), capped by
        ``fleet_max_countdown`` so long waits (per-day budgets) become several short sleeps
        rather than one ETA beyond the broker's visibility timeout, and by the task's
        remaining patience. The copy carries the ``fleet`` header (age in line, reschedule
        count, time throttled); the result backend says ``THROTTLED`` until it runs. Then
        raises :class:`celery.exceptions.Ignore`: this message is done (acked), and no
        RETRY state or traceback is stored for what is not a failure.

        Past ``max_reschedules`` / ``max_throttled`` raises
        :class:`~celery_fleet.errors.ThrottledTooLong` (the task fails). Called directly,
        or with ``on_limit="fail"``, re-raises ``exc``. In eager mode it sleeps and
        returns, and the caller tries again.
        """
        request = self.request
        if (
            self.fleet_on_limit == "fail"
            or self.request_stack.top is None
            or request.called_directly
        ):
            task_throttled.send(sender=self, request=request, exc=exc, action="fail")
            raise exc
        action = "wait" if request.is_eager else "reschedule"
        task_throttled.send(sender=self, request=request, exc=exc, action=action)
        fleet = self.fleet
        past = self.throttling
        throttled_s = past.throttled_s + run.waited_s
        run.waited_s = 0.0
        self._check_patience(exc, past.reschedules, throttled_s)
        countdown = fleet.reschedule_countdown(
            exc.wait_ms / 1000.0,
            past.reschedules,
            past.countdown_s,
            guess=exc.reason in GUESSED_WAITS,
        )
        if self.fleet_max_throttled is not None:
            countdown = max(0.05, min(countdown, self.fleet_max_throttled - throttled_s))
        state = Throttling(
            since_ms=run.since_ms,
            reschedules=past.reschedules + 1,
            throttled_s=round(throttled_s + countdown, 3),
            limit=exc.limit,
            reason=exc.reason,
            wait_ms=exc.wait_ms,
            countdown_s=round(countdown, 3),
            places=dict(run.places),
        )
        if request.is_eager:
            fleet.clock.sleep(countdown)
            request.fleet = state.as_header()  # the next attempt sees it
            return
        self._reschedule(exc, state, countdown)

    def _publish_copy(self, headers: dict[str, Any], countdown: float, n: int) -> str:
        """Publish the task's copy: kept in the fleet's Redis until due (``fleet_defer =
        "redis"``), or, with ``"countdown"`` or while that Redis is away, as an ETA
        message. Returns which it was."""
        request = self.request
        fleet = self.fleet
        headers.pop(BACKUP_HEADER, None)
        headers.pop(FALLBACK_HEADER, None)
        # While the store is known to be away, no socket timeout: straight to a countdown.
        if fleet.defer == "redis" and not fleet.store_down.down:
            sig = self.signature_from_request(request, retries=request.retries, headers=headers)
            item = f"{request.id}:{n}"
            try:
                fleet.deferred.add(item, countdown, encode(self._get_app(), sig))
            except FleetError as exc:
                # The add may have run with its reply lost: the copy goes out as a fallback
                # that runs unless Redis has the copy (never both).
                log.warning(
                    "celery-fleet: could not defer task %s in Redis (%s); publishing it "
                    "with a countdown",
                    request.id,
                    exc,
                    extra=log_fields(task_id=request.id),
                )
                self._publish_backup(item, countdown, {**headers, FALLBACK_HEADER: True})
                return "countdown"
            self._publish_backup(item, countdown + backup_grace_s(fleet), headers)
            return "redis"
        sig = self.signature_from_request(
            request, countdown=countdown, retries=request.retries, headers=headers
        )
        self._send_as_copy(sig)
        return "countdown"

    def _send_as_copy(self, sig: Any) -> None:
        """Publish a copy of the running task as the task itself, not as its child.

        The copy carries the request's ``parent_id`` and ``root_id``, but Celery fills a
        missing one (a task published from outside any task has no parent) with the id of
        the task being run, so Flower's Parent and Root of the copy would point at itself.
        While it publishes, a blank request (``called_directly``) hides this run from
        Celery's "current worker task", as the pump publishing a deferred copy does; it also
        keeps the copy out of this run's ``children``."""
        self.push_request(called_directly=True)
        try:
            sig.apply_async()
        finally:
            self.pop_request()

    def _publish_backup(self, item: str, countdown: float, headers: dict[str, Any]) -> None:
        """Publish the broker's backup of a copy deferred in Redis: delivered after the copy
        is due, it runs only if Redis lost the copy (restarted empty; see
        :meth:`_drop_needless_backup`). The copy is never lost, at the price of a duplicate
        when Redis restarts empty after publishing it. Its countdown stays under the
        broker's ``visibility_timeout`` (an ETA beyond it would be delivered twice); one that
        comes before its copy is due finds it waiting and is published again for later."""
        request = self.request
        visibility = visibility_timeout(self._get_app().conf)
        if visibility is not None:
            countdown = min(countdown, 0.9 * visibility)
        backup = self.signature_from_request(
            request,
            countdown=countdown,
            retries=request.retries,
            headers={**headers, BACKUP_HEADER: item},
        )
        self._send_as_copy(backup)

    def _drop_needless_backup(self) -> None:
        """Called as a task starts; returns for anything but a backup copy. A backup whose
        copy Redis published raises ``Ignore`` (acked, not run); one whose copy still waits
        is published again for later, then ``Ignore`` (the pump will publish the copy); one
        whose copy is unknown (Redis lost it) returns: it runs."""
        request = self.request
        if self.request_stack.top is None or request.called_directly or request.is_eager:
            return
        item = getattr(request, BACKUP_HEADER, None) or (request.headers or {}).get(BACKUP_HEADER)
        if not item:
            return
        fallback = bool(
            getattr(request, FALLBACK_HEADER, None) or (request.headers or {}).get(FALLBACK_HEADER)
        )
        try:
            fate = self.fleet.deferred.fate(str(item))
        except FleetError:
            # The fleet's Redis is away. A fallback (its copy may never have reached Redis)
            # runs; a backup asks again later.
            fate = "unknown" if fallback else "waiting"
        if fate == "unknown":
            log.warning(
                "celery-fleet: the deferred copy %s of task %s is not in the fleet's Redis "
                "(restarted empty?): running its backup from the broker",
                item,
                request.id,
                extra=log_fields(task_id=request.id),
            )
            return
        if fate == "waiting":
            headers = dict(request.headers or {})
            if getattr(request, HEADER, None) is not None:
                headers[HEADER] = getattr(request, HEADER)
            headers.pop(FALLBACK_HEADER, None)
            grace = backup_grace_s(self.fleet)
            later = grace
            try:  # come back after the copy is due, not every grace period until then
                due_ms = self.fleet.deferred.due_in_ms(str(item))
                now_s, now_us = self.fleet.store.call("TIME")
                if due_ms is not None:
                    later = max(
                        grace, (due_ms - int(now_s) * 1000 - int(now_us) / 1000) / 1000 + grace
                    )
            except FleetError:
                pass
            self._publish_backup(str(item), later, headers)
        raise Ignore()

    def _check_patience(self, exc: Backpressure, reschedules: int, throttled_s: float) -> None:
        over_count = (
            self.fleet_max_reschedules is not None and reschedules >= self.fleet_max_reschedules
        )
        over_time = self.fleet_max_throttled is not None and throttled_s >= self.fleet_max_throttled
        if over_count or over_time:
            raise ThrottledTooLong(
                exc.limit, exc.wait_ms, exc.reason, reschedules, round(throttled_s, 3)
            ) from exc

    def _reschedule(self, exc: Backpressure, state: Throttling, countdown: float) -> None:
        """Store THROTTLED, publish the copy, tell listeners, and end this message."""
        request = self.request
        header = state.as_header()
        meta = {
            **header,
            "countdown_s": round(countdown, 3),
            "resumes_at": round(time.time() + countdown, 3),
            "exc": str(exc),
        }
        if not self.ignore_result:
            # Before the copy exists, so it can never overwrite the copy's own state.
            self.update_state(state=THROTTLED, meta=meta)
        headers = {**(request.headers or {}), HEADER: header}
        tracing.carry_trace(headers)  # the copy stays in this attempt's trace
        attempt = idempotency.current_attempt.get()
        if attempt is not None:
            attempt.finish("queued")  # before the copy exists: it must be able to claim
            headers[idempotency.KEY_HEADER] = attempt.key
        via = self._publish_copy(headers, countdown, state.reschedules)
        tracing.note_reschedule(exc, state, via)
        self.fleet.counters.add(exc.limit, f"rescheduled|{exc.reason}")
        log.info(
            "celery-fleet: rescheduled task=%s id=%s limit=%s reason=%s wait_ms=%d "
            "countdown_s=%.2f reschedules=%d via=%s",
            self.name,
            request.id,
            exc.limit,
            exc.reason,
            exc.wait_ms,
            countdown,
            state.reschedules,
            via,
            extra=log_fields(
                task_id=request.id,
                limit=exc.limit,
                reason=exc.reason,
                wait_ms=exc.wait_ms,
                **({"key": attempt.key} if attempt is not None else {}),
            ),
        )
        task_rescheduled.send(
            sender=self,
            request=request,
            exc=exc,
            countdown=countdown,
            reschedules=state.reschedules,
        )
        if sends_task_events(self._get_app()):
            try:  # Flower: state THROTTLED (a custom event state), a short reason, no traceback
                fields = state.as_header()  # limit, reason, wait_ms, reschedules, countdown_s...
                self.send_event(
                    "task-throttled", exception=f"THROTTLED: {exc}", traceback="", **fields
                )
            except Exception:  # monitoring must never lose the task
                log.debug("celery-fleet: could not send the task-throttled event", exc_info=True)
        raise Ignore(f"celery-fleet: rescheduled in {countdown:.2f} s ({exc})")
