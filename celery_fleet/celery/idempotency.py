"""Idempotent tasks, the Celery side: keys at publish, claims around the body, keys that travel.

``@fleet_task(idempotency_key="summarize:{doc_id}")`` (a format string over the task's
arguments, or a callable taking them) or ``task.apply_async(args, idempotency_key="...")``:

- **Publish.** The ledger records the publish atomically and names the run's task id, new
  for each run: a second publish of a key that is queued, running or done publishes
  nothing and returns the first one's ``AsyncResult``. The publish is confirmed once the
  broker took the message and undone when it raised; one never confirmed (the publisher
  died, or Redis froze under the call) frees the key after the publish lease. Retries and
  reschedules are the same run: they publish (same id) without asking.
- **Execution.** Before the body, the attempt claims the key: a key that already succeeded
  returns its stored result without running the body (a redelivery, a duplicate message);
  one running under a live lease elsewhere is rescheduled (:class:`KeyBusy`, backpressure);
  a lapsed lease (its worker died) is taken over. The claim's lease is renewed while the body
  runs. The outcome is recorded: succeeded (with the result as JSON), queued again (a
  ``retry()`` or a reschedule), failed; a final failure releases the key by default
  (``release_on_failure=True``) so it can be submitted again. A child the worker lost
  (SIGKILL, OOM) whose message is not redelivered fails the same way, recorded by the
  worker's main process (Celery's ``task_failure`` with ``WorkerLostError``).
- **Singleton** (``singleton=True``): the key is a lock, not a dedupe. Publishes keep their
  own task ids and are all accepted; at most one runs at a time per key, the others are
  rescheduled until it ends; each runs its body.
- **The key travels**: in the ``fleet_key`` message header, to child tasks published from a
  keyed body (``fleet_parent_key``), to events (``task-keyed``, with ``key``, ``attempt`` and
  ``taken_over``, sent when an attempt claims the key) and to log records
  (:class:`KeyLogFilter`).

Bad keys (a callable that raises or returns a non-string, an unknown template field) are a
:class:`~celery_fleet.ConfigError` at publish, and nothing is published.
"""

from __future__ import annotations

import json
import logging
import string
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from celery import signals

from ..durability.ledger import check_key, record_id_for
from ..errors import Backpressure, ConfigError, FleetError, StoreUnavailable
from ..logfields import log_fields
from ..observability.counters import KEYS_LIMIT
from .signals import sends_task_events

if TYPE_CHECKING:
    from ..durability.ledger import Claim, Enqueued
    from ..fleet import Fleet

__all__ = ["KEY_HEADER", "PARENT_HEADER", "KeyBusy", "KeyLogFilter", "current_key", "key_of"]

log = logging.getLogger("celery_fleet")

#: The message header that carries a task's idempotency key.
KEY_HEADER = "fleet_key"
#: The header a child task published from a keyed body gets: its parent's key.
PARENT_HEADER = "fleet_parent_key"

#: The idempotency key of the task body running now (None outside one).
current_key: ContextVar[str | None] = ContextVar("celery_fleet_key", default=None)


#: The wait a claim reports when Redis is away (a guess: the task backs off with jitter).
STORE_DOWN_WAIT_MS = 1000


class KeyBusy(Backpressure):
    """Another attempt holds this idempotency key under a live lease: try again later."""

    def __init__(self, key: str, wait_ms: int, reason: str = "key_busy") -> None:
        super().__init__("idempotency", wait_ms, reason)
        self.key = key

    def __str__(self) -> str:
        if self.reason == "store_down":
            why = "cannot be claimed: the fleet's Redis is unreachable"
        else:
            why = "is running elsewhere"
        return f"idempotency key {self.key!r} {why}; retry in {self.wait_ms} ms"


KeySpec = str | Callable[..., Any] | None


