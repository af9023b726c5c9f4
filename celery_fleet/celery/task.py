"""The Celery glue: ``FleetTask`` and the ``@fleet_task`` decorator.

Example::

    from celery_fleet import fleet_task

    @fleet_task(limit="openai", tokens=1500)        # one admission around the whole body
    def summarize(doc_id): ...

    @fleet_task(bind=True)
    def agent(self, goal):
        with self.fleet.slot("openai", tokens=2000) as slot:
            resp = call_model()
            slot.settle(tokens=resp.usage.total_tokens)

A :class:`~celery_fleet.errors.Backpressure` (e.g. :class:`~celery_fleet.Throttled`)
escaping the body is not a failure: :meth:`FleetTask._on_backpressure`, the single place
where a task decides between waiting, rescheduling and failing, republishes the task
under the same id with ``countdown = wait + jitter`` and does not count it as a retry.

What the fleet knows about a task's waiting travels in one message header, ``fleet``
(readable as ``self.request.fleet`` and through :attr:`FleetTask.throttling`):
``since_ms`` (its age in every line, so a rescheduled task keeps its place),
``reschedules``, ``throttled_s`` and the last refusal's ``limit``, ``reason`` and ``wait_ms``.
While a rescheduled task waits for its countdown, its state in the result backend is
``THROTTLED`` with that header as meta (``AsyncResult(id).info``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Task, shared_task
from celery.exceptions import Ignore, Reject, Retry
from celery.result import GroupResult

from ..admission.run import Run, Throttling, current_run
from ..admission.tenancy import check_key
from ..checks import suggest
from ..errors import Backpressure, ConfigError, ThrottledTooLong, attached_pushback
from ..fleet import Fleet
from . import affinity, idempotency, pump
from .app import fleet_for
from .lanes import fixed_lane, lane_of
from .loops import run_async
from .options import FLEET_OPTIONS, ON_LIMIT, check_fleet_options, known_options
from .reschedule import BACKUP_HEADER, HEADER, THROTTLED, Rescheduling
from .stagger import fan_out_signatures, jitter_publish, stagger, warn_if_beyond_visibility

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["FleetTask", "fleet_task", "ON_LIMIT", "THROTTLED", "Throttling"]

log = logging.getLogger("celery_fleet")

T = TypeVar("T")

#: The headers through which a message carries what the fleet knows of its task's past: its
#: place in line (a reschedule), the deferred copy it backs up, its idempotency key.
_CARRIED_HEADERS = (HEADER, BACKUP_HEADER, idempotency.KEY_HEADER)
_NO_HEADERS: dict[str, Any] = {}


class FleetTask(Rescheduling, Task):  # type: ignore[misc]
    """Base class of fleet tasks; also usable as ``@app.task(base=FleetTask)``.

    Class attributes (set by ``@fleet_task(limit=..., tokens=..., max_wait=..., on_limit=...)``):

    - ``fleet_limit``: limit to hold a slot of around the whole body (None: none).
    - ``fleet_tokens``: tokens that admission reserves.
    - ``fleet_max_wait``: seconds to wait for admission in place (None: ``fleet_max_wait``).
    - ``fleet_on_limit``: ``"reschedule"`` (default) republishes the task with a countdown
      when admission is refused past ``max_wait``; ``"wait"`` waits in place with no
      deadline (slots opened in the body too); ``"fail"`` lets Throttled fail the task.
    - ``fleet_wait_after_call``: True (default): once the body has made a call (released
      a slot) in this run, later slots wait in place, keeping their place in line, rather
      than reschedule, which would restart the body and pay for its calls again.
    - ``fleet_max_reschedules`` / ``fleet_max_throttled``: patience. Past that many
      reschedules, or seconds spent waiting (in place and in countdowns), the task fails
      with :class:`~celery_fleet.errors.ThrottledTooLong`. None (default): no limit.
    - ``fleet_jitter``: seconds; every first publish gets a random countdown in
      ``[0, jitter)`` (``apply_async(..., fleet_jitter=s)`` per call). 0 (default): none.
    - ``fleet_idempotency_key``: a format string over the arguments or a callable taking
      them; its key makes publishes, retries and redeliveries one run that runs once
      (:mod:`celery_fleet.celery.idempotency`; per call: ``apply_async(..., idempotency_key=k)``).
      ``fleet_singleton``: the key is a lock instead (one running at a time, every publish
      runs). ``fleet_release_on_failure`` (True): a final failure frees the key.
    - ``fleet_lane``: the priority lane of ``fleet_limit`` the body's slot waits in: a lane
      name, a template over the arguments or a callable (:mod:`celery_fleet.celery.lanes`).
    - ``fleet_affinity``: the affinity key, a template over the arguments or a callable:
      with ``fleet_distribution`` ``"dedicated"`` or ``"steal"`` the task is published to
      the key's affinity queue (:mod:`celery_fleet.celery.affinity`).
    """

    fleet_limit: str | None = None
    fleet_tokens: int = 0
    fleet_max_wait: float | None = None
    fleet_on_limit: str = "reschedule"
    fleet_wait_after_call: bool = True
    fleet_max_reschedules: int | None = None
    fleet_max_throttled: float | None = None
    fleet_jitter: float = 0.0
    fleet_idempotency_key: Any = None
    #: the key (tenant) of a keyed limit's slots: a template over the arguments or a callable
    fleet_key: Any = None
    fleet_singleton: bool = False
    fleet_release_on_failure: bool = True
    fleet_lane: Any = None
    fleet_affinity: Any = None
    # Celery's autoretry wraps run(): never let it turn backpressure into a counted retry.
    dont_autoretry_for: tuple[type[BaseException], ...] = (Backpressure,)

    @property
    def fleet(self) -> Fleet:
        """The :class:`~celery_fleet.Fleet` of this task's app (created from app.conf if needed)."""
        return fleet_for(self._get_app())

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        # Runs in app.finalize(), outside any signal handler (Celery signals swallow
        # exceptions): a worker whose task names an unknown limit fails at start-up.
        super().on_bound(app)
        from ..observability import metrics  # not at import: a worker's steps, Prometheus

        metrics.install(app)  # serves /metrics only when fleet_metrics_port is set
        pump.install(app)  # publishes deferred reschedules when fleet_defer = "redis"
        affinity.install(app)  # consumes the affinity queues this worker is home of
        fleet = Fleet.registered(app)
        if fleet is not None and cls.name:
            fleet.check_task_options(
                cls.name, cls.fleet_limit, cls.fleet_tokens, lane=fixed_lane(cls.fleet_lane)
            )
        if cls.fleet_jitter and cls.name:
            warn_if_beyond_visibility(cls.fleet_jitter, f"task {cls.name}'s jitter", app.conf)

    def apply_async(
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> Any:
        # Publish is the last moment to catch a bad limit before a worker does.
        if self.fleet_limit is not None or self.fleet_tokens:
            lane = lane_of(self.fleet_lane, self.run, args, kwargs)  # a template's, per call
            self.fleet.check_task_options(self.name, self.fleet_limit, self.fleet_tokens, lane=lane)
        try:
            if self.fleet_key is not None:
                self._fleet_key_of(args, kwargs)  # a bad key is a ConfigError at publish
            if self.fleet_affinity is not None:
                key = affinity.affinity_of(self.fleet_affinity, self.run, args, kwargs)
                affinity.route(self.fleet.distribution, key, options)
        except ConfigError as exc:  # say which task, as a bad limit or lane does
            raise ConfigError(f"task {self.name}: {exc}") from exc
        jitter_publish(options, self.fleet_jitter)
        if task_id is not None:
            options["task_id"] = task_id
        return idempotency.publish(self, args, kwargs, options, super().apply_async)

    def fan_out(
        self, items: Iterable[Any], over: float, *, seed: int | None = None, **options: Any
    ) -> GroupResult:
        """Publish one task per item with countdowns spread evenly over ``over`` seconds.

        An item is the positional arguments (a tuple), the keyword arguments (a dict) or
        the one argument (anything else). ``options`` go to every publish (``queue``...).
        Returns the :class:`celery.result.GroupResult`; see :meth:`Fleet.stagger`.
        """
        sigs = [sig.set(**options) for sig in fan_out_signatures(self, items)]
        return stagger(sigs, over, seed=seed, app=self._get_app())

    def step(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` once per task id and return its result; on any re-run
        of this task (reschedule, ``retry()``, redelivery) return the stored result instead.

        Results are stored in Redis under the task id as JSON (at most
        ``fleet_step_max_bytes``, for ``fleet_step_ttl`` seconds). A result that JSON
        cannot store is a :class:`~celery_fleet.errors.StepError` (before ``fn`` runs when
        its return annotation says so). Called outside a worker (no task id), ``fn`` simply
        runs. See :mod:`celery_fleet.durability.steps`.
        """
        task_id = self.request.id
        if not task_id or self.request.called_directly:
            from ..durability.steps import check_step

            check_step(name, fn)
            return fn(*args, **kwargs)
        return self.fleet.steps(task_id).run(name, fn, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request_stack.top  # None: called directly, outside any worker
        if request is not None and self._first_run_unkeyed(request):
            # The common case, kept lean: no backup copy to check, no past to read from
            # the headers, no key to claim (what the full path would find out the long way).
            run = self._fresh_run(None)
            body = self._admitted_body
        else:
            self._drop_needless_backup()  # the broker's backup of a copy Redis published
            # the age and patience the message carries
            run = self._fresh_run(None if request is None else self.throttling)
            body = self._keyed_body
        if self.fleet_key is not None:
            # from the arguments, so a rescheduled copy keeps it
            run.key = self._fleet_key_of(args, kwargs)
        direct = request is None
        token = current_run.set(run)
        try:
            while True:
                try:
                    return body(args, kwargs, direct)
                except ThrottledTooLong:
                    raise
                except Backpressure as exc:
                    self._on_backpressure(exc, run)  # raises, or returns after waiting (eager)
        finally:
            current_run.reset(token)

    def _first_run_unkeyed(self, request: Any) -> bool:
        """Whether this run of the task can skip the keyed path: run by a worker (or
        eagerly), a task with no ``idempotency_key``, and a message that carries none of
        the fleet's headers (no place in line, no idempotency key, not a backup copy)."""
        if self.fleet_idempotency_key is not None or request.called_directly:
            return False
        attrs = getattr(request, "__dict__", None)
        if attrs is None:
            return False
        # protocol 2 spreads custom headers on the request; Celery 5.7+ also has .headers
        headers = attrs.get("headers") or _NO_HEADERS
        for name in _CARRIED_HEADERS:
            if name in attrs or name in headers:
                return False
        return True

    def _fleet_key_of(self, args: Any, kwargs: Any) -> str | None:
        """The ``key`` option applied to a call's arguments, checked (and checked against
        the task's limit, which must have keys)."""
        key = idempotency.key_of(self.fleet_key, self.run, args, kwargs, "key", check_key)
        if key is not None and self.fleet_limit is not None:
            fleet = self.fleet
            fleet.admission.keyed.hash_of(fleet.admission.limit(self.fleet_limit), key)
        return key

    def _keyed_body(self, args: tuple[Any, ...], kwargs: dict[str, Any], direct: bool) -> Any:
        """The body under the message's idempotency key, when it has one: run once, its
        outcome recorded; a key that already succeeded returns the stored result."""
        attempt = idempotency.claim_for(self, args, kwargs)  # may raise KeyBusy
        if attempt is None:
            return self._admitted_body(args, kwargs, direct)
        if isinstance(attempt, idempotency.Replay):
            return attempt.result
        tokens = idempotency.current_key.set(attempt.key), idempotency.current_attempt.set(attempt)
        try:
            result = self._admitted_body(args, kwargs, direct)
        except (Retry, Ignore, Reject, Backpressure):
            attempt.finish("queued")  # this run goes on in a copy (or the next loop)
            raise
        except BaseException as exc:
            attempt.finish("failed", f"{type(exc).__name__}: {exc}"[:1000])
            raise
        else:
            attempt.finish("succeeded", idempotency.encode_result(attempt.key, result))
            return result
        finally:
            idempotency.current_key.reset(tokens[0])
            idempotency.current_attempt.reset(tokens[1])

    def _admitted_body(self, args: tuple[Any, ...], kwargs: dict[str, Any], direct: bool) -> Any:
        """The body, in a slot of the task's ``limit`` when it has one."""
        if self.fleet_limit is None:
            return self._run_body(args, kwargs, direct)
        lane = None if self.fleet_lane is None else lane_of(self.fleet_lane, self.run, args, kwargs)
        with self.fleet.slot(self.fleet_limit, tokens=self.fleet_tokens, lane=lane):
            return self._run_body(args, kwargs, direct)

    def _fresh_run(self, past: Throttling | None) -> Run:
        """A Run that goes on from ``past`` (its age in line, its patience spent), or, with
        None, a first run's."""
        deadline = None
        if self.fleet_max_throttled is not None:
            spent = 0.0 if past is None else past.throttled_s
            deadline = self.fleet.clock.monotonic() + max(0.0, self.fleet_max_throttled - spent)
        run = Run(
            max_wait_s=math.inf if self.fleet_on_limit == "wait" else self.fleet_max_wait,
            wait_after_call=self.fleet_wait_after_call,
            deadline=deadline,
        )
        if past is not None:
            run.since_ms, run.places = past.since_ms, dict(past.places)
        return run

    def _run_body(self, args: tuple[Any, ...], kwargs: dict[str, Any], direct: bool) -> Any:
        """``run``; ``direct``: called outside a worker, with no request pushed yet."""
        try:
            if direct:
                # Called directly (not by a worker): Task.__call__ pushes the request.
                return super().__call__(*args, **kwargs)
            # Run by the worker's tracer, which already pushed the request with its id.
            return self.run(*args, **kwargs)
        except Exception as exc:
            refusal = _backpressure_cause(exc)
            if refusal is None:
                raise
            raise refusal from None  # the SDK error only wrapped it

    def retry(self, *args: Any, exc: BaseException | None = None, **kwargs: Any) -> Any:
        """Celery's retry, except that backpressure reschedules without counting a retry.

        ``retry(exc=Throttled(...))`` (also from ``autoretry_for``) re-raises the
        backpressure, which :meth:`__call__` hands to :meth:`_on_backpressure`.
        """
        if isinstance(exc, Backpressure):
            raise exc
        attempt = idempotency.current_attempt.get()
        if attempt is not None:
            attempt.finish("queued")  # before the copy exists: it must be able to claim
        return super().retry(*args, exc=exc, **kwargs)


def _on_thread_loop(fun: Callable[..., Any]) -> Callable[..., Any]:
    """An ``async def`` body as the plain function Celery calls: awaited on the worker
    thread's own loop (:func:`celery_fleet.celery.loops.run_async`), kept across tasks."""

    @functools.wraps(fun)
    def body(*args: Any, **kwargs: Any) -> Any:
        return run_async(fun(*args, **kwargs))

    return body


def fleet_task(*args: Any, **options: Any) -> Any:
    """Like Celery's ``shared_task`` (or ``app.task`` with ``app=``), with a FleetTask base.

    Accepts every Celery task option plus ``limit``, ``tokens``, ``max_wait``,
    ``on_limit``, ``wait_after_call``, ``max_reschedules``, ``max_throttled``, ``jitter``,
    ``idempotency_key``, ``singleton``, ``release_on_failure``, ``lane`` and ``affinity`` (see
    :class:`FleetTask`). Unknown options are rejected here, naming the
    closest known one, so ``@fleet_task(tokns=10)`` fails at import rather than silently.
    When the Fleet of the app already exists, ``limit`` and ``tokens`` are checked against
    its limits now; otherwise when the app finalizes and at publish.

    Example::

        @fleet_task(limit="openai", tokens=1500, max_retries=3)
        def summarize(doc_id): ...
    """
    fleet_opts = {attr: options.pop(opt) for opt, attr in FLEET_OPTIONS.items() if opt in options}
    check_fleet_options(fleet_opts)
    base = options.setdefault("base", FleetTask)
    if not (isinstance(base, type) and issubclass(base, FleetTask)):
        raise ConfigError(f"fleet_task(base=...) must be a subclass of FleetTask, got {base!r}")
    known = known_options(base) - set(FLEET_OPTIONS.values())
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"fleet_task got unknown option(s): {suggest(unknown, [*known, *FLEET_OPTIONS])}"
        )
    if "dont_autoretry_for" in options:
        options["dont_autoretry_for"] = (*options["dont_autoretry_for"], Backpressure)
    options.update(fleet_opts)
    app = options.pop("app", None)
    celery_decorator: Callable[..., Any] = (
        app.task(**options) if app is not None else shared_task(**options)
    )

    def decorator(fun: Callable[..., Any]) -> Any:
        if inspect.iscoroutinefunction(fun):
            fun = _on_thread_loop(fun)
        fleet = Fleet.registered(app) if app is not None else None
        if fleet is not None:
            name = options.get("name") or app.gen_task_name(fun.__name__, fun.__module__)
            fleet.check_task_options(
                name,
                fleet_opts.get("fleet_limit"),
                fleet_opts.get("fleet_tokens", 0),
                lane=fixed_lane(fleet_opts.get("fleet_lane")),
            )
        return celery_decorator(fun)

    if len(args) == 1 and callable(args[0]):
        return decorator(args[0])
    if args:
        raise ConfigError("fleet_task takes keyword options only, e.g. @fleet_task(limit='openai')")
    return decorator


def _backpressure_cause(exc: BaseException) -> Backpressure | None:
    """The fleet's refusal an SDK wrapped: the anthropic SDK raises ``APIConnectionError``
    ``from`` whatever its HTTP transport raised, e.g. the ``Throttled`` of
    :mod:`celery_fleet.httpx2`. Found in the ``__cause__`` chain, so the task reschedules.
    Also a provider's 429 an adapter marked with :func:`~celery_fleet.errors.attach_pushback`
    on the exception or one it was raised while handling: LiteLLM raises its own
    ``RateLimitError`` after :class:`~celery_fleet.contrib.litellm.FleetHook` has paused
    the limit, and hands its callbacks a copy sharing only that chain."""
    if isinstance(exc, Backpressure):
        return None  # the fleet's own error: raised as it is
    seen: set[int] = set()
    cause = exc.__cause__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, Backpressure):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__
    link: BaseException | None = exc
    seen.clear()
    while link is not None and id(link) not in seen:
        marked = attached_pushback(link)
        if marked is not None:
            return marked
        seen.add(id(link))
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return None
