"""When the fleet's Redis does not answer: the store-down policy and the local limiter.

A limiter that blocks the whole fleet when its store is away is worse than the herd it
prevents. :class:`StoreDown` decides, per process, what an admission does while the
fleet's Redis is unreachable (``fleet_store_down``):

``"local"`` (default)
    Keep admitting through a per-process :class:`LocalLimiter` sized to this process's
    fair share of every budget: each window's rate divided by the number of fleet
    processes (``fleet_expected_processes``, else the number of live fleet processes the
    fleet last recorded in Redis, see :mod:`celery_fleet.resilience.presence`, else
    :data:`UNKNOWN_SHARE`: a Redis that never answered is more likely a wrong URL than an
    outage, and a whole budget per process is the worst guess). Its buckets start empty,
    each at a random point of its first interval: a burst the shared bucket may already
    have spent is not granted again, and the processes, which all lose Redis at the same
    moment, do not ask in step. The in-flight cap is this process's *allotment*: the slots
    it held through Redis when the outage began (at least the one its last ask was given)
    plus its share of the slots the fleet left free, from the fleet-wide count the last
    reply of Redis carried (the others' slots are still held, and nobody can see them go).
    Without such a count from the last minute it is its share of the cap, at least one.
``"open"``
    Admit everything: the dependency's own limits are the only ones left.
``"closed"``
    Refuse with reason ``"store_down"``: backpressure, so a task reschedules with backoff.

The first failure of an outage is logged once (a warning naming the policy and the share;
an error naming the URL when Redis never answered this process); during the outage the
store is asked again at most every :data:`RETRY_S` seconds (one caller at a time asks, the
others use the policy meanwhile, so a frozen Redis does not cost every call a socket
timeout). The outage ends with a *hand-over*: the first process Redis answers again sets
a moment :data:`HANDOVER_S` ahead in Redis (``handover.lua``) and every process that
finds Redis back leaves its local limiter at that moment, not before, charging the shared
buckets with what it admitted locally that they still remember (``charge.lua``). So
processes back on Redis never admit at the whole budget next to processes still at their
local share, and the calls of the outage's last seconds are not granted again.

Leases the local limiter (or ``"open"``) hands out are named ``local.<id>`` / ``open.<id>``
and never reach Redis: their release, settle and renewal are local.

This module knows nothing about Celery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import redis

from ..admission.config import LimitConfig
from ..admission.decision import Decision, LimitKeys
from ..errors import ConfigError, FleetError, StoreUnavailable
from ..logfields import log_fields
from ..store.calls import Steps, drive
from ..store.connect import Target, make_client
from ..store.specs import CHARGE, HANDOVER
from ..store.sync import SCRIPTS, script_source
from .local_limiter import LocalLimiter, allotment, fleet_cap

__all__ = [
    "StoreDown",
    "LocalLimiter",
    "POLICIES",
    "RETRY_S",
    "HANDOVER_S",
    "UNKNOWN_SHARE",
    "is_local_lease",
    "handover_key",
    "check_store",
]

log = logging.getLogger("celery_fleet")

#: What an admission does while the fleet's Redis is unreachable (``fleet_store_down``).
POLICIES = ("local", "open", "closed")
#: During an outage the store is asked again at most this often (seconds).
RETRY_S = 1.0
#: The wait a ``"closed"`` refusal reports (ms): a guess, so a task backs off with jitter.
CLOSED_WAIT_MS = 1000
#: Prefixes of leases that live only in this process.
LOCAL_PREFIXES = ("local.", "open.")
#: After an outage, the fleet leaves its local limiters this long after the first process
#: found Redis back (s): every process that asks at least once a :data:`RETRY_S` has
#: found it too by then, so they all switch at one moment.
HANDOVER_S = 2.0
#: How long the hand-over moment is kept in Redis (s): a process back later switches at once.
HANDOVER_KEEP_S = 60.0
#: The share of each budget a process takes while Redis is away and no process count is
#: known (it never answered, ``fleet_expected_processes`` unset): 1/8 of every rate and of
#: the in-flight cap (at least one), or 1/(pool concurrency) when that is larger.
UNKNOWN_SHARE = 8
#: A fleet-wide in-flight count older than this (s) is not used for the local allotment.
FLEET_COUNT_FRESH_S = 60.0
#: A reply Redis made before the one kept is dropped for at most this long (s): see
#: :meth:`StoreDown.saw`.
SEEN_ORDER_S = 1.0


def handover_key(namespace: str) -> str:
    """The key holding the moment the fleet leaves its local limiters after an outage."""
    return f"{{{namespace}:_procs}}:handover"


class _Store(Protocol):
    """What the hand-over sends (:class:`~celery_fleet.store.sync.RedisStore`): its
    operations' scripts and packed commands, and a plain ``ZREM``."""

    def call(self, command: str, *args: Any) -> Any: ...

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any: ...

    def send(self, *commands: tuple[str, bytes]) -> list[Any]: ...