class _Ledger(Protocol):
    """The ledger calls a keyed task makes (:class:`~celery_fleet.durability.ledger.Ledger`)."""

    def enqueue(
        self, record_id: str, key: str, task: str, run_id: str | None = None
    ) -> Enqueued: ...

    def published(self, record_id: str, run_id: str, sent: bool, error: str = "") -> bool: ...

    def claim(
        self,
        record_id: str,
        key: str,
        task: str,
        owner: str,
        lease_s: float,
        singleton: bool,
        task_id: str = "",
    ) -> Claim: ...

    def finish(self, record_id: str, owner: str, outcome: str, payload: str = "") -> bool: ...

    def lost(self, record_id: str, task_id: str, release: bool, error: str) -> bool: ...


class _Claims(Protocol):
    """Claims kept renewed while bodies run
    (:class:`~celery_fleet.durability.ledger.ClaimKeeper`)."""

    def hold(self, record_id: str, owner: str) -> None: ...

    def drop(self, record_id: str, owner: str) -> None: ...


class _Counting(Protocol):
    def add(self, limit: str, field: str, n: float = 1) -> None: ...


class KeyedFleet(Protocol):
    """What idempotent tasks use of a :class:`~celery_fleet.Fleet`: the ledger, the claims
    kept renewed, the claim lease, and the dedupe counters."""

    @property
    def ledger(self) -> _Ledger: ...

    @property
    def claims(self) -> _Claims: ...

    @property
    def claim_lease_s(self) -> float: ...

    @property
    def counters(self) -> _Counting: ...


class KeyedTask(Protocol):
    """What this module uses of a :class:`~celery_fleet.FleetTask`: its key options, its
    fleet, and Celery's task members (``request``, ``app``...: Any, Celery has no hints)."""

    @property
    def name(self) -> str: ...

    @property
    def fleet(self) -> KeyedFleet: ...

    @property
    def fleet_idempotency_key(self) -> KeySpec: ...

    @property
    def fleet_singleton(self) -> bool: ...

    @property
    def fleet_release_on_failure(self) -> bool: ...

    @property
    def request(self) -> Any: ...

    @property
    def request_stack(self) -> Any: ...

    @property
    def app(self) -> Any: ...

    def run(self, *args: Any, **kwargs: Any) -> Any: ...

    def AsyncResult(self, task_id: str) -> Any: ...  # noqa: N802 (Celery's name)

    def send_event(self, type_: str, **fields: Any) -> Any: ...


if TYPE_CHECKING:

    def _fleet_is_keyed(fleet: Fleet) -> KeyedFleet:
        """Where mypy checks that a Fleet has what keyed tasks use: FleetTask's base,
        celery.Task, has no type hints, so passing a task to :func:`publish` checks none."""
        return fleet


