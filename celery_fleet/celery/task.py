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
from ..checks import MAX_SECONDS, MAX_UNITS, check_max_wait, number, suggest
from ..errors import Backpressure, ConfigError, ThrottledTooLong, attached_pushback
from ..fleet import Fleet
from . import affinity, idempotency, pump
from .lanes import check_lane_spec, fixed_lane, lane_of
from .loops import run_async
from .reschedule import THROTTLED, Rescheduling
from .stagger import fan_out_signatures, jitter_publish, stagger, warn_if_beyond_visibility

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["FleetTask", "fleet_task", "ON_LIMIT", "THROTTLED", "Throttling"]

log = logging.getLogger("celery_fleet")

T = TypeVar("T")

#: What a task does when admission is refused for longer than ``max_wait``.
ON_LIMIT = ("reschedule", "wait", "fail")

_FLEET_OPTIONS = {
    "limit": "fleet_limit",
    "tokens": "fleet_tokens",
    "max_wait": "fleet_max_wait",
    "on_limit": "fleet_on_limit",
    "wait_after_call": "fleet_wait_after_call",
    "max_reschedules": "fleet_max_reschedules",
    "max_throttled": "fleet_max_throttled",
    "jitter": "fleet_jitter",
    "idempotency_key": "fleet_idempotency_key",
    "key": "fleet_key",
    "singleton": "fleet_singleton",
    "release_on_failure": "fleet_release_on_failure",
    "lane": "fleet_lane",
    "affinity": "fleet_affinity",
}