class _Admission(Protocol):
    """What the hand-over needs of :class:`~celery_fleet.admission.core.Admission`."""

    namespace: str

    @property
    def store(self) -> _Store: ...

    def keys(self, name: str) -> LimitKeys: ...

    def empty_missing_steps(self) -> Steps[int]: ...


def is_local_lease(lease_id: object) -> bool:
    """True for a lease the store-down policy handed out (it never reached Redis)."""
    return isinstance(lease_id, str) and lease_id.startswith(LOCAL_PREFIXES)


def check_policy(policy: object, setting: str = "fleet_store_down") -> str:
    """``policy`` if it is one of :data:`POLICIES`, else :class:`ConfigError`."""
    if policy not in POLICIES:
        raise ConfigError(f"{setting} must be one of {POLICIES}, got {policy!r}")
    return str(policy)


def check_store(target: Target, safe_url: str, timeout_s: float) -> dict[str, Any]:
    """Ask the fleet's Redis once, on a client of its own with ``timeout_s`` deadlines:
    PING, the server's version, and a ``SCRIPT LOAD`` of every fleet script.

    Raises :class:`StoreUnavailable` when it does not answer, :class:`ConfigError` when it
    answers but refuses the scripts (an ACL without ``EVALSHA``/``SCRIPT``, scripting
    disabled, a proxy that does not pass them); both name ``safe_url``, never a password.
    """
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    client = None
    try:
        client = make_client(target, **options)
        started = time.monotonic()
        client.ping()
        ping_ms = (time.monotonic() - started) * 1000.0
        try:
            info: Any = client.info("server")
        except redis.ResponseError:  # INFO denied by an ACL: the version is a nicety
            info = {}
        for name in SCRIPTS:
            client.script_load(script_source(name))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        why = f"{type(exc).__name__}: {exc}".replace(target.url, safe_url)
        raise StoreUnavailable(safe_url, why) from None
    except redis.RedisError as exc:
        why = str(exc).replace(target.url, safe_url)
        raise ConfigError(
            f"the fleet's Redis at {safe_url} answers but refuses celery-fleet's scripts "
            f"({type(exc).__name__}: {why}); it needs EVALSHA and SCRIPT LOAD"
        ) from None
    finally:
        if client is not None and client is not target.source:
            client.close()
    version = info.get("redis_version") if isinstance(info, dict) else None
    return {
        "url": safe_url,
        "redis_version": version,
        "ping_ms": round(ping_ms, 2),
        "scripts": len(SCRIPTS),
    }


