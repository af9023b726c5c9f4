"""``Fleet``: the one object a project creates, binding settings, Redis and admission.

Example::

    from celery import Celery
    from celery_fleet import Fleet

    app = Celery("proj", broker="redis://127.0.0.1:6379/0")
    app.conf.fleet_limits = {"openai": {"rpm": 500, "tpm": 200_000, "max_in_flight": 20}}
    fleet = Fleet(app)

    with fleet.slot("openai", tokens=2000) as slot:
        ...

``Fleet(app)`` reads the ``fleet_*`` settings from ``app.conf`` (see
:mod:`celery_fleet.settings`; keyword arguments override them), validates everything at
once, and connects the worker signals that keep Redis connections per process.
``Fleet(redis_url=..., limits=...)`` without an app works in any plain Python process.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .admission import adaptive, discover
from .admission.aslot import AsyncMethods
from .admission.backoff import decorrelated_jitter, full_jitter, spread
from .admission.breaker import Breaker
from .admission.config import LimitConfig
from .admission.core import Admission, Decision, Release
from .admission.guarded import Choice, Guard, guarded
from .admission.judging import (
    check_verdict,
    judge_answer,
    outcome_of,
    release_judged_steps,
    route_ask,
    sync_hook,
)
from .admission.lanes import check_lane
from .admission.run import Run, current_run
from .admission.slot import Clock, LeaseKeeper, Slot, SystemClock
from .checks import check_max_wait, number
from .coordination.election import DEFAULT_LEADER_LEASE_S, Callback, Leader
from .coordination.locks import DEFAULT_LOCK_TTL_S, Lock
from .coordination.records import DEFAULT_RECORD_MAX_BYTES, Record
from .distribution.ring import DistributionConfig
from .durability.deferred import Deferred
from .durability.ledger import ClaimKeeper, Ledger, record_id_for
from .durability.steps import Steps
from .errors import ConfigError, FleetError
from .observability.counters import Counters
from .observability.counters import watcher as counters_watcher
from .observability.tracing import admission_watcher
from .quality.breaker import QualityState
from .quality.judge import Verdict, ask_of
from .resilience.fallback import UNKNOWN_SHARE, StoreDown, check_store
from .resilience.presence import Presence
from .settings import DEFAULT_MAX_COUNTDOWN_S, DEFAULT_MAX_WAIT_S, load_settings
from .store.calls import drive
from .store.connect import ClientSource
from .store.sync import RedisStore

if TYPE_CHECKING:
    from celery import Celery

    from .contrib.pybreaker import FleetCircuitBreaker

__all__ = ["Fleet", "DEFAULT_MAX_WAIT_S", "DEFAULT_MAX_COUNTDOWN_S"]

log = logging.getLogger("celery_fleet")

_SETTLED_MEMORY = 10_000  # leases whose last settled figure Fleet.settle remembers

_all: weakref.WeakSet[Fleet] = weakref.WeakSet()


class Fleet(AsyncMethods):
    """Admission control for a Celery app (or a plain process), backed by one Redis.

    Args:
        app: the Celery app whose ``app.conf`` holds the ``fleet_*`` settings; optional.
        redis_url: overrides ``fleet_redis_url``.
        limits: overrides ``fleet_limits``.
        namespace: overrides ``fleet_namespace``.
        max_wait: overrides ``fleet_max_wait``.
        clock: local time source for waits (tests inject a fake one).
        store_down: overrides ``fleet_store_down``.
        redis_client: overrides ``fleet_redis_client``.
        redis_transport_options: overrides ``fleet_redis_transport_options``.

    A keyword that is not None wins over its setting in ``app.conf``; the mapping is
    :data:`celery_fleet.settings.KEYWORDS`, and the settings reference
    (``docs/settings.md``) says what each setting accepts and its default.
    """

    def __init__(
        self,
        app: Celery | None = None,
        *,
        redis_url: str | None = None,
        limits: Mapping[str, Any] | None = None,
        namespace: str | None = None,
        max_wait: float | None = None,
        clock: Clock | None = None,
        store_down: str | None = None,
        redis_client: ClientSource | None = None,
        redis_transport_options: Mapping[str, Any] | None = None,
    ) -> None:
        conf: Mapping[str, Any] = app.conf if app is not None else {}
        self.app = app
        settings = load_settings(
            conf,
            redis_url=redis_url,
            limits=limits,
            namespace=namespace,
            max_wait=max_wait,
            store_down=store_down,
            redis_client=redis_client,
            redis_transport_options=redis_transport_options,
        )
        self.redis_url = settings.redis_url
        self.namespace = settings.namespace
        self.limits: dict[str, LimitConfig] = settings.limits
        self.max_wait_s = settings.max_wait_s
        self.max_countdown_s = settings.max_countdown_s
        self.step_ttl_s = settings.step_ttl_s
        self.step_max_bytes = settings.step_max_bytes
        self.backoff = settings.backoff
        self.backoff_base_s = settings.backoff_base_s
        self.backoff_max_s = settings.backoff_max_s
        self.step_jitter_s = settings.step_jitter_s
        self.dedupe_ttl_s = settings.dedupe_ttl_s
        self.claim_lease_s = settings.claim_lease_s
        self.defer = settings.defer
        self.pump_period_s = settings.pump_period_s
        self.pump_lease_s = settings.pump_lease_s
        #: Who runs where: the affinity queues' mode, number, steal threshold and lease.
        self.distribution = DistributionConfig(
            settings.distribution,
            settings.affinity_queues,
            settings.steal_threshold,
            settings.affinity_lease_s,
            settings.namespace,
        )
        self._ledger: Ledger | None = None
        self._claims: ClaimKeeper | None = None
        self.clock: Clock = clock or SystemClock()
        if settings.redis_client is not None:
            self.store = RedisStore(
                client=settings.redis_client, health_s=settings.health_timeout_s
            )
        else:
            self.store = RedisStore(
                self.redis_url,
                transport_options=settings.redis_transport_options,
                password=settings.redis_password,
                health_s=settings.health_timeout_s,
            )
        #: This process's record among the live fleet processes (presence.py).
        self.presence = Presence(self.store, self.namespace)
        self.expected_processes = settings.expected_processes
        #: What admission does while Redis is unreachable (``fleet_store_down``).
        self.store_down = StoreDown(
            settings.store_down,
            self.limits,
            self.share_of_budgets,
            held=self._held_via_redis,
            restarted=self.presence.redis_restarted,
            rank=lambda: self.presence.rank,
        )
        self.admission = Admission(self.store, self.limits, self.namespace, self.store_down)
        # a limit changed at runtime: the store-down policy reads this dict too
        self.admission.reconfigured.append(self.limits.__setitem__)
        self.store_down.admission = self.admission
        self.keeper = LeaseKeeper(self.admission, clock=self.clock)
        self.presence.held = self.keeper.describe
        self.presence.on_answer = self.store_down.answered
        #: Rescheduled tasks waiting in Redis until due (deferred.py; see pump.py).
        self.deferred = Deferred(self.store, self.namespace, settings.defer_signing_key)
        #: Event counts for metrics, flushed to Redis in the background (counters.py).
        self.counters = Counters(self.store, self.namespace, self.presence)
        self.admission.watchers.append(counters_watcher(self.counters))
        # fleet.admission spans (OpenTelemetry, optional): no watcher at all without it
        tracer = admission_watcher(settings.trace_admissions)
        if tracer is not None:
            self.admission.watchers.append(tracer)
        self._settled: OrderedDict[str, int] = OrderedDict()
        self._closed = False
        _all.add(self)
        #: How many processes or threads of this worker share the budgets (0: not a
        #: worker); the Celery binding sets it, the store-down policy reads it.
        self.local_concurrency: Callable[[], int] = lambda: 0
        if app is not None:
            from .celery.app import bind  # the only way in to the Celery glue

            bind(self, app, url_given=redis_url is not None)

    # -- lookup -----------------------------------------------------------------------

    @classmethod
    def for_app(cls, app: Celery) -> Fleet:
        """The Fleet created for ``app``, or a new one built from ``app.conf``
        (see :func:`celery_fleet.celery.app.fleet_for`)."""
        from .celery.app import fleet_for

        return fleet_for(app)

    @classmethod
    def registered(cls, app: Celery) -> Fleet | None:
        """The Fleet created for ``app``, if any (never creates one)."""
        from .celery.app import registered

        return registered(app)

    @staticmethod
    def all() -> list[Fleet]:
        """Every live Fleet in this process (the worker signals reset them all)."""
        return list(_all)

    # -- admission --------------------------------------------------------------------

    def slot(
        self,
        name: str,
        tokens: int = 0,
        max_wait: float | None = None,
        validate: Callable[[Any], object] | None = None,
        jitter: float | None = None,
        *,
        lane: str | None = None,
        key: str | None = None,
    ) -> Slot:
        """A context manager holding one admission to limit ``name``.

        It asks Redis once; when refused it takes a place in the limit's line and waits
        for its turn (served oldest first, by the age of the current
        :class:`~celery_fleet.Run`), until ``max_wait`` seconds (default: the running
        task's setting, or all its patience once it made a call with ``wait_after_call``,
        else ``fleet_max_wait``), then leaves the line and raises
        :class:`~celery_fleet.Throttled`.
        ``tokens`` is the estimate reserved now; ``slot.settle(tokens=actual)`` corrects it.
        ``validate`` overrides the limit's output hook for ``slot.validate(result)``.
        Leaving the block with a provider 429 or overload raises ``Throttled`` (and pauses
        the limit fleet-wide for the provider's Retry-After); an exhausted quota raises
        ``QuotaExhausted``; a refusal by an open breaker raises ``CircuitOpen``.
        ``jitter`` (default ``fleet_step_jitter``, 0) sleeps a random ``[0, jitter)``
        seconds before the first ask, so agents that finished a step together do not all
        ask for the next one in the same millisecond (``slot.next()`` does not: it
        continues at once).
        ``lane`` names one of the limit's priority lanes (default: its lowest; see
        :mod:`~celery_fleet.admission.lanes`): a lane is served before the lanes below it
        and may use the part of every budget they may not.
        ``key`` (a limit with ``"keys"`` or ``"weights"``): the caller's key, e.g. a
        tenant id: its own sub-limit is checked in the same round trip, and waiting
        callers are served fairly between keys (docs/limits.md, "Keys (tenants)").
        Arguments are validated here, before any Redis call.

        Example::

            with fleet.slot("openai", tokens=900, lane="interactive") as slot:
                ...
        """
        if self._closed:
            raise FleetError(f"{self!r} is closed: make a new Fleet")
        cfg = self.admission.limit(name)
        tokens = cfg.check_tokens(tokens)
        run = current_run.get()
        if key is None and run is not None and run.key is not None and cfg.keyed:
            key = run.key  # a keyed task's slots (@fleet_task(key=...))
        if key is not None:
            self.admission.keyed.hash_of(cfg, key)  # a bad key fails here
        if max_wait is None and run is not None:
            max_wait = run.slot_max_wait(self.clock.monotonic())
        wait_s = self.max_wait_s if max_wait is None else check_max_wait(max_wait)
        if validate is not None and not callable(validate):
            raise ConfigError(f"validate must be a callable result -> bool, got {validate!r}")
        jitter_s = self.step_jitter_s if jitter is None else number(jitter, "jitter", lo=0, hi=60)
        return Slot(
            self.admission,
            self.keeper,
            name,
            tokens,
            wait_s,
            self.clock,
            validate=validate,
            run=run if run is not None else Run(),
            jitter_s=jitter_s,
            lane=lane,
            key=key,
        )

    def guarded(
        self,
        name: str,
        *,
        tokens: int | Callable[..., int] = 0,
        max_wait: float | None = None,
        validate: Callable[[Any], object] | None = None,
        usage: Callable[[Any], int] | None = None,
        key: Choice = None,
        lane: Choice = None,
    ) -> Guard:
        """A decorator running each call of a plain function in ``slot(name, ...)``: a
        bulkhead for a tool. ``tokens``, ``key`` and ``lane`` are each fixed or a callable
        of the function's arguments; ``usage(result)`` settles the reservation (see
        :func:`celery_fleet.admission.guarded.guarded`). Arguments are checked here.

        Example::

            @fleet.guarded("search-api", max_wait=5)
            def search(query): ...

            @fleet.guarded("openai", key=lambda tenant, prompt: tenant, lane="batch")
            def summarize(tenant, prompt): ...
        """
        return guarded(
            self,
            name,
            tokens=tokens,
            max_wait=max_wait,
            validate=validate,
            usage=usage,
            key=key,
            lane=lane,
        )

    # -- idempotency ------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The idempotency ledger (records kept ``fleet_dedupe_ttl`` seconds)."""
        if self._ledger is None:
            self._ledger = Ledger(self.store, self.namespace, self.dedupe_ttl_s)
        return self._ledger

    @property
    def claims(self) -> ClaimKeeper:
        """The thread renewing this process's ledger claims (``fleet_claim_lease``)."""
        if self._claims is None:
            self._claims = ClaimKeeper(self.ledger, self.claim_lease_s)
        return self._claims

    def history(self, key: str) -> list[dict[str, str]]:
        """Every recorded event of idempotency key ``key``, oldest first: queued (with the
        run's ``run_id``; ``lapsed`` when it replaced a publish never confirmed or a claim
        whose worker died), publish_failed (the broker refused it: the key is free),
        running, taken_over, succeeded, failed, released, worker_lost (its pool child died),
        queued again (a retry or reschedule)."""
        return self.ledger.history(record_id_for(key))

    def key_record(self, key: str) -> dict[str, str]:
        """The ledger record of ``key``: state, attempts, owner, times, result or error."""
        return self.ledger.record(record_id_for(key))

    def stagger(self, signatures: Iterable[Any], over: float, *, seed: int | None = None) -> Any:
        """Publish ``signatures`` with countdowns spread evenly over ``over`` seconds and
        return their :class:`celery.result.GroupResult` (see :func:`celery_fleet.celery.stagger.
        stagger`): a fan-out that reaches the workers at a steady rate, not as a herd."""
        from .celery.app import stagger

        return stagger(signatures, over, seed=seed, app=self.app)

    def reschedule_countdown(
        self, wait_s: float, reschedules: int, previous_s: float = 0.0, guess: bool = False
    ) -> float:
        """The countdown of a task rescheduled for the ``reschedules``-th time (from 0) after
        a refusal that said ``wait_s``; never below the wait (nothing passes sooner), never
        above ``fleet_max_countdown``.

        ``guess=False`` (a rate, in-flight or line refusal: the limiter's own estimate):
        the wait plus a forward spread that doubles with the count, 20% of the wait at the
        first reschedule, at most 100% from the third. Growing past that only idles the
        budget while sleepers are all that is left to serve (goodput benchmark, max_wait
        0: makespan 0.93x -> 2.05x of ideal with a fixed-base backoff).
        ``guess=True`` (an open breaker's reset, another attempt's claim: nothing tells when
        it ends): capped exponential backoff with jitter over the count (``fleet_backoff``:
        full or decorrelated, from ``fleet_backoff_base`` up to ``fleet_backoff_max``).
        """
        wait_s = number(wait_s, "reschedule_countdown(wait_s=...)", lo=0.0)
        previous_s = number(previous_s, "reschedule_countdown(previous_s=...)", lo=0.0)
        if isinstance(reschedules, bool) or not isinstance(reschedules, int) or reschedules < 0:
            raise ConfigError(
                f"reschedule_countdown(reschedules=...) must be an int >= 0, got {reschedules!r}"
            )
        if not isinstance(guess, bool):
            raise ConfigError(f"reschedule_countdown(guess=...) must be a bool, got {guess!r}")
        n = min(reschedules, 30)
        if not guess:
            fraction = min(1.0, 0.2 * 2.0**n)
            return min(spread(wait_s, fraction=fraction, floor_s=0.05), self.max_countdown_s)
        base, most = self.backoff_base_s, self.backoff_max_s
        if self.backoff == "decorrelated":
            grown = decorrelated_jitter(previous_s, base, most)
        else:
            grown = full_jitter(n, base, most)
        return min(max(spread(wait_s, fraction=0.2, floor_s=0.05), grown), self.max_countdown_s)

    def steps(self, run_id: str) -> Steps:
        """The durable steps of run ``run_id`` (a task id): ``fleet.steps(id).run(name, fn)``
        calls ``fn`` once per run id and returns the stored result on every later call."""
        return Steps(self.store, self.namespace, run_id, self.step_ttl_s, self.step_max_bytes)

    def line(self, name: str) -> list[tuple[str, float]]:
        """Who waits for limit ``name``, oldest first: ``(ticket, first-asked ms)`` pairs."""
        return self.admission.line(name)

    def try_acquire(
        self, name: str, tokens: int = 0, *, key: str | None = None, lane: str | None = None
    ) -> Decision:
        """Ask once without waiting. An admitted decision's lease must be given back with
        :meth:`release` (it is not renewed: it expires after the limit's ``lease`` TTL).
        ``key`` and ``lane``: as in :meth:`slot`.

        While the limit's quality breaker is open, ``on_degraded="pause"`` refuses
        (``reason="quality_degraded"``, ``wait_ms`` until it half-opens) and
        ``"fallback:<limit>"`` asks the other limit: ``decision.limit`` names it."""
        if self._closed:
            raise FleetError(f"{self!r} is closed: make a new Fleet")
        routed = route_ask(self.admission, name, tokens, key, lane)
        if isinstance(routed, Decision):
            return routed
        name, tokens, key, lane = routed
        return self.admission.try_acquire(name, tokens, key=key, lane=lane)

    def release(
        self, decision: Decision, outcome: str = "ok", *, verdict: Verdict | None = None
    ) -> Release:
        """Release the lease of an admitted :meth:`try_acquire` decision, saying how the call
        went (``ok``, ``fail``, ``overload``, ``congestion``, ``rate``, ``neutral``).

        ``verdict`` (from :meth:`judge`) is counted by the limit's quality breaker in the
        release's own round trip, as ``slot.judge`` is; a verdict whose ``validate``
        rejected the answer turns ``ok`` into ``fail`` for the availability breaker.

        Example::

            decision = fleet.try_acquire("openai", tokens=1500)
            if decision.allowed:
                resp = client.chat.completions.create(**body)
                fleet.release(decision, verdict=fleet.judge("openai", resp, request=body))
        """
        lease = _check_decision(decision, "release")
        checked = check_verdict(verdict)
        if checked is None:
            return self.admission.release(decision.limit, lease, outcome)
        steps = release_judged_steps(
            self.admission, decision.limit, lease, outcome_of(outcome, checked), checked
        )
        return drive(steps, self.store)

    def judge(
        self,
        name: str,
        resp: Any,
        *,
        max_tokens: int | None = None,
        json: bool = False,
        response_format: Any = None,
        schema: Any = None,
        request: Any = None,
        validate: Callable[[Any], object] | None = None,
    ) -> Verdict:
        """Judge a call's answer for garbage with limit ``name``'s detectors, without a slot:
        :meth:`Slot.judge <celery_fleet.admission.slot.Slot.judge>` for :meth:`try_acquire`
        callers. Pass the verdict to :meth:`release` to have it counted (nothing is sent
        here). ``validate`` defaults to the limit's hook (a coroutine function's is
        awaited by :meth:`ajudge`). Never raises for the answer; an unknown limit is a
        ``ConfigError``."""
        cfg = self.admission.limit(name)
        ask = ask_of(max_tokens, json, response_format, schema, request)
        hook = cfg.validate if validate is None else validate
        return judge_answer(self.admission, name, resp, ask, sync_hook(hook))

    def breaker(self, name: str) -> Breaker:
        """The fleet-wide circuit breaker of limit ``name``: state and manual overrides."""
        return Breaker(self.admission, name)

    def circuit_breaker(
        self,
        name: str | None = None,
        /,
        *,
        exclude: Iterable[type[BaseException] | Callable[[Any], bool]] | None = None,
        listeners: Iterable[Any] | None = None,
        throw_new_error_on_trip: bool = True,
        tokens: int = 0,
        max_wait: float | None = None,
        **pybreaker_options: Any,
    ) -> FleetCircuitBreaker:
        """A ``pybreaker.CircuitBreaker`` whose state is the fleet-wide breaker of limit
        ``name`` (see :mod:`celery_fleet.contrib.pybreaker`; needs the ``[pybreaker]`` extra).

        Example::

            breaker = fleet.circuit_breaker("search-api", exclude=[NotFound])

            @breaker
            def search(query): ...
        """
        from .contrib.pybreaker import FleetCircuitBreaker

        # ``name`` is positional-only so that ``circuit_breaker("x", name="x")`` reaches the
        # option check (a ConfigError) instead of Python's TypeError; ``name=`` still works.
        if name is None and "name" in pybreaker_options:
            name = pybreaker_options.pop("name")
        if name is None:
            raise ConfigError("circuit_breaker() needs the name of a limit with a breaker")
        return FleetCircuitBreaker(
            self,
            name,
            exclude=exclude,
            listeners=list(listeners or []),
            throw_new_error_on_trip=throw_new_error_on_trip,
            tokens=tokens,
            max_wait=max_wait,
            **pybreaker_options,
        )

    def wrap(
        self,
        client: Any,
        limit: str,
        *,
        max_wait: float | None = None,
        tokens: int | Callable[[Mapping[str, Any]], int] | None = None,
        max_retries: int | None = 0,
    ) -> Any:
        """An ``openai``/``anthropic`` client (sync or async) whose model calls each hold a
        slot of ``limit``: tokens estimated from the call, rate-limit headers observed,
        usage settled, a 429 or 529 raised as :class:`~celery_fleet.Throttled`; everything
        else passes through (see :mod:`celery_fleet.contrib.sdk`).

        Example::

            client = fleet.wrap(anthropic.Anthropic(), limit="claude")
            client.messages.create(model="claude-sonnet-4-5", max_tokens=500, messages=[...])
        """
        from .contrib.sdk import wrap

        return wrap(self, client, limit, max_wait=max_wait, tokens=tokens, max_retries=max_retries)

    def quality(self, name: str) -> QualityState:
        """The fleet-wide quality breaker of limit ``name`` (one round trip): ``state``
        ("closed", "open", "half_open"), ``garbage_rate`` over its window, the rolling
        ``baseline`` and the top ``reasons`` (docs/quality.md).

        Example::

            q = fleet.quality("openai")
            if q.state == "open":
                print(q.garbage_rate, q.baseline, q.reasons)
        """
        self.admission.limit(name)  # an unknown limit fails here, naming it
        if self.admission.quality.config(name) is None:
            raise ConfigError(
                f"limit {name!r} has no quality breaker (set fleet_limits[{name!r}]['quality'])"
            )
        return self.admission.quality.state(name)

    def on_quality_change(
        self, listener: Callable[[str, str, dict[str, Any]], None]
    ) -> Callable[[str, str, dict[str, Any]], None]:
        """Call ``listener(limit, transition, fields)`` when this process sees a quality
        breaker change (``"open"``, ``"half_open"``, ``"closed"``; ``fields`` as
        :meth:`QualityState.as_dict`); returns it, so it can decorate."""
        if not callable(listener):
            raise ConfigError(f"on_quality_change needs a callable, got {listener!r}")
        self.admission.quality.listeners.append(listener)
        return listener

    def on_breaker_change(self, listener: Callable[[str, str], None]) -> Callable[[str, str], None]:
        """Call ``listener(limit, state)`` when this process changes a breaker's state
        (``"open"``, ``"half_open"``, ``"closed"``). Usable as a decorator."""
        if not callable(listener):
            raise ConfigError(f"on_breaker_change needs a callable, got {listener!r}")
        self.admission.listeners.append(listener)
        return listener

    def set_limit(self, name: str, **fields: Any) -> int:
        """Change limit ``name`` fleet-wide, without a restart: every process applies it
        within a second (this one at once). Returns the change's version.

        ``fields`` are any of ``rpm``, ``tpm``, ``rate``, ``requests``, ``tokens``,
        ``max_in_flight``, ``headroom``, ``burst``, with the meaning and checks they have
        in ``fleet_limits`` (a bad value is a :class:`~celery_fleet.ConfigError` and
        changes nothing); ``None`` removes a budget or the cap. They add to what an earlier
        ``set_limit`` set; :meth:`reset_limit` goes back to the configured values. Narrowing
        ``max_in_flight`` revokes no held slot: nobody new is admitted until fewer are held.
        See ``docs/limits.md``, "Changing limits at runtime".

        Example::

            fleet.set_limit("openai", rpm=900, max_in_flight=16)
        """
        return self.admission.runtime.set(name, fields)

    def reset_limit(self, name: str) -> int:
        """Remove what :meth:`set_limit` changed of limit ``name``, fleet-wide: the values of
        ``fleet_limits`` again, in every process within a second. Returns the version."""
        return self.admission.runtime.reset(name)

    def reset_adaptive(self, name: str) -> None:
        """Forget what the fleet learned about limit ``name``: adaptive cap, rate factor,
        ceiling, the provider's header factor and any Retry-After pause."""
        adaptive.reset_control(self.admission, name)

    def adaptive_state(self, name: str) -> dict[str, float]:
        """The fleet-wide control state of limit ``name``: the adaptive ``cap`` and
        ``rate_factor``, ``pause_until`` (ms), ``ceiling``, ``hold_ms``..."""
        return adaptive.control_state(self.admission, name)

    def discovered(self, name: str) -> dict[str, Any] | None:
        """What limit ``name`` has discovered above its declared rate, fleet-wide (None
        without ``"discover"``): the learned ``factor``, the ``ceiling`` a 429 last came at,
        the headers' ``provider_factor``, per window the declared and effective budget."""
        return discover.discover_state(self.admission, name)

    def reset_buckets(self, name: str) -> None:
        """Refill every request and token window of limit ``name`` fleet-wide (operators:
        after a bad ``settle``, or when the provider's quota was reset early)."""
        self.admission.reset_buckets(name)

    def settle(self, decision: Decision, tokens: int) -> int:
        """Settle an admitted :meth:`try_acquire` decision to the actual token usage.

        Settling again with the same figure changes nothing, also after release (this
        process remembers the last figure it settled each recent lease to).
        """
        lease = _check_decision(decision, "settle")
        reserved = self._settled.pop(lease, decision.tokens)
        delta = self.admission.settle(decision.limit, lease, tokens, reserved)
        self._settled[lease] = tokens
        while len(self._settled) > _SETTLED_MEMORY:
            self._settled.popitem(last=False)
        return delta

    def _held_via_redis(self, limit: str) -> int:
        """Slots of ``limit`` this process holds through Redis (the local limiter counts them)."""
        owns = self.store_down.owns
        return sum(1 for s in self.keeper.held() if s.limit == limit and not owns(s.lease_id))

    def share_of_budgets(self) -> int:
        """How many processes share the budgets while Redis is unreachable:
        ``fleet_expected_processes``, else the live count this process last read, else a
        conservative guess, :data:`~celery_fleet.resilience.fallback.UNKNOWN_SHARE` or the worker's
        pool concurrency if larger (logged: never a whole budget per process)."""
        if self.expected_processes is not None:
            return self.expected_processes
        if self.presence.last_count is not None:
            return self.presence.last_count
        share = max(UNKNOWN_SHARE, self.local_concurrency())
        log.warning(
            "celery-fleet: no count of live fleet processes yet; the local limiter takes "
            "1/%d of each budget in this process. Set fleet_expected_processes.",
            share,
        )
        return share

    def check(self, timeout: float = 2.0) -> dict[str, Any]:
        """Check the fleet's Redis now: it answers, and takes the fleet's scripts.

        Returns a small report (``url`` with the password masked, ``redis_version``,
        ``ping_ms``, ``scripts`` loaded, ``namespace``, ``store_down``); raises
        :class:`~celery_fleet.StoreUnavailable` naming the URL when Redis does not answer
        within ``timeout`` seconds, :class:`~celery_fleet.ConfigError` when it answers but
        refuses the scripts (ACL, scripting disabled). Run it once at deploy time: a wrong
        ``fleet_redis_url`` otherwise only shows as admission by the store-down policy.

        Example::

            fleet.check()  # {'url': 'redis://:***@redis:6379/1', 'ping_ms': 0.4, ...}
        """
        report = check_store(self.store.target, self.store.safe_url, number(timeout, "timeout"))
        return {**report, "namespace": self.namespace, "store_down": self.store_down.policy}

    def check_at_start(self) -> None:
        """At worker start: log an error naming the URL if the fleet's Redis does not answer
        (the worker still starts; admission follows ``fleet_store_down``)."""
        try:
            self.check(timeout=1.0)
        except FleetError as exc:
            log.error(
                "celery-fleet: at worker start, %s -- check fleet_redis_url (fleet.check() "
                "tells); until it answers, admission follows fleet_store_down=%r",
                str(exc).rstrip("."),
                self.store_down.policy,
            )

    def check_task_options(
        self, task_name: str, limit: str | None, tokens: int, *, lane: str | None = None
    ) -> None:
        """Validate a task's ``limit``/``tokens``/``lane`` against this fleet's limits."""
        if limit is None:
            if tokens:
                raise ConfigError(f"task {task_name!r}: tokens={tokens} needs a limit=")
            return
        try:
            cfg = self.admission.limit(limit)
            cfg.check_tokens(tokens)
            check_lane(cfg.lanes, limit, lane)
        except ConfigError as exc:
            raise ConfigError(f"task {task_name!r}: {exc}") from None

    # -- coordination -----------------------------------------------------------------

    def lock(self, name: str, ttl: float = DEFAULT_LOCK_TTL_S) -> Lock:
        """A lease lock on ``name`` shared by every process on this fleet's Redis, renewed
        while held, with a fencing token per acquisition (see
        :class:`~celery_fleet.coordination.locks.Lock`):
        ``with fleet.lock("reindex", ttl=30) as lock: write(fence=lock.token)``."""
        return Lock(self.store, self.namespace, name, ttl, clock=self.clock)

    def leader(
        self,
        name: str,
        lease: float = DEFAULT_LEADER_LEASE_S,
        on_elected: Callback | None = None,
        on_lost: Callback | None = None,
    ) -> Leader:
        """A candidate in the leader election of ``name`` (not started: ``start()`` it, or
        use it as a context manager); see :class:`~celery_fleet.coordination.election.Leader`."""
        return Leader(
            self.store, self.namespace, name, lease, on_elected, on_lost, clock=self.clock
        )

    def record(
        self, name: str, ttl: float | None = None, max_bytes: int = DEFAULT_RECORD_MAX_BYTES
    ) -> Record:
        """The versioned record ``name``: ``get()`` -> ``(value, version)``,
        ``compare_and_set(version, value)`` (see
        :class:`~celery_fleet.coordination.records.Record`)."""
        return Record(self.store, self.namespace, name, ttl, max_bytes)

    def close(self) -> None:
        """Let this fleet go in this process: write the releases it still holds for its
        next call (and read their replies), flush its event counts, stop its background
        threads (lease keeper, runtime-limit poll, counters, ledger claims) and close its
        Redis connections. Idempotent; ``with Fleet(...) as fleet:`` calls it on leaving.

        Slots still held are not released: stop renewing them and their leases expire
        (release them first). A closed fleet refuses new slots and asks
        (:class:`~celery_fleet.FleetError`). Needed by a process that makes fleets and
        goes on (tests, notebooks, a web app's reload): one that exits writes what it
        holds anyway (``atexit``)."""
        if self._closed:
            return
        self._closed = True
        # One health deadline for all of it: on a frozen Redis the releases, the counts
        # and the threads blocked on it do not each wait their own.
        until = time.monotonic() + self.store.health_s
        with self.store.deadline(self.store.health_s):
            try:
                self.store.drain()
                self.counters.flush()  # counts are best effort: kept when Redis is away
            except FleetError as exc:
                log.warning("celery-fleet: closing %r: releases not written (%s)", self, exc)
        self.admission.runtime.stop()
        loops = [
            getattr(part, "_background", None)
            for part in (self.keeper, self.counters, self._claims, self._ledger)
        ]
        for loop in loops:
            if loop is not None:
                loop.stop()
        for loop in loops:
            if loop is not None:
                loop.stop(join_s=max(0.05, min(1.0, until - time.monotonic())))
        self.store.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset_connections(self) -> None:
        """Drop this process's Redis client (after a fork); the next call makes a new one."""
        self.store.reset()

    def __repr__(self) -> str:
        return f"<Fleet {self.store.safe_url} ns={self.namespace!r} limits={sorted(self.limits)}>"


def _check_decision(decision: object, what: str) -> str:
    """The lease id of an admitted :class:`Decision`; anything else is refused."""
    if not isinstance(decision, Decision):
        raise ConfigError(
            f"{what}() needs the Decision fleet.try_acquire() returned, got "
            f"{type(decision).__name__}"
        )
    if not decision.allowed or decision.lease_id is None:
        raise ConfigError(f"{what}() needs an admitted decision (it holds no lease)")
    return decision.lease_id


FOREVER = math.inf
"""Pass as ``max_wait`` to wait for admission without a deadline."""