# Options of @app.task / @shared_task that are not attributes of celery.Task.
_DECORATOR_OPTIONS = frozenset(
    {
        "name",
        "base",
        "bind",
        "shared",
        "lazy",
        "filter",
        "app",
        "autoretry_for",
        "dont_autoretry_for",
        "retry_kwargs",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "pydantic",
        "pydantic_strict",
        "pydantic_context",
        "pydantic_dump_kwargs",
        "queue",
        "routing_key",
        "exchange",
        "exchange_type",
        "compression",
        "delivery_mode",
        "store_eager_result",
    }
)


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
        return Fleet.for_app(self._get_app())

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
        self._drop_needless_backup()  # the broker's backup of a copy Redis published
        run = self._new_run()
        if self.fleet_key is not None:
            # from the arguments, so a rescheduled copy keeps it
            run.key = self._fleet_key_of(args, kwargs)
        token = current_run.set(run)
        try:
            while True:
                try:
                    return self._keyed_body(args, kwargs)
                except ThrottledTooLong:
                    raise
                except Backpressure as exc:
                    self._on_backpressure(exc, run)  # raises, or returns after waiting (eager)
        finally:
            current_run.reset(token)

    def _fleet_key_of(self, args: Any, kwargs: Any) -> str | None:
        """The ``key`` option applied to a call's arguments, checked (and checked against
        the task's limit, which must have keys)."""
        key = idempotency.key_of(self.fleet_key, self.run, args, kwargs, "key", check_key)
        if key is not None and self.fleet_limit is not None:
            fleet = self.fleet
            fleet.admission.keyed.hash_of(fleet.admission.limit(self.fleet_limit), key)
        return key

    def _keyed_body(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The body under the message's idempotency key, when it has one: run once, its
        outcome recorded; a key that already succeeded returns the stored result."""
        attempt = idempotency.claim_for(self, args, kwargs)  # may raise KeyBusy
        if attempt is None:
            return self._admitted_body(args, kwargs)
        if isinstance(attempt, idempotency.Replay):
            return attempt.result
        tokens = idempotency.current_key.set(attempt.key), idempotency.current_attempt.set(attempt)
        try:
            result = self._admitted_body(args, kwargs)
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

    def _admitted_body(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.fleet_limit is None:
            return self._run_body(args, kwargs)
        lane = lane_of(self.fleet_lane, self.run, args, kwargs)
        with self.fleet.slot(self.fleet_limit, tokens=self.fleet_tokens, lane=lane):
            return self._run_body(args, kwargs)

    def _new_run(self) -> Run:
        """The Run of this execution: the age and patience carried by the message."""
        past = self.throttling if self.request_stack.top is not None else Throttling()
        deadline = None
        if self.fleet_max_throttled is not None:
            left = max(0.0, self.fleet_max_throttled - past.throttled_s)
            deadline = self.fleet.clock.monotonic() + left
        return Run(
            max_wait_s=math.inf if self.fleet_on_limit == "wait" else self.fleet_max_wait,
            since_ms=past.since_ms,
            places=dict(past.places),
            wait_after_call=self.fleet_wait_after_call,
            deadline=deadline,
        )

    def _run_body(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            if self.request_stack.top is None:
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


def _known_options(base: type[Task]) -> frozenset[str]:
    attrs = {k for k in dir(base) if not k.startswith("_")}
    return frozenset(attrs | _DECORATOR_OPTIONS)


def _check_fleet_options(opts: dict[str, Any]) -> None:
    on_limit = opts.get("fleet_on_limit", "reschedule")
    if on_limit not in ON_LIMIT:
        raise ConfigError(f"on_limit must be one of {ON_LIMIT}, got {on_limit!r}")
    tokens = opts.get("fleet_tokens", 0)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ConfigError(f"tokens must be a non-negative int, got {tokens!r}")
    if tokens > MAX_UNITS:  # no bucket holds more: fail at decoration, not at publish
        raise ConfigError(f"tokens must be at most {MAX_UNITS}, got a {len(str(tokens))}-digit int")
    if opts.get("fleet_max_wait") is not None:
        check_max_wait(opts["fleet_max_wait"])
    if not isinstance(opts.get("fleet_wait_after_call", True), bool):
        raise ConfigError(
            f"wait_after_call must be True or False, got {opts['fleet_wait_after_call']!r}"
        )
    count = opts.get("fleet_max_reschedules")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ConfigError(f"max_reschedules must be a non-negative int or None, got {count!r}")
    if opts.get("fleet_max_throttled") is not None:
        number(opts["fleet_max_throttled"], "max_throttled", lo=0.0, hi=MAX_SECONDS)
    if "fleet_jitter" in opts:
        opts["fleet_jitter"] = number(opts["fleet_jitter"], "jitter", lo=0.0, hi=MAX_SECONDS)
    if "fleet_key" in opts:
        spec = idempotency.check_key_spec(opts["fleet_key"], "key")
        opts["fleet_key"] = staticmethod(spec) if callable(spec) else spec
    if "fleet_idempotency_key" in opts:
        spec = idempotency.check_key_spec(opts["fleet_idempotency_key"])
        # a class attribute: a plain function would come back bound to the task
        opts["fleet_idempotency_key"] = staticmethod(spec) if callable(spec) else spec
    for flag in ("fleet_singleton", "fleet_release_on_failure"):
        if not isinstance(opts.get(flag, True), bool):
            raise ConfigError(f"{flag.removeprefix('fleet_')} must be True or False")
    if opts.get("fleet_singleton") and not opts.get("fleet_idempotency_key"):
        raise ConfigError("singleton=True needs an idempotency_key: the key is the lock")
    limit = opts.get("fleet_limit")
    if limit is not None and not isinstance(limit, str):
        raise ConfigError(f"limit must be the name of a limit in fleet_limits, got {limit!r}")
    if opts.get("fleet_affinity") is not None:
        spec = affinity.check_affinity_spec(opts["fleet_affinity"])
        opts["fleet_affinity"] = staticmethod(spec) if callable(spec) else spec
    if opts.get("fleet_lane") is not None:
        spec = check_lane_spec(opts["fleet_lane"])
        if limit is None:
            raise ConfigError(f"lane={spec!r} needs a limit= (the limit whose lanes it names)")
        opts["fleet_lane"] = staticmethod(spec) if callable(spec) else spec


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
    fleet_opts = {attr: options.pop(opt) for opt, attr in _FLEET_OPTIONS.items() if opt in options}
    _check_fleet_options(fleet_opts)
    base = options.setdefault("base", FleetTask)
    if not (isinstance(base, type) and issubclass(base, FleetTask)):
        raise ConfigError(f"fleet_task(base=...) must be a subclass of FleetTask, got {base!r}")
    known = _known_options(base) - set(_FLEET_OPTIONS.values())
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"fleet_task got unknown option(s): {suggest(unknown, [*known, *_FLEET_OPTIONS])}"
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
