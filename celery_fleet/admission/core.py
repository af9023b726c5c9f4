"""Admission: one Redis round trip that says "go" or "wait N ms" for a limit.

Each limit's state lives under one Redis hash tag, ``{<namespace>:<limit>}``, so that the
scripts also run on Redis Cluster:

=================================  =========================================================
``{ns:limit}:ctl``                 hash: everything read on every admission, in one
                                   HMGET: each window ("r:60", "t:86400") -> GCRA
                                   arrival time (ms), and the control state
                                   (``pause_until``, ``cap``, ``hold_ms``, ...);
                                   expires after a day without calls
``{ns:limit}:leases``              zset: lease -> expiry (ms); the in-flight semaphore.
                                   A lease carries its own record:
                                   ``<acquired µs>.<in flight then>.<tokens>.<id>``
``{ns:limit}:settled``             hash: lease -> tokens, for leases settled so far
``{ns:limit}:line``                zset: ticket id -> order key; callers waiting for
                                   admission, served oldest first (see below)
``{ns:limit}:waiting``             zset: ticket id -> expiry (ms); a ticket is a lease
``{ns:limit}:wake:<tag>``          list: tickets of one process (tag: a ticket's first 8
                                   characters) to wake; its listener blocks on it
``{ns:limit}:breaker``             hash: the limit's circuit breaker (see breaker.py)
=================================  =========================================================

**The line** (who waits, in which order, how they are woken) is described in
:mod:`celery_fleet.admission.line`.

Every request/token window of the limit is a GCRA bucket (burst = a tenth of the window's
budget by default) and the in-flight cap is a semaphore of leases that expire unless
renewed, so a holder killed with SIGKILL gives its slot back within the lease TTL, and that
live holders put back when Redis loses them (see :meth:`Admission.renew`). ``ctl`` is where
fleet-wide control written by other components (adaptive caps, Retry-After pauses) is read
by the same script, at no extra round trip.

This module knows nothing about Celery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..checks import MAX_LEASE_ID, MAX_UNITS, check_lease_id, check_name
from ..errors import ConfigError, FleetError, LeaseLost, StoreUnavailable
from ..logfields import log_fields
from ..quality.breaker import QualityBreakers
from ..resilience.replay import Replays, replay_steps
from ..resilience.strategy import RedisOnly, StoreStrategy
from ..store.calls import PackedCalls, ScriptCall, Steps, drive
from ..store.specs import (
    ACQUIRE,
    EMPTY_MISSING,
    LEAVE,
    OBSERVE,
    RELEASE,
    RELEASE_LEAN,
    RENEW,
    SETTLE,
    AcquireMode,
)
from ..store.sync import RedisStore
from ..store.wakeups import listener_for, wake_waiters
from .config import REQUESTS, LimitConfig
from .decision import (
    Decision,
    LimitKeys,
    Release,
    _reason,
    acquire_args,
    clamp_wait_ms,
    key_token_args,
    lean_release,
    new_lease_id,
    read_acquire,
    read_release,
    release_args,
    release_lean_args,
)
from .keyed import KeyedCommands
from .lanes import Lanes, check_lane
from .line import LANE_SPAN, REFRESH_S, TICKET_TTL_MS, WAKE_GRACE_MS, ages, check_since
from .providers import LONG_WAIT_MS, Observation
from .run import Run
from .runtime import RuntimeLimits

log = logging.getLogger("celery_fleet")

_DECISION_FIELDS = tuple(f.name for f in fields(Decision))


def _decided(*values: Any) -> Decision:
    """``Decision(*values)`` without the frozen dataclass's ``__init__``, which sets each of
    its fields through ``object.__setattr__``: about three times the cost, on every
    admission. The same object (equality, hash, immutability; a field left out reads its
    default, which the dataclass keeps on the class)."""
    decision: Decision = object.__new__(Decision)
    decision.__dict__.update(zip(_DECISION_FIELDS, values, strict=False))
    return decision


#: What a call's ending can teach the release script.
OUTCOMES = frozenset({"ok", "fail", "overload", "congestion", "rate", "neutral"})

__all__ = ["Admission", "Decision", "LimitKeys", "Release", "REFRESH_S", "WAKE_GRACE_MS"]

#: Leases settled and not yet released that one Admission remembers (to drop their record).
SETTLED_MEMORY = 100_000
#: A kept fair-share place travels in acquire's order argument as 1 + tag * PLACE_SCALE.
PLACE_SCALE = 1024
#: The lowest rate factor a provider's headers may impose (its limit / the declared one).
MIN_PROVIDER_FACTOR = 0.05


@dataclass(frozen=True)
class ReleaseAhead:
    """A release sent in the same round trip as an ask, just ahead of it (``Slot.next``):
    the lease it gives back, its packed command, and who reads its :class:`Release`."""

    lease_id: str
    command: tuple[str, bytes]
    done: Callable[[str, Release], None]


class Admission:
    """Admission control for a set of limits, backed by one Redis.

    Example::

        admission = Admission(RedisStore("redis://127.0.0.1:6379/1"), parse_limits({...}))
        decision = admission.try_acquire("openai", tokens=1500)
        if decision:
            try:
                ...  # call the model
                admission.settle("openai", decision.lease_id, actual=1320, reserved=1500)
            finally:
                admission.release("openai", decision.lease_id)
    """

    def __init__(
        self,
        store: RedisStore,
        limits: Mapping[str, LimitConfig],
        namespace: str = "fleet",
        store_down: StoreStrategy | None = None,
    ) -> None:
        self.store = store
        #: Who answers while Redis is unreachable, and what an unanswered call does (see
        #: :mod:`celery_fleet.resilience.strategy`; None: :class:`RedisOnly`, it raises).
        self.store_down: StoreStrategy = RedisOnly() if store_down is None else store_down
        self.namespace = check_name(namespace, "fleet_namespace")
        self.limits = dict(limits)
        self._keys: dict[str, LimitKeys] = {}
        self._acquire_tail: dict[str, list[bytes]] = {}
        self._release_tail: dict[str, list[bytes]] = {}
        self._acquire_cmd: dict[str, Any] = {}
        self._release_cmd: dict[str, Any] = {}
        self._lean_cmd: dict[str, Any] = {}  # release_lean.lua, for limits that have one
        self._token_args: dict[str, list[str]] = {}
        # Limits with priority lanes: a ticket's lane (its "~<priority>" ending) picks
        # acquire's lane argument; a limit without lanes sends b"0", as before lanes.
        self._lanes: dict[str, Lanes] = {}
        for name, cfg in self.limits.items():
            self._prepare(name, cfg)
        #: Called as ``listener(name, cfg)`` after :meth:`reconfigure` changed a limit.
        self.reconfigured: list[Callable[[str, LimitConfig], None]] = []
        self._generations: dict[str, int] = {}  # reconfigure() calls per limit
        #: The limits changed at runtime (``fleet.set_limit``): stored in Redis, polled by
        #: one background thread per process, started by the first ask (runtime.py).
        self.runtime = RuntimeLimits(self)
        #: Per-key packed commands of the limits with keys (keyed.py, tenancy.py).
        self.keyed = KeyedCommands(
            store, namespace, self.limits, self._keys, self._acquire_tail, self._release_tail
        )
        self._keyed = frozenset(name for name, cfg in self.limits.items() if cfg.keyed)
        # Leases this process settled and has not released: their release drops the record.
        self._settled: dict[str, None] = {}
        #: Per limit, the last lean release this process posted (its handle and lease):
        #: the next ask of that limit takes it back and carries it (see :meth:`ask`).
        self._riders: dict[str, tuple[Any, bytes]] = {}
        #: Releases, leaves and timed-out asks Redis has not heard of yet (replay.py).
        self.replays = Replays()
        #: Called as ``listener(limit, state)`` when this process sees the breaker of a
        #: limit change: ``"open"``, ``"half_open"`` (a probe was let through), ``"closed"``.
        self.listeners: list[Callable[[str, str], None]] = []
        #: Called as ``watcher(event, limit, fields)`` when a slot of this process is
        #: admitted (``"admitted"``: waited_s, attempts), gives up (``"refused"``: reason,
        #: wait_ms) or is pushed back by the provider (``"pushback"``: status, retry_after_ms).
        self.watchers: list[Callable[[str, str, dict[str, Any]], None]] = []
        #: Limits whose over-long line this process has logged (once each).
        self.warned_lines: set[str] = set()
        #: The quality breakers (celery_fleet/quality/): judged calls' verdicts, routing.
        self.quality = QualityBreakers(store, self.namespace, self.limits)

    def _prepare(self, name: str, cfg: LimitConfig) -> None:
        """Encode what every ask and release of ``name`` sends unchanged (its constants)."""
        store = self.store
        k = self._keys.get(name) or LimitKeys.build(self.namespace, name)
        self._keys[name] = k
        # Everything but the lease id, tokens, age, join and lane is fixed per limit:
        # encoded once (the hot path is one EVALSHA; redis-py's packer is pure Python).
        self._acquire_tail[name] = acquire_args(cfg)
        self._release_tail[name] = release_args(cfg)
        self._acquire_cmd[name] = store.packed(
            ACQUIRE.name, ACQUIRE.keys_of(k), 5, self._acquire_tail[name]
        )
        self._release_cmd[name] = store.packed(
            RELEASE.name, RELEASE.keys_of(k), 5, self._release_tail[name]
        )
        lean = release_lean_args(cfg)
        if lean is None:
            self._lean_cmd.pop(name, None)
        else:
            self._lean_cmd[name] = store.packed(RELEASE_LEAN.name, RELEASE_LEAN.keys_of(k), 1, lean)
        # settle: field, T and how far ahead of now a TAT may go (an empty bucket plus one
        # whole period of debt)
        self._token_args[name] = [
            arg
            for w in cfg.token_windows
            for arg in (w.field, repr(w.emission_ms), repr(w.tolerance_ms + w.period_s * 1000.0))
        ]
        if cfg.lanes:
            self._lanes[name] = cfg.lanes
        else:
            self._lanes.pop(name, None)

    def reconfigure(self, name: str, cfg: LimitConfig) -> None:
        """Admit ``name`` by ``cfg`` from the next ask on (a limit changed at runtime).

        Only a configured limit changes (its keys stay). The encoded constants are replaced
        before the configuration, each by one assignment, so an ask on another thread sends
        either the old constants or the new ones, never a mix. The scripts need nothing
        else: the in-flight cap is compared with the live leases on every ask (narrowing it
        revokes no lease, it admits nobody until fewer are held), and a window's state is
        its GCRA arrival time in ms, which a new emission interval reads as the same share
        of the bucket used: the new rate applies from the next ask, with neither free
        admissions nor a stall.
        """
        self.limit(name)
        if cfg.name != name:
            raise ConfigError(f"reconfigure({name!r}) got the configuration of {cfg.name!r}")
        self._prepare(name, cfg)
        self.limits[name] = cfg
        self.keyed.forget(name)  # its keys' commands carry the old constants
        # After the new constants, before the wake-up: a waiter whose ask was in flight
        # meanwhile registers after the wake-up went out, finds the generation moved
        # (wait_turn's ``since``) and asks again at once rather than at its next re-ask.
        self._generations[name] = self.generation(name) + 1
        for listener in list(self.reconfigured):
            try:
                listener(name, cfg)
            except Exception:
                log.exception("celery-fleet: reconfigure listener %r failed", listener)
        # Callers already waiting here ask again now, under the new values: a wider cap or
        # rate admits them with no release to wake them (else: at their next re-ask, ~2.5 s).
        wake_waiters(self.store, self.keys(name).wake)

    def generation(self, name: str) -> int:
        """How many times :meth:`reconfigure` changed ``name`` in this process: a waiter
        reads it before it asks, and :meth:`wait_turn` does not wait when it moved since."""
        return self._generations.get(name, 0)

    def limit(self, name: str) -> LimitConfig:
        """The configuration of ``name``; :class:`ConfigError` listing the known ones if unknown."""
        try:
            return self.limits[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self.limits)) or "none configured (set fleet_limits)"
            raise ConfigError(f"unknown limit {name!r}; known limits: {known}") from None

    def keys(self, name: str) -> LimitKeys:
        self.limit(name)
        return self._keys[name]

    def try_acquire(
        self,
        name: str,
        tokens: int = 0,
        lease_id: str | None = None,
        since_ms: float = 0,
        join: bool = False,
        *,
        key: str | None = None,
        lane: str | None = None,
    ) -> Decision:
        """Ask once, without waiting: admitted with a lease, or refused with ``wait_ms``.

        ``lease_id`` names the lease to create (default: a new random one in ``lane``, see
        :mod:`~celery_fleet.admission.lanes`; a given one is in the lane its ending names,
        :meth:`ticket`); it is also the caller's ticket. ``since_ms`` is the caller's age
        in line (Redis-clock ms of its first ask; 0 = now): nobody younger is admitted
        before it while it waits. With ``join`` a refused caller takes (or keeps) a
        ticket and should wait for its wake-up (:meth:`wait_turn`) or :meth:`leave`;
        without, it is told to wait but holds no place.

        ``key`` (a limit with keys only, see :mod:`~celery_fleet.admission.tenancy`): the
        caller's key (tenant); its own budgets are checked in the same call and waiting
        callers are served fairly between keys. There ``since_ms`` is not an age but the
        place a caller's earlier ticket held (:meth:`order_of`; 0: none). A lease id of the
        caller's own gets the key's mark appended (``-k<hash>``, after a lane's marker):
        use the decision's ``lease_id`` from then on.
        """
        cfg = self.limit(name)
        tokens = cfg.check_tokens(tokens)
        since = check_since(since_ms)
        if lease_id is None:
            lease = self.new_ticket(name, key, lane)
        else:
            lease = check_lease_id(lease_id)
            chosen = check_lane(cfg.lanes, name, lane)
            if lane is not None and cfg.lanes and cfg.lanes.of_ticket(lease) != chosen:
                raise ConfigError(
                    f"lease_id {lease!r} is not a ticket of lane {lane!r} of limit {name!r}: "
                    f"make it with Admission.ticket({name!r}, {lane!r})"
                )
            lease = self.keyed.with_key(cfg, lease, key)
        return self._do_acquire(cfg, tokens, lease, since, join)

    def new_ticket(self, name: str, key: str | None = None, lane: str | None = None) -> str:
        """A new ticket (and lease id) for asking ``name``: in ``lane`` (None: the limit's
        lowest, if it has lanes), marked with ``key`` if given (the lane's marker first,
        the key's last); :class:`ConfigError` for a bad key or lane, or one the limit
        does not have."""
        cfg = self.limit(name)
        if lane is None and cfg.lanes is None and key is None:  # every slot of a plain limit
            return new_lease_id()
        chosen = check_lane(cfg.lanes, name, lane)
        ticket = new_lease_id() + (chosen.marker if chosen is not None else "")
        return self.keyed.with_key(cfg, ticket, key)

    def ticket(self, name: str, lane: str | None = None) -> str:
        """A new ticket (lease id) of limit ``name`` in ``lane`` (None: the limit's lowest
        lane); :class:`ConfigError` for a lane the limit does not have."""
        return self.new_ticket(name, lane=lane)

    def order_of(self, name: str, run: Run) -> int:
        """The ``since_ms`` an ask of ``run`` sends for ``name``: the run's age in line or,
        on a limit with keys, the place its last refused ticket held (so a new ticket, a
        reschedule's, keeps it; see :meth:`remember_place`)."""
        if name not in self._keyed:
            return run.since_ms
        place = run.places.get(name)
        if place is None:
            return 0
        order = int(place * PLACE_SCALE) + 1
        return order if order < LANE_SPAN else 0

    def remember_place(self, name: str, run: Run, decision: Decision) -> None:
        """After an ask of ``run`` on a limit with keys: keep the place a refused ticket
        holds, forget it once admitted (the run's next call is a new one)."""
        if name in self._keyed:
            if decision.allowed:
                run.places.pop(name, None)
            elif decision.place:
                run.places[name] = decision.place

    def _do_acquire(
        self, cfg: LimitConfig, tokens: int, lease_id: str, since_ms: int = 0, join: bool = False
    ) -> Decision:
        return drive(self.acquire_steps(cfg, tokens, lease_id, since_ms, join), self.store)

    def ask(
        self, cfg: LimitConfig, tokens: int, lease_id: str, since_ms: int = 0, join: bool = False
    ) -> Decision:
        """One ask of checked arguments: :meth:`acquire_steps` on this blocking store, with
        its healthy case run straight (no generator): Redis not known to be down, nothing
        owed, the runtime limits followed. Anything else (an outage, replays due, a
        dropped connection under the ask) goes through the same steps as before."""
        if self.store_down.down or self.replays or not self.runtime.following:
            return self._do_acquire(cfg, tokens, lease_id, since_ms, join)
        mode = AcquireMode.JOIN if join else AcquireMode.ASK
        name = cfg.name
        rider = self._riders.pop(name, None) if self._riders else None
        try:
            if rider is not None and self.store.take_posted(rider[0]):
                # this limit's last release, still held for the next call: it rides in
                # this ask (acquire.lua runs it first), one script call for both
                mode = mode + b"|" + rider[1]
                command = self._pack_acquire(name, tokens, lease_id, since_ms, mode)
                reply = self.store.send_riding(command, rider[0])
            else:
                (reply,) = self.store.send(
                    self._pack_acquire(name, tokens, lease_id, since_ms, mode)
                )
        except StoreUnavailable as exc:
            steps = self._unanswered_ask_steps(cfg, tokens, lease_id, since_ms, join, exc)
            return drive(steps, self.store)
        return self.decision(cfg.name, tokens, reply)

    def _unanswered_ask_steps(
        self,
        cfg: LimitConfig,
        tokens: int,
        lease_id: str,
        since_ms: int,
        join: bool,
        error: StoreUnavailable,
    ) -> Steps[Decision]:
        """:meth:`acquire_steps` from an ask Redis did not answer (``error``) on: sent again
        (flagged) after a dropped connection, else owed and answered by the policy."""
        try:
            if not error.dropped:
                raise error
            ask = self.acquire_command(cfg.name, tokens, lease_id, since_ms, join, True)
            (reply,) = yield PackedCalls((ask,))
        except StoreUnavailable as exc:
            self.replays.add("ask", cfg.name, lease_id)
            self.store_down.cover(exc)
            return self.store_down.admit(cfg, tokens, lease_id)
        return self.decision(cfg.name, tokens, reply)

    def acquire_steps(
        self,
        cfg: LimitConfig,
        tokens: int,
        lease_id: str,
        since_ms: int = 0,
        join: bool = False,
        ahead: ReleaseAhead | None = None,
    ) -> Steps[Decision]:
        """One ask of checked arguments, as calls (see :mod:`celery_fleet.store.calls`): the
        store-down strategy and the resend after a dropped connection included.

        With ``ahead`` (``Slot.next``) a release rides in the same round trip, resent with
        the ask. Its caller has found Redis not known to be down, so neither the strategy
        nor the owed replays are asked first; when Redis does not answer, both the release
        and the ask are owed and the error is raised: the caller covers it
        (:meth:`StoreStrategy.cover`) and asks again from the start.
        """
        if not self.runtime.following:  # once per process: start polling runtime changes
            self.runtime.watch()
        down = self.store_down
        if ahead is None and down.down and not (yield from down.back_steps(self)):
            return down.admit(cfg, tokens, lease_id)
        asked = False
        try:
            if ahead is None and self.replays.due():  # what an outage left owed goes first
                yield from replay_steps(self)
            asked = True
            ask = self.acquire_command(cfg.name, tokens, lease_id, since_ms, join)
            try:
                replies = yield PackedCalls((ask,) if ahead is None else (ahead.command, ask))
            except StoreUnavailable as exc:
                if not exc.dropped:
                    raise
                # The first ask may have admitted before the connection dropped: the
                # resend answers with that lease instead of charging again (a release
                # ahead of it is idempotent).
                ask = self.acquire_command(cfg.name, tokens, lease_id, since_ms, join, True)
                replies = yield PackedCalls((ask,) if ahead is None else (ahead.command, ask))
        except StoreUnavailable as exc:
            # A frozen Redis runs what it was sent when it thaws (a dropped call may have
            # run): the release is sent again, the ask's lease looked up and released once
            # Redis answers (replay.py).
            if ahead is not None:
                self.replays.add("release", cfg.name, ahead.lease_id)
            if asked:
                self.replays.add("ask", cfg.name, lease_id)
            if ahead is not None:
                raise
            down.cover(exc)
            return down.admit(cfg, tokens, lease_id)
        if ahead is not None:
            ahead.done(ahead.lease_id, self.released(cfg.name, replies[0]))
        return self.decision(cfg.name, tokens, replies[-1])

    def empty_missing_steps(self) -> Steps[int]:
        """Start every window Redis no longer has (it restarted empty during an outage) as
        an empty bucket rather than a full one (run at the hand-over); yields how many
        were missing."""
        missing = 0
        for name, cfg in self.limits.items():
            args = [x for w in cfg.windows for x in (w.field, repr(w.tolerance_ms))]
            try:
                call = EMPTY_MISSING.call(EMPTY_MISSING.keys_of(self._keys[name]), args)
                missing += EMPTY_MISSING.read((yield call))
            except FleetError as exc:
                log.warning("celery-fleet: could not check the windows of %r: %s", name, exc)
        if missing:
            log.warning(
                "celery-fleet: Redis had lost %d window(s) during the outage; they start empty",
                missing,
            )
        return missing

    def acquire_command(
        self,
        name: str,
        tokens: int,
        lease_id: str,
        since_ms: int = 0,
        join: bool = False,
        retry: bool = False,
    ) -> tuple[str, bytes]:
        """The packed acquire of already checked arguments, for :meth:`RedisStore.send`.
        ``retry`` marks an ask sent again after the connection dropped under it."""
        if retry:
            join_arg = AcquireMode.RESEND_JOIN if join else AcquireMode.RESEND_ASK
        else:
            join_arg = AcquireMode.JOIN if join else AcquireMode.ASK
        return self._pack_acquire(name, tokens, lease_id, since_ms, join_arg)

    def lookup_command(self, name: str, lease_id: str) -> tuple[str, bytes]:
        """The packed look-up of the lease an ask with ``lease_id`` may have made (an ask
        cancelled in flight): admitted with it, or refused as ``gone``; nothing changes."""
        return self._pack_acquire(name, 0, lease_id, 0, AcquireMode.LOOKUP)

    def _pack_acquire(
        self, name: str, tokens: int, lease_id: str, since_ms: int, join_arg: bytes
    ) -> tuple[str, bytes]:
        if name in self._keyed and join_arg != AcquireMode.LOOKUP:
            # a look-up returns before the key's part: the limit's own command does
            cmd = self.keyed.acquire(name, lease_id)
        else:
            cmd = self._acquire_cmd[name]
        lanes = self._lanes.get(name)
        lane = b"0" if lanes is None else lanes.of_ticket(lease_id).arg
        packed = cmd.pack(lease_id.encode(), b"%d" % tokens, b"%d" % since_ms, join_arg, lane)
        return (ACQUIRE.name, packed)

    def decision(self, name: str, tokens: int, reply: Any) -> Decision:
        """The :class:`Decision` an acquire's reply means."""
        if reply.__class__ is bytes:
            # The usual admission, the lease alone (see read_acquire): no reply tuple made.
            now_b, count_b, _rest = reply.split(b".", 2)
            count, at_ms = int(count_b), int(now_b) / 1000
            self.store_down.saw(name, count, True, at_ms)
            return _decided(name, True, 0, reply.decode(), "", count, tokens, at_ms, False, 0, 0)
        r = read_acquire(reply)
        allowed, in_flight, at_ms = r.allowed, int(r.in_flight), int(r.now_us) / 1000
        self.store_down.saw(name, in_flight, bool(allowed), at_ms)  # an outage's allotment
        detail = r.detail.decode() if isinstance(r.detail, bytes) else str(r.detail)
        if allowed:
            probe = r.probe
            if probe:
                self.notify(name, "half_open")
            return _decided(
                name, True, 0, detail, "", in_flight, tokens, at_ms, bool(probe), 0, int(r.line)
            )
        return Decision(
            name,
            False,
            clamp_wait_ms(r.wait_ms),
            None,
            _reason(detail),
            in_flight,
            tokens,
            at_ms,
            False,
            int(r.ahead),
            int(r.line),
            float(r.probe) if r.probe else 0.0,  # a refusal's: its place (keys)
        )

    def wait_turn(self, name: str, ticket: str, timeout_s: float, since: int | None = None) -> bool:
        """Block until ``ticket`` is woken (its turn may have come) or ``timeout_s`` passes.

        The release that makes its turn pushes the ticket onto its process's wake list;
        this process's one listener of the limit (:mod:`celery_fleet.store.wakeups`) pops it and
        wakes exactly this waiter: no polling, one blocking connection per process and
        limit, whatever the number of waiters. True when woken. Ask again either way (the
        ask also keeps the ticket alive).

        ``since``: the :meth:`generation` read before the ask that was refused. A runtime
        change wakes only the waiters registered when it lands; one that landed while the
        ask was in flight moved the generation, so this returns True at once (checked after
        registering: no change falls between the check and the wait).
        """
        listener = listener_for(self.store, self.keys(name).wake, ticket)
        return listener.wait(ticket, timeout_s, self._moved(name, since))

    async def await_turn(
        self, name: str, ticket: str, timeout_s: float, since: int | None = None
    ) -> bool:
        """:meth:`wait_turn` in the running loop, which is never blocked."""
        listener = listener_for(self.store, self.keys(name).wake, ticket)
        return await listener.await_wake(ticket, timeout_s, self._moved(name, since))

    def _moved(self, name: str, since: int | None) -> Callable[[], bool] | None:
        if since is None:
            return None
        return lambda: self.generation(name) != since

    def leave(self, name: str, ticket: str) -> bool:
        """Give up ``ticket``'s place in line (the caller stopped waiting), waking the next
        waiter if it was first. True if it was in line. Idempotent."""
        return drive(self.leave_steps(name, ticket), self.store)

    def leave_steps(self, name: str, ticket: str) -> Steps[bool]:
        return LEAVE.read((yield self.leave_call(name, ticket)))

    def leave_call(self, name: str, ticket: str) -> ScriptCall:
        """The script call that takes ``ticket`` out of ``name``'s line."""
        return LEAVE.call(LEAVE.keys_of(self.keys(name)), [ticket, TICKET_TTL_MS, WAKE_GRACE_MS])

    def replay(self) -> int:
        """Send the releases, leaves and look-ups an outage left owed (replay.py); returns
        how many leases were released. Raises StoreUnavailable while Redis is away."""
        return drive(replay_steps(self), self.store)

    def line(self, name: str) -> list[tuple[str, float]]:
        """The tickets waiting for ``name``, oldest first, as ``(ticket, first-asked ms)``."""
        k = self.keys(name)
        return ages(self.store.call("ZRANGE", k.line, 0, -1, "WITHSCORES"))

    def release(
        self, name: str, lease_id: str, outcome: str = "neutral", retry_after_ms: int = 0
    ) -> Release:
        """Give the slot back, saying how the call went, in one round trip.

        ``outcome`` feeds the adaptive limit and the breaker: ``ok``, ``fail``,
        ``overload``, ``congestion``, ``rate`` or ``neutral`` (see :class:`Signal`);
        ``retry_after_ms`` > 0 pauses admission to this limit fleet-wide until then (at
        most 10 minutes: a longer wait is a quota running out, not a throttle).
        ``released`` is False when the lease had already expired.
        """
        return drive(self.release_steps(name, lease_id, outcome, retry_after_ms), self.store)

    def release_steps(
        self, name: str, lease_id: str, outcome: str = "neutral", retry_after_ms: int = 0
    ) -> Steps[Release]:
        if self.store_down.owns(lease_id):
            held = self.store_down.release(name, lease_id)
            return Release(held, 0, 0.0)
        command = self.release_command(name, lease_id, outcome, retry_after_ms, clock=True)
        (reply,) = yield PackedCalls((command,))
        return self.released(name, reply)

    def release_command(
        self,
        name: str,
        lease_id: str,
        outcome: str = "neutral",
        retry_after_ms: int = 0,
        clock: bool = False,
    ) -> tuple[str, bytes]:
        """The packed release of ``lease_id``, for :meth:`RedisStore.send` or ``post``.
        With ``clock`` the reply carries the Redis time and hold time (one more command)."""
        self.limit(name)
        # an admitted lease: the requested id after its record (acquired µs, in flight, tokens)
        check_lease_id(lease_id, MAX_LEASE_ID + 64)
        if outcome not in OUTCOMES:
            raise ConfigError(f"release outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")
        return self.release_of(name, lease_id, outcome, retry_after_ms, clock)

    def release_of(
        self, name: str, lease_id: str, outcome: str, retry_after_ms: int = 0, clock: bool = False
    ) -> tuple[str, bytes]:
        """:meth:`release_command` of arguments known good: a held slot's own limit and
        lease, and a :class:`~celery_fleet.admission.providers.Signal`'s outcome (the
        slot's exit, every call: the checks are for callers naming a lease)."""
        pause = min(max(0, int(retry_after_ms)), LONG_WAIT_MS)
        settled = b"0"
        if self._settled:
            settled = b"1" if self._settled.pop(lease_id, 0) is None else b"0"
        now = b"1" if clock else b"0"
        cmd, lean = self._release_cmd[name], self._lean_cmd.get(name)
        if name in self._keyed:
            keyed = self.keyed.release(name, lease_id)  # a key's own cap: release.lua's
            if keyed is not None:
                cmd, lean = keyed, None
        if lean is not None and lean_release(lease_id, pause, settled, clock):
            # nothing for release.lua to learn, pause, settle, sample or time
            return (RELEASE_LEAN.name, lean.pack(lease_id.encode()))
        packed = cmd.pack(lease_id.encode(), outcome.encode(), b"%d" % pause, settled, now)
        return (RELEASE.name, packed)

    def posted_release(
        self, name: str, command: tuple[str, bytes], handle: Any, lease_id: str
    ) -> None:
        """A release of ``name`` was posted (``handle``): a lean one of a limit without
        keys may ride in the next ask of that limit instead of a call of its own."""
        if command[0] == RELEASE_LEAN.name and name not in self._keyed:
            self._riders[name] = (handle, lease_id.encode())

    def released(self, name: str, reply: list[Any]) -> Release:
        """The :class:`Release` a release's reply means (listeners told of a transition)."""
        r = read_release(reply)
        transition = r.transition
        transition = transition.decode() if isinstance(transition, bytes) else str(transition)
        if transition:
            self.notify(name, transition)
        at_ms = int(r.now_us) / 1000
        return Release(bool(r.released), int(r.held_ms), at_ms, transition, float(r.cap))

    def observe(self, name: str, obs: Observation, lease_id: str | None = None) -> int:
        """Lower this limit's per-minute buckets (and rate factor) to what the provider's
        headers say remain; never raises them. Returns how many windows were lowered.

        With ``lease_id``, raises :class:`~celery_fleet.LeaseLost` (after lowering: what the
        provider said is true either way) when that lease is no longer held.
        """
        return drive(self.observe_steps(name, obs, lease_id), self.store)

    def observe_steps(self, name: str, obs: Observation, lease_id: str | None = None) -> Steps[int]:
        cfg = self.limit(name)
        k = self._keys[name]
        args: list[object] = []
        factors = []
        # A discovering limit may be told its real limit is above the declared one.
        most = cfg.discover.up_to if cfg.discover else 1.0
        for w in cfg.windows:
            is_req = w.dimension == REQUESTS
            limit = obs.requests_limit if is_req else obs.tokens_limit
            remaining = obs.requests_remaining if is_req else obs.tokens_remaining
            if w.period_s != 60:
                continue
            emission = w.emission_ms
            if limit is not None and limit > 0:
                factors.append(min(most, limit / w.declared))
                if factors[-1] > 1:
                    # above the declared rate a unit takes T / factor: R units left are
                    # R of those, not R * factor of them
                    emission /= factors[-1]
            if remaining is not None:
                units = min(max(0, int(remaining)), MAX_UNITS)
                args += [w.field, repr(emission), repr(w.tolerance_ms), units]
        factor = max(MIN_PROVIDER_FACTOR, min(factors)) if factors else -1
        if self.store_down.owns(lease_id):
            lease_id = None  # what the provider said still lowers the shared buckets
        try:
            call = OBSERVE.call(OBSERVE.keys_of(k), [lease_id or "", factor, len(args) // 4, *args])
            lowered, held = OBSERVE.read((yield call))
        except StoreUnavailable as exc:
            self.store_down.cover(exc)
            return 0  # the headers are lost; the next call's will say the same
        if not held:
            raise LeaseLost(name, lease_id or "", "gone when the provider's headers arrived")
        return int(lowered)

    def reset_buckets(self, name: str) -> None:
        """Refill every request and token window of ``name`` to a full bucket, fleet-wide.

        For operators: after a bad ``settle`` or a provider quota reset that the fleet
        should not wait out. Leases, the breaker and adaptive state are untouched.
        """
        cfg, k = self.limit(name), self.keys(name)
        fields = {w.field for w in cfg.windows}
        for field in self.store.call("HKEYS", k.ctl) or []:
            field = field.decode() if isinstance(field, bytes) else str(field)
            if field[:2] in ("r:", "t:"):
                fields.add(field)  # also windows an older configuration left
        if fields:
            self.store.call("HDEL", k.ctl, *sorted(fields))

    def tell(self, event: str, limit: str, **fields: Any) -> None:
        """Tell this process's slot watchers (errors are logged, never raised)."""
        for watcher in list(self.watchers):
            try:
                watcher(event, limit, fields)
            except Exception:
                log.exception("celery-fleet: slot watcher %r failed", watcher)

    def notify(self, limit: str, state: str) -> None:
        """Tell this process's listeners that ``limit``'s breaker changed (errors are logged)."""
        for listener in list(self.listeners):
            try:
                listener(limit, state)
            except Exception:
                log.exception("celery-fleet: breaker listener %r failed", listener)

    def settle(
        self, name: str, lease_id: str, actual: int, reserved: int, must_hold: bool = False
    ) -> int:
        """Charge or refund the difference between actual usage and the reservation.

        ``reserved`` is only used when the lease is already gone (its own record wins
        otherwise). A charge never puts a window more than one period in debt, so an
        absurd figure blocks the limit for at most one period. Returns the delta applied,
        in tokens. With ``must_hold``, raises :class:`~celery_fleet.LeaseLost` (after
        charging: the provider counted the tokens either way) when the lease is gone.
        """
        return drive(self.settle_steps(name, lease_id, actual, reserved, must_hold), self.store)

    def settle_steps(
        self, name: str, lease_id: str, actual: int, reserved: int, must_hold: bool = False
    ) -> Steps[int]:
        cfg = self.limit(name)
        actual = cfg.check_usage(actual, "settle(tokens=...)")
        reserved = cfg.check_usage(reserved, "settle(reserved=...)")
        k = self._keys[name]
        down = self.store_down
        if down.owns(lease_id):
            return down.settle(cfg, lease_id, actual)
        try:
            args = [lease_id, actual, reserved, len(cfg.token_windows), *self._token_args[name]]
            keys = SETTLE.keys_of(k)
            state = self.keyed.state_keys(name, lease_id) if name in self._keyed else None
            if state is not None and cfg.keys is not None and cfg.keys.windows:
                keys.append(state[0])  # the key's own token windows move too
                args += key_token_args(cfg.keys.windows)
            known, delta, _now, held = SETTLE.read((yield SETTLE.call(keys, args)))
        except StoreUnavailable as exc:
            # Not charged: the provider counted the tokens, the fleet cannot now. The
            # budget is over-spent by the difference at most, once.
            down.cover(exc)
            log.warning(
                "celery-fleet: could not settle %d tokens of %r (Redis unreachable)",
                actual,
                name,
                extra=log_fields(limit=name),
            )
            return 0
        if known:
            self._remember_settled(lease_id)
        if must_hold and not held:
            raise LeaseLost(name, lease_id, "gone when the call was settled")
        return int(delta)

    def renew(self, name: str, leases: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
        """Extend live leases ``(lease id, reserved tokens)`` by the limit's TTL.

        Only pass leases renewed within their TTL by the caller's own clock: one that Redis
        no longer has was lost by Redis (restart, flush, eviction) and is put back while
        the in-flight cap has room. Returns ``(lost ids, restored ids)``.
        """
        return drive(self.renew_steps(name, leases), self.store)

    def renew_steps(
        self, name: str, leases: list[tuple[str, int]]
    ) -> Steps[tuple[list[str], list[str]]]:
        owns = self.store_down.owns
        leases = [(lease, tokens) for lease, tokens in leases if not owns(lease)]
        if not leases:
            return [], []
        cfg = self.limit(name)
        k = self._keys[name]
        head = [
            int(cfg.lease_s * 1000),
            cfg.max_in_flight or 0,
            cfg.adaptive.initial_in_flight if cfg.adaptive else 0,
        ]
        # One call per key with its own cap (its leases zset is renewed too), one for the rest.
        groups: dict[str | None, list[tuple[str, int]]] = {}
        for lease_id, tokens in leases:
            state = self.keyed.state_keys(name, lease_id) if name in self._keyed else None
            kleases = state[1] if state and cfg.keys and cfg.keys.max_in_flight else None
            groups.setdefault(kleases, []).append((lease_id, tokens))
        lost: list[str] = []
        restored: list[str] = []
        for kleases, group in groups.items():
            keys = RENEW.keys_of(k) + ([kleases] if kleases else [])
            args = [*head, *(x for lease_id, tokens in group for x in (lease_id, tokens))]
            got_lost, got_restored = RENEW.read((yield RENEW.call(keys, args)))
            lost += got_lost
            restored += got_restored
        return lost, restored

    def _remember_settled(self, lease_id: str) -> None:
        # Bounded: a lease forgotten here keeps its record until the sweep of expired leases
        # or the hash's TTL (a day without settles) removes it.
        self._settled[lease_id] = None
        if len(self._settled) > SETTLED_MEMORY:
            try:
                self._settled.pop(next(iter(self._settled)), None)
            except (RuntimeError, StopIteration):  # another thread changed it meanwhile
                pass

    def in_flight(self, name: str) -> int:
        """How many leases of ``name`` are live right now (expired ones excluded)."""
        k = self.keys(name)
        now_s, now_us = self.store.call("TIME")
        now_ms = int(now_s) * 1000 + int(now_us) / 1000
        return int(self.store.call("ZCOUNT", k.leases, f"({now_ms}", "+inf"))