def check_key_spec(spec: object, what: str = "idempotency_key") -> KeySpec:
    """At decoration: a format string (its fields parsed now) or a callable, or None.
    ``what`` names the option in errors (``key`` of a limit's keys uses it too)."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str) and spec:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(spec) if f is not None]
        except ValueError as exc:
            raise ConfigError(f"{what} template {spec!r} is malformed: {exc}") from None
        if any(f == "" or f.isdigit() for f in fields):
            raise ConfigError(
                f"{what} template {spec!r}: name the arguments ({{doc_id}}), "
                "positional fields cannot be matched to keyword arguments"
            )
        return spec
    raise ConfigError(
        f"{what} must be a format string ('summarize:{{doc_id}}') or a callable "
        f"taking the task's arguments, got {spec!r}"
    )


def key_of(
    spec: KeySpec,
    fun: Callable[..., Any],
    args: Any,
    kwargs: Any,
    what: str = "idempotency_key",
    check: Callable[[str], str] = check_key,
) -> str | None:
    """The key of one call: ``spec`` applied to the arguments bound to the task's signature,
    then ``check``-ed (``what`` names the option in errors).

    Raises :class:`ConfigError` for a callable that raises or returns a non-string, or a
    template naming a field that is not an argument.
    """
    if spec is None:
        return None
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    if callable(spec):
        try:
            key = spec(*args, **kwargs)
        except Exception as exc:
            raise ConfigError(f"the {what} callable raised {exc!r}") from exc
        if not isinstance(key, str):
            raise ConfigError(f"the {what} callable must return a str, got {type(key).__name__}")
        return check(key)
    import inspect

    try:
        bound = inspect.signature(fun).bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{what} {spec!r}: the arguments do not fit: {exc}") from None
    bound.apply_defaults()
    fields = {k: v for k, v in bound.arguments.items() if k not in ("self",)}
    try:
        return check(spec.format(**fields))
    except (KeyError, IndexError, AttributeError) as exc:
        raise ConfigError(
            f"{what} {spec!r} names {exc} which is not an argument of the task "
            f"(arguments: {sorted(fields)})"
        ) from None


@dataclass
class Attempt:
    """One execution's claim of a key: finished exactly once."""

    fleet: KeyedFleet
    record_id: str
    key: str
    owner: str
    release_on_failure: bool
    finished: bool = False

    def finish(self, outcome: str, payload: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        self.fleet.claims.drop(self.record_id, self.owner)
        if outcome == "failed" and self.release_on_failure:
            outcome = "released"
        try:
            if not self.fleet.ledger.finish(self.record_id, self.owner, outcome, payload):
                log.warning(
                    "celery-fleet: key %r: this attempt's claim was taken over before it "
                    "ended; its %s was not recorded",
                    self.key,
                    outcome,
                    extra=log_fields(key=self.key),
                )
        except StoreUnavailable as exc:  # an outage: say what follows, no redis-py traceback
            log.error(
                "celery-fleet: key %r: could not record that this attempt %s (%s); a frozen "
                "Redis may still run it when it thaws, else the key is taken over once its "
                "claim lapses (fleet_claim_lease) and a duplicate then runs the body again",
                self.key,
                outcome,
                exc,
                extra=log_fields(key=self.key),
            )
        except Exception:
            log.exception("celery-fleet: could not record the end of key %r", self.key)


def encode_result(key: str, result: Any) -> str:
    """The result as JSON for replays, or "" (replayed as None) when JSON cannot hold it."""
    try:
        return json.dumps(result, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        log.warning(
            "celery-fleet: key %r returned a %s, which JSON cannot store: a duplicate will "
            "get None instead",
            key,
            type(result).__name__,
            extra=log_fields(key=key),
        )
        return ""


def new_owner(task_id: str | None) -> str:
    return f"{task_id or '-'}/{uuid.uuid4().hex[:12]}"


@signals.before_task_publish.connect(weak=False)  # type: ignore[untyped-decorator]
def _key_to_children(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """A task published from a keyed body carries its parent's key."""
    key = current_key.get()
    if key is not None and headers is not None and PARENT_HEADER not in headers:
        headers[PARENT_HEADER] = key


class KeyLogFilter(logging.Filter):
    """Adds ``record.key`` and ``record.fleet_key`` (the running body's idempotency key, or
    ``"-"``) so a log format can show it: ``logging.getLogger().addFilter(KeyLogFilter())``
    on a handler. Both names, as the package's own lines carry both (``log_fields``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.fleet_key = record.key = current_key.get() or "-"
        return True


__all__ += ["Attempt", "check_key_spec", "encode_result", "new_owner", "publish"]


#: The claim the running body holds (finished before a retry or reschedule publishes).
current_attempt: ContextVar[Attempt | None] = ContextVar("celery_fleet_attempt", default=None)


def publish(
    task: KeyedTask, args: Any, kwargs: Any, options: dict[str, Any], send: Callable[..., Any]
) -> Any:
    """Publish one call of a keyed task through ``send`` (Celery's ``apply_async``), or
    not: the ``AsyncResult`` of the key's live run when this publish is a duplicate.

    A publish that starts a run is recorded, sent under the run's id, then confirmed; if
    ``send`` raises (the broker is down) the run is undone so the key is free, and the
    error propagates. A retry or reschedule (``retries`` given, or the ``fleet`` header) is
    the same run: it keeps its id and key and is not deduplicated (but undone the same way
    when its publish raises).
    """
    key = _key_for_publish(task, args, kwargs, options)
    if key is None or task.fleet_singleton:
        return send(args, kwargs, **options)
    if _is_same_run(options):
        return _send_same_run(task, key, args, kwargs, options, send)
    ledger, record_id = task.fleet.ledger, record_id_for(key)
    run = ledger.enqueue(record_id, key, task.name)
    if not run.new:
        log.info(
            "celery-fleet: key %r is already %s: not published",
            key,
            run.state,
            extra=log_fields(key=key),
        )
        task.fleet.counters.add(KEYS_LIMIT, "dedupe|publish")
        return task.AsyncResult(run.run_id)
    options["task_id"] = run.run_id
    try:
        result = send(args, kwargs, **options)
    except BaseException as exc:
        _publish_ended(ledger, key, record_id, run.run_id, False, f"{type(exc).__name__}: {exc}")
        raise
    _publish_ended(ledger, key, record_id, run.run_id, True)
    return result


def _send_same_run(
    task: KeyedTask,
    key: str,
    args: Any,
    kwargs: Any,
    options: dict[str, Any],
    send: Callable[..., Any],
) -> Any:
    """A retry's or reschedule's copy: its attempt already left the key ``queued`` for it,
    so when the copy cannot be published the run is undone (failed, released), or the key
    would stay queued with no message behind it. Not for the broker backup of a copy
    deferred in Redis (``fleet_backup``, :mod:`celery_fleet.celery.reschedule`): the copy exists."""
    try:
        return send(args, kwargs, **options)
    except BaseException as exc:
        run_id = options.get("task_id")
        if isinstance(run_id, str) and run_id and "fleet_backup" not in options["headers"]:
            error = f"{type(exc).__name__}: {exc}"
            _publish_ended(task.fleet.ledger, key, record_id_for(key), run_id, False, error)
        raise


def _key_for_publish(
    task: KeyedTask, args: Any, kwargs: Any, options: dict[str, Any]
) -> str | None:
    """The key of this publish (put in the ``fleet_key`` header), or None when unkeyed."""
    key: str | None = options.pop("idempotency_key", None)
    if key is not None:
        check_key(key, "idempotency_key option")
    headers = dict(options.get("headers") or {})
    if key is None and _is_same_run(options):
        key = headers.get(KEY_HEADER) or (
            current_key.get() if options.get("task_id") == task.request.id else None
        )
    if key is None:
        key = key_of(task.fleet_idempotency_key, task.run, args, kwargs)
    if key is None:
        return None
    headers[KEY_HEADER] = key
    options["headers"] = headers
    return key


def _is_same_run(options: dict[str, Any]) -> bool:
    """A retry (``retries`` given) or a reschedule (the ``fleet`` header) of a run."""
    return "retries" in options or "fleet" in (options.get("headers") or {})


def _publish_ended(
    ledger: _Ledger, key: str, record_id: str, run_id: str, sent: bool, error: str = ""
) -> None:
    """Confirm or undo a run's publish. If Redis cannot hear it, the publish lease lapses
    and frees the key anyway (a second message then is harmless: the claim dedupes)."""
    try:
        ledger.published(record_id, run_id, sent, error[:1000])
    except FleetError:
        log.warning(
            "celery-fleet: key %r: could not record that its publish %s; the key is free "
            "again once the publish lease lapses",
            key,
            "went out" if sent else "failed",
            exc_info=True,
            extra=log_fields(key=key),
        )


@dataclass(frozen=True)
class Replay:
    """A key that already succeeded: the stored result, returned without running the body."""

    result: Any


def claim_for(task: KeyedTask, args: Any, kwargs: Any) -> Attempt | Replay | None:
    """Claim the running message's key, or None when it has none (or is called directly).

    Raises :class:`KeyBusy` when another attempt holds it under a live lease, and
    :class:`celery.exceptions.Ignore` when it failed before and was kept (not released).
    """
    request = task.request
    if task.request_stack.top is None or request.called_directly:
        return None
    key = getattr(request, KEY_HEADER, None) or (request.headers or {}).get(KEY_HEADER)
    if key is None:
        key = key_of(task.fleet_idempotency_key, task.run, args, kwargs)
    if key is None:
        return None
    fleet = task.fleet
    record_id, owner = record_id_for(key), new_owner(request.id)
    try:
        claim = fleet.ledger.claim(
            record_id,
            key,
            task.name,
            owner,
            fleet.claim_lease_s,
            task.fleet_singleton,
            request.id or "",
        )
    except StoreUnavailable as exc:
        # Without the ledger a duplicate could run the work twice: wait for Redis instead
        # (the task reschedules with backoff), whatever fleet_store_down says.
        raise KeyBusy(key, STORE_DOWN_WAIT_MS, "store_down") from exc
    if claim.verdict == "done":
        log.info(
            "celery-fleet: key %r already succeeded: returning its stored result",
            key,
            extra=log_fields(key=key, task_id=request.id),
        )
        fleet.counters.add(KEYS_LIMIT, "dedupe|replay")
        return Replay(claim.result)
    if claim.verdict == "failed":
        from celery.exceptions import Ignore

        raise Ignore(f"celery-fleet: key {key!r} failed before and was kept: {claim.error}")
    if claim.verdict == "busy":
        raise KeyBusy(key, max(claim.wait_ms, 50))
    if claim.taken_over:
        log.warning(
            "celery-fleet: key %r: took over the claim of an attempt that died",
            key,
            extra=log_fields(key=key, task_id=request.id),
        )
    fleet.claims.hold(record_id, owner)
    # Monitors (Flower's task page) see the key and the attempt on the task, when the
    # worker sends task events at all: Task.send_event publishes whatever the settings say,
    # a broker round trip (~0.6 ms here, benchmarks/idempotency.py) no one would read.
    if sends_task_events(task.app):
        try:
            task.send_event(
                "task-keyed", key=key, attempt=claim.attempts, taken_over=claim.taken_over
            )
        except Exception:  # monitoring must never lose the task
            log.debug("celery-fleet: could not send the task-keyed event", exc_info=True)
    return Attempt(fleet, record_id, key, owner, task.fleet_release_on_failure)


@signals.task_failure.connect(weak=False)  # type: ignore[untyped-decorator]
def _worker_lost(
    sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any
) -> None:
    """In the worker's main process: a keyed attempt's child was lost (SIGKILL, OOM) and its
    message will not run again (early ack, or acks_late without reject_on_worker_lost).

    Nothing in the dead child recorded the end of its claim, so the key would stay
    ``running`` until its lease lapsed. Celery (5.7) sends ``task_failure`` here, with the
    lost request on the task's request stack: end the claim as failed, under the task's
    ``release_on_failure``.
    """
    from billiard.exceptions import WorkerLostError

    if not isinstance(exception, WorkerLostError) or not task_id:
        return
    if not hasattr(sender, "fleet_release_on_failure"):
        return  # not a FleetTask; a FleetTask is keyed when its message carries a key
    request = sender.request
    key = getattr(request, KEY_HEADER, None) or (getattr(request, "headers", None) or {}).get(
        KEY_HEADER
    )
    if not isinstance(key, str) or not key:
        return
    try:
        ended = sender.fleet.ledger.lost(
            record_id_for(key), task_id, sender.fleet_release_on_failure, repr(exception)[:1000]
        )
    except FleetError:
        log.warning(
            "celery-fleet: could not record that key %r's worker was lost",
            key,
            extra=log_fields(key=key, task_id=task_id),
        )
        return
    if ended:
        log.warning(
            "celery-fleet: key %r: its worker process was lost; recorded as failed",
            key,
            extra=log_fields(key=key, task_id=task_id),
        )