class StoreDown:
    """This process's view of the fleet's Redis, and what admission does without it: the
    :class:`~celery_fleet.resilience.strategy.StoreStrategy` of a fleet with a
    ``fleet_store_down`` policy (Redis while it answers, the policy from its first failure
    until the hand-over).

    ``share`` returns how many processes share the budgets now (called once per outage).
    """

    #: An unanswered call falls back on the policy (see :meth:`cover`).
    fallback = True

    def __init__(
        self,
        policy: str,
        limits: Mapping[str, LimitConfig],
        share: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
        held: Callable[[str], int] | None = None,
        restarted: Callable[[], bool] | None = None,
        rank: Callable[[], int | None] | None = None,
    ) -> None:
        self.policy = check_policy(policy)
        #: This process's rank among the live ones (who gets the free slots' remainder).
        self.rank = rank
        self.limits = limits
        self.share = share
        #: How many slots of a limit this process holds through Redis (they count locally).
        self.held = held
        #: Whether Redis restarted during the outage (then its lost windows start empty).
        self.restarted = restarted
        self.clock = clock
        self.local = LocalLimiter(limits, 1)
        self._lock = threading.Lock()
        #: Monotonic time the current outage began (None: Redis answers).
        self.down_since: float | None = None
        self._retry_at = 0.0
        #: Monotonic time this process leaves its local limiter (None: Redis not back yet).
        self._switch_at: float | None = None
        self._switching = False
        self._reachable = False  # Redis answered since the outage's last failure
        #: Outages this process has seen (a counter for metrics and tests).
        self.outages = 0
        #: Whether Redis ever answered this process (a never-answering one is logged as an
        #: error: more likely a wrong ``fleet_redis_url`` than an outage).
        self.ever_answered = False
        # local lease -> (leases key, the lease entered for it in Redis at the hand-over)
        #: Local lease -> the Redis lease entered for it at the hand-over (None: being
        #: entered now, by the switch or the moment's timer: never both).
        self._entered: dict[str, tuple[str, str] | None] = {}
        self._store: _Store | None = None
        #: The admission whose asks this policy answers (set by Fleet, or the first ask):
        #: answered() looks for the hand-over through it.
        self.admission: _Admission | None = None
        # limit -> (fleet-wide in-flight count in the latest reply, monotonic time of it,
        # whether that reply admitted this process, Redis's time of it in ms)
        self._seen: dict[str, tuple[int, float, bool, float]] = {}
        self._seen_lock = threading.Lock()

    @property
    def down(self) -> bool:
        """True while admission follows the policy: Redis is away, or back but the fleet
        has not handed over yet."""
        return self.down_since is not None

    @property
    def unreachable(self) -> bool:
        """True while Redis is away and not yet found back (a release is then dropped;
        during the hand-over wait it goes to Redis)."""
        return self.down_since is not None and not self._reachable

    #: True for a lease this policy handed out (``local.<id>``, ``open.<id>``); the
    #: function itself, so asking costs the hot path no more than it did before.
    owns = staticmethod(is_local_lease)

    def cover(self, error: Exception) -> None:
        """A call its caller needs went unanswered: the outage starts (or goes on), and the
        caller answers by the policy."""
        self.failed(error)

    def saw(
        self, limit: str, in_flight: int, admitted: bool, redis_ms: float | None = None
    ) -> None:
        """Redis answered an ask of ``limit`` with the fleet's ``in_flight`` count at
        ``redis_ms`` (Redis's clock; hot path: a lock and a dict write). The count sizes
        this process's allotment if Redis goes away.

        Threads read their replies in any order, not in the order Redis ran the asks: a
        reply older (in Redis's time) than the one kept is dropped, or a stale count, with
        the slots admitted since then held, would size an allotment above the cap. Past
        :data:`SEEN_ORDER_S` the newer reply wins whatever its time (a new master's clock
        may be behind the old one's).
        """
        now = self.clock()
        with self._seen_lock:
            kept = self._seen.get(limit)
            if (
                redis_ms is None
                or kept is None
                or redis_ms >= kept[3]
                or now - kept[1] > SEEN_ORDER_S
            ):
                self._seen[limit] = (in_flight, now, admitted, redis_ms or 0.0)
        self.ever_answered = True

    def failed(self, error: Exception) -> None:
        """The store did not answer: start an outage (logged once) or extend it."""
        now = self.clock()
        with self._lock:
            self._retry_at = now + RETRY_S
            self._reachable = False
            if self.down_since is not None:
                return
            share = max(1, int(self.share()))
            held = self.local._buckets  # local leases still held from an earlier outage
            self.local = LocalLimiter(self.limits, share, self.held, self._allotments(share))
            for limit, bucket in held.items():
                if bucket.leases:
                    now_ms = time.time() * 1000.0
                    self.local._bucket(self.limits[limit], now_ms).leases.update(bucket.leases)
            self.down_since = now
            self._switch_at, self._switching = None, False
            self.outages += 1
        how = {
            "local": f"admitting locally at 1/{share} of each budget (fleet_store_down='local')",
            "open": "admitting every call (fleet_store_down='open')",
            "closed": "refusing every call as backpressure (fleet_store_down='closed')",
        }[self.policy]
        if not self.ever_answered:
            url = getattr(error, "url", "?")
            log.error(
                "celery-fleet: the fleet's Redis at %s has not answered since this process "
                "started (%s): check fleet_redis_url; meanwhile %s",
                url,
                error,
                how,
                extra=log_fields(reason="store_down"),
            )
            return
        log.warning(
            "celery-fleet: the fleet's Redis is unreachable (%s); %s",
            error,
            how,
            extra=log_fields(reason="store_down"),
        )

    def _allotments(self, share: int) -> dict[str, int]:
        """Each capped limit's in-flight cap for this outage, from the fleet-wide count of
        the last reply (see :func:`allotment`); limits without a fresh count are absent.

        The slots this process holds are those held now, and at least the one the last
        reply admitted when that filled the cap: a process usually finds Redis away at its
        next ask, just after giving that slot back, and the full count still includes it
        (without it, every process between two calls would get nothing while the cap was
        full). Below the cap it does not count: the free slots are shared instead.
        """
        out = {}
        now = self.clock()
        rank = self.rank() if self.rank is not None else None
        for name, cfg in self.limits.items():
            cap = fleet_cap(cfg)
            seen = self._seen.get(name)
            if not cap or seen is None or now - seen[1] > FLEET_COUNT_FRESH_S:
                continue
            held = self.held(name) if self.held is not None else 0
            if seen[2] and seen[0] >= cap:
                held = max(held, 1)
            out[name] = allotment(cap, seen[0], held, share, rank)
        return out

    def answered(self) -> bool:
        """Redis answered a call that is not an ask (a lease renewal, the presence record,
        from a background thread): look for the hand-over now, in this thread, so a
        process too busy with its local slots to ask still learns the moment (and enters
        them into Redis at it). Returns False: the outage ends only at the hand-over."""
        self.ever_answered = True
        with self._lock:
            self._reachable = True
            admission = self.admission
            if self.down_since is None or self._switch_at is not None:
                return False
            self._retry_at = 0.0
        if admission is not None:
            try:
                drive(self.back_steps(admission), admission.store)
            except FleetError as exc:  # the next ask looks again
                log.debug("celery-fleet: could not look for the hand-over: %s", exc)
        return False

    def back_steps(self, admission: _Admission) -> Steps[bool]:
        """Whether an ask may go to Redis now (True) or the policy answers it (False).

        While Redis is away, one caller per :data:`RETRY_S` runs ``handover.lua``: when
        Redis answers it learns the fleet's hand-over moment (setting it, if it is the
        first). At that moment one caller charges the shared buckets with what this process
        admitted locally (``charge.lua``; first starting the windows a restarted Redis lost
        as empty ones) and ends the outage; the others use the policy until it is done.
        """
        now = self.clock()
        self.admission = admission
        with self._lock:
            if self.down_since is None:
                return True
            if self._switching:
                return False
            if self._switch_at is None:
                if now < self._retry_at:
                    return False
                self._retry_at = now + RETRY_S
                probe = True
            elif now < self._switch_at:
                return False
            else:
                self._switching, probe = True, False
        if probe:
            wait_s = yield from self._find_handover(admission, now)
            if wait_s is None:
                return False
            with self._lock:
                if self._switching or self.down_since is None:
                    return self.down_since is None
                self._switch_at = self.clock() + wait_s
                if wait_s > 0:
                    # A process busy with its local slots may not ask again for a while:
                    # they enter Redis's semaphore at the moment all the same.
                    timer = threading.Timer(wait_s, self._enter_at_moment, (admission,))
                    timer.daemon = True
                    timer.start()
                    return False
                self._switching = True
        return (yield from self._switch(admission))

    def _find_handover(self, admission: _Admission, now: float) -> Steps[float | None]:
        """Seconds until the fleet's hand-over (None: Redis still away)."""
        since = self.down_since if self.down_since is not None else now
        args = [int((now - since) * 1000), int(HANDOVER_S * 1000), int(HANDOVER_KEEP_S * 1000)]
        try:
            call = HANDOVER.call([handover_key(admission.namespace)], args)
            moment, redis_now = HANDOVER.read((yield call))
        except StoreUnavailable as exc:
            self.failed(exc)
            return None
        except FleetError as exc:  # not an outage, but no moment either: try again later
            log.warning("celery-fleet: could not read the hand-over moment: %s", exc)
            return None
        self.ever_answered = self._reachable = True
        wait_s = max(0.0, (float(moment) - float(redis_now)) / 1000.0)
        if self.policy != "local":
            wait_s = 0.0  # "open" admits without limit, "closed" refuses: switch at once
        log.warning(
            "celery-fleet: the fleet's Redis answers again after %.1f s; leaving the local "
            "limiter with the rest of the fleet in %.1f s",
            self.clock() - since,
            wait_s,
            extra=log_fields(reason="store_back", wait_ms=round(wait_s * 1000)),
        )
        return wait_s

    def _switch(self, admission: _Admission) -> Steps[bool]:
        """Charge what this process admitted locally and the local slots it still holds
        (entered into Redis's semaphore until they are given back), end the outage; True
        when done."""
        charged = 0
        self._store = admission.store
        try:
            if self.restarted is not None and self.restarted():
                yield from admission.empty_missing_steps()
            owed = self.local.owed(time.time() * 1000.0)
            for name, cfg in self.limits.items():
                windows, held = owed.get(name, []), self._reserve(name)
                if not windows and not held:
                    continue
                keys = admission.keys(name)
                args = [len(windows) // 2, *windows, int(cfg.lease_s * 1000)]
                args += [x for lease, tokens in held for x in (lease, tokens)]
                try:
                    reply = CHARGE.read((yield CHARGE.call(CHARGE.keys_of(keys), args)))
                except BaseException:
                    self._unreserve(held)
                    raise
                charged += reply.charged
                self._record_entered(name, keys.leases, held, reply.leases)
        except FleetError as exc:
            with self._lock:
                self._switching, self._switch_at = False, None
            if isinstance(exc, StoreUnavailable):
                self.failed(exc)
            else:
                log.warning("celery-fleet: could not hand over to Redis: %s", exc)
            return False
        with self._lock:
            since, self.down_since = self.down_since, None
            self._switching, self._switch_at = False, None
        # Slots other threads took locally while the charge was on its way enter Redis's
        # semaphore too. An ask that was sent to the policy before this point may still
        # take one after it: admit() enters that one itself.
        yield from self._enter_steps(admission)
        log.warning(
            "celery-fleet: back on the fleet's Redis after %.1f s; admission is shared "
            "again (%d window(s) charged with this process's local calls)",
            self.clock() - (since if since is not None else self.clock()),
            charged,
            extra=log_fields(reason="store_back"),
        )
        return True

    def _enter_at_moment(self, admission: _Admission) -> None:
        """At the hand-over moment (a timer thread): enter the local slots held now into
        Redis's semaphore, also when nobody in this process asks (all busy with them)."""
        self._store = admission.store
        with self._lock:
            if self.down_since is None or self._switching:
                return
        drive(self._enter_steps(admission), admission.store)

    def _enter_steps(self, admission: _Admission) -> Steps[None]:
        """Enter the local slots held now (each once) into Redis's semaphore, until they
        are given back; on an error the rest wait for the next try (or end locally)."""
        for name, cfg in self.limits.items():
            held = self._reserve(name)
            if not held:
                continue
            keys = admission.keys(name)
            args = [0, int(cfg.lease_s * 1000), *(x for lease, t in held for x in (lease, t))]
            try:
                reply = CHARGE.read((yield CHARGE.call(CHARGE.keys_of(keys), args)))
            except FleetError as exc:
                self._unreserve(held)
                log.debug("celery-fleet: could not enter local slots of %r: %s", name, exc)
                return
            self._record_entered(name, keys.leases, held, reply.leases)

    def _reserve(self, limit: str) -> list[tuple[str, int]]:
        """The local slots of ``limit`` not entered into Redis yet, marked as being entered
        (the switch and the moment's timer may run at once: each slot is entered once)."""
        with self._lock:
            leases = self.local.leases(limit)
            held = [(lease, t) for lease, t in leases if lease not in self._entered]
            for lease, _tokens in held:
                self._entered[lease] = None
        return held

    def _unreserve(self, held: list[tuple[str, int]]) -> None:
        """Slots whose entering failed: the next switch enters them."""
        with self._lock:
            for lease, _tokens in held:
                if lease in self._entered and self._entered[lease] is None:
                    del self._entered[lease]

    def _record_entered(
        self, limit: str, key: str, held: list[tuple[str, int]], entered: list[Any]
    ) -> None:
        """Remember the Redis lease entered for each local one; one given back meanwhile
        leaves Redis again at once."""
        still = {lease for lease, _tokens in self.local.leases(limit)}
        for (lease, _tokens), value in zip(held, entered, strict=True):
            self._entered[lease] = (key, value.decode() if isinstance(value, bytes) else value)
            if lease not in still:
                self.release(limit, lease)

    def admit(self, cfg: LimitConfig, tokens: int, lease_id: str) -> Decision:
        """The policy's answer to one admission while the store is away.

        A caller told to use the policy (:meth:`back_steps`) may reach here only after
        another thread's switch has ended the outage and entered the local slots held then
        into Redis: a local slot taken that late is entered at once, or Redis, not
        counting it, would admit one more than the cap for as long as it is held.
        """
        now_ms = time.time() * 1000.0
        if self.policy == "open":
            return Decision(cfg.name, True, 0, f"open.{lease_id}", "", 0, tokens, now_ms)
        if self.policy == "closed":
            return Decision(cfg.name, False, CLOSED_WAIT_MS, None, "store_down", 0, tokens, now_ms)
        with self._lock:  # the switch ends the outage under it: taken before, or seen late
            decision = self.local.acquire(cfg, tokens, lease_id, now_ms)
            late = decision.allowed and self.down_since is None
            admission = self.admission
        if late and admission is not None:
            drive(self._enter_steps(admission), admission.store)
        return decision

    def release(self, limit: str, lease_id: str) -> bool:
        """Give back a lease the policy handed out (local leases only count); one still
        held at the hand-over also leaves Redis's semaphore (else it expires there)."""
        if lease_id.startswith("open."):
            return True
        entered = self._entered.pop(lease_id, None)
        if entered is not None and self._store is not None:
            try:
                self._store.call("ZREM", *entered)
            except FleetError as exc:
                log.debug("celery-fleet: %s stays in Redis until it expires: %s", lease_id, exc)
        return self.local.release(limit, lease_id)

    def settle(self, cfg: LimitConfig, lease_id: str, actual: int) -> int:
        if lease_id.startswith("open."):
            return 0
        return self.local.settle(cfg, lease_id, actual)
