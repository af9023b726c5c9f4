"""Every Lua script's KEYS, ARGV and reply, declared once.

A :class:`ScriptSpec` names a script (the store runs it by that name), the folder of
``scripts/`` its ``.lua`` file lives in, its KEYS and ARGV in order, and how its reply is
read: a ``NamedTuple`` with one named field per reply position (or a converter for replies
of no fixed length). Callers build calls and read replies through the spec, so the order
written at the top of each ``.lua`` file is written once more here, and nowhere else.

A key is named as the attribute that holds it on the caller's key object (for a limit:
:class:`~celery_fleet.admission.decision.LimitKeys`), so :meth:`ScriptSpec.keys_of` turns
one into the KEYS list. A last key or argument whose name starts with ``*`` stands for
any number of them.

The hot path stays one EVALSHA and builds nothing per call: acquire and release are
packed once per limit (:meth:`~celery_fleet.store.sync.RedisStore.packed`) with
:meth:`ScriptSpec.keys_of`, and their replies are read as the reply type with
``tuple.__new__`` (no Python frame; about 0.2 µs a reply more than bare unpacking).

Example::

    call = LEAVE.call(LEAVE.keys_of(limit_keys), [ticket, TICKET_TTL_MS, WAKE_GRACE_MS])
    was_in_line = LEAVE.read((yield call))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from .calls import ScriptCall

__all__ = [
    "ScriptSpec",
    "SPECS",
    "SCRIPTS",
    "IDEMPOTENT",
    "AcquireMode",
    "AcquireReply",
    "ReleaseReply",
    "SettleReply",
    "ObserveReply",
    "PeekReply",
    "HandoverReply",
    "ChargeReply",
    "PresenceReply",
    "EnqueueReply",
    "ClaimReply",
    "LockReply",
    "CasReply",
    "ACQUIRE",
    "RELEASE",
    "RELEASE_LEAN",
    "LEAVE",
    "SETTLE",
    "RENEW",
    "OBSERVE",
    "PEEK",
    "BREAKER_ADMIN",
    "LIMIT_CONFIG",
    "EMPTY_MISSING",
    "CHARGE",
    "HANDOVER",
    "PRESENCE",
    "LEDGER_ENQUEUE",
    "LEDGER_CLAIM",
    "LEDGER_RENEW",
    "LEDGER_FINISH",
    "LEDGER_PUBLISHED",
    "LEDGER_LOST",
    "STEP_PUT",
    "DEFER_ADD",
    "DEFER_TAKE",
    "DEFER_ACK",
    "DEFER_FATE",
    "LOCK_ACQUIRE",
    "LOCK_RENEW",
    "LOCK_RELEASE",
    "RECORD_CAS",
    "QualityReply",
    "QUALITY_COUNT",
    "QUALITY_READ",
    "AFFINITY_PRESENCE",
    "AFFINITY_HOMES",
]

R = TypeVar("R")


class _Runs(Protocol):
    def run(self, script: str, keys: list[str], args: list[Any]) -> Any: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class ScriptSpec(Generic[R]):
    """One script: its name, folder, KEYS, ARGV and how to read its reply.

    ``idempotent`` scripts may run twice with the effect of once: the store sends them
    again when the connection drops under them (:data:`IDEMPOTENT`).
    """

    name: str
    folder: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    reply: Callable[[Any], R]
    idempotent: bool = False

    @property
    def path(self) -> str:
        """Where the script's text is, under ``celery_fleet/store/scripts/`` (no suffix)."""
        return f"{self.folder}/{self.name}"

    def keys_of(self, holder: object) -> list[str]:
        """The KEYS list, each key read from the attribute of ``holder`` it is named after."""
        return [getattr(holder, key) for key in self.keys if key[:1] != "*"]

    def call(self, keys: Sequence[str], args: Sequence[Any]) -> ScriptCall:
        """A :class:`~celery_fleet.store.calls.ScriptCall` of this script; the number of
        keys and arguments is checked against the declaration (a caller's slip fails here,
        not as a wrong position inside Lua)."""
        if not (_fits(self.keys, len(keys)) and _fits(self.args, len(args))):
            raise TypeError(
                f"script {self.name!r} takes KEYS {self.keys} and ARGV {self.args}, "
                f"got {len(keys)} keys and {len(args)} arguments"
            )
        return ScriptCall(self.name, list(keys), list(args))

    def read(self, raw: Any) -> R:
        """The reply, read as declared."""
        return self.reply(raw)

    def run(self, store: _Runs, keys: Sequence[str], args: Sequence[Any]) -> R:
        """Run it on a blocking store (:meth:`RedisStore.run`) and read the reply."""
        call = self.call(keys, args)
        return self.reply(store.run(call.script, call.keys, call.args))


def _fits(declared: tuple[str, ...], given: int) -> bool:
    """Whether ``given`` values fit names ``declared`` (a last ``*name`` takes any number)."""
    if declared and declared[-1][:1] == "*":
        return given >= len(declared) - 1
    return given == len(declared)


# -- admission ------------------------------------------------------------------------


class AcquireMode:
    """acquire's ARGV ``join``: what kind of ask this is (bytes, packed as they are)."""

    ASK = b"0"  #: ask once, no ticket (ASK or JOIN + b"|" + a lease: that release rides first)
    JOIN = b"1"  #: a refused caller takes (or keeps) a ticket in line
    RESEND_ASK = b"2"  #: ASK again after the connection dropped: its lease if it admitted
    RESEND_JOIN = b"3"  #: JOIN again after the connection dropped, likewise
    LOOKUP = b"4"  #: only the lease an earlier ask made, or a refusal "gone"


class AcquireReply(NamedTuple):
    """acquire's reply; ``detail`` is the lease when admitted, else the reason."""

    allowed: int
    wait_ms: int
    detail: Any  #: bytes (str on a client that decodes replies)
    in_flight: int
    now_us: int
    #: admitted: 1 for a half-open breaker's probe; refused, on a limit with keys: the
    #: ticket's fair-share place (its start tag, text) when it holds one, else 0
    probe: Any
    ahead: int
    line: int


class ReleaseReply(NamedTuple):
    """release's reply (``now_us`` and ``held_ms`` are 0 when nothing read the clock)."""

    released: int
    now_us: int
    held_ms: int
    transition: Any  #: bytes (str on a client that decodes replies): "", "open", "closed"
    cap: Any  #: the adaptive cap as text, 0 for none


class QualityReply(NamedTuple):
    """quality_count's and quality_read's reply (the quality breaker, quality/breaker.py);
    ``reasons`` only from a read, or a count that changed the state."""

    state: Any  #: bytes or str: "closed", "open", "half_open"
    transition: Any  #: "", "open", "half_open", "closed"
    calls: int  #: judged in the window
    garbage: int
    baseline: Any  #: the rolling baseline garbage rate, as text
    wait_ms: int  #: until it half-opens (0 unless open)
    base_n: int = 0  #: how many calls the baseline weighs (0: a new or lost hash)
    differs: Any = b""  #: the fleet's config fingerprint when the caller's differs
    reasons: tuple[Any, ...] = ()  #: (reason, count, ...)


def _quality_reply(raw: Any) -> QualityReply:
    state, transition, calls, garbage, baseline, wait_ms, base_n, differs = raw[:8]
    return QualityReply(
        state, transition, calls, garbage, baseline, wait_ms, base_n, differs, tuple(raw[8:])
    )


class SettleReply(NamedTuple):
    known: int
    delta: int
    now: int
    held: int


class ObserveReply(NamedTuple):
    lowered: int
    held: int


class PeekReply(NamedTuple):
    """peek's reply: a limit's state now, read without writing (status.py)."""

    now_us: int
    in_flight: int
    oldest_us: int  #: acquire time of the oldest live lease (µs), 0 for none
    waiting: int
    paused_ms: bytes  #: how long a provider's pause still runs (text, "0" for none)
    cap: bytes  #: the stored adaptive cap, "" for none
    rate_factor: bytes  #: the stored adaptive rate factor, "" for none
    cap_in_force: int  #: the in-flight cap admissions are held to (0: none)
    factor: bytes  #: the rate factor in force (adaptive or provider's), as text
    #: the breaker hash's state, opened_at, forced, probe, probe_until, calls, failures
    breaker: list[bytes | str]
    windows: list[Any]  #: per window: units admissible now, units a full bucket holds
    #: per lane asked about: leases in flight (of those read), tickets waiting ([] without)
    lanes: list[Any]
    #: a limit with keys: per busiest key (hash, name, in flight, in line), flat
    keys: list[Any] | None = None


class HandoverReply(NamedTuple):
    moment_ms: int
    now_ms: int


class ChargeReply(NamedTuple):
    charged: int  #: windows charged
    leases: list[Any]  #: the lease entered for each local slot, in order


class PresenceReply(NamedTuple):
    live: int  #: live processes, this one included
    rank: int  #: this one's place among them


class EnqueueReply(NamedTuple):
    """ledger_enqueue's reply: ``started`` a new run under ``run_id``, or the key is live
    in ``state`` (``run_id``: its run; "" for a record older than per-run ids)."""

    started: bool
    run_id: str
    state: str


class ClaimReply(NamedTuple):
    """ledger_claim's reply: ``verdict`` ("run", "done", "failed", "busy") and its detail
    (attempts, the stored result, the error, the wait in ms); ``taken_over`` for "run"."""

    verdict: str
    detail: Any
    taken_over: bool


class LockReply(NamedTuple):
    acquired: int
    value: int  #: the fencing token when acquired, else the ms the holder's lease lasts


class CasReply(NamedTuple):
    written: int
    version: int  #: the record's version now


def _enqueue_reply(raw: Any) -> EnqueueReply:
    if int(raw[0]):
        return EnqueueReply(True, _text(raw[1]), "queued")
    return EnqueueReply(False, _text(raw[2]), _text(raw[1]))


def _claim_reply(raw: Any) -> ClaimReply:
    return ClaimReply(_text(raw[0]), raw[1], len(raw) > 2 and bool(int(raw[2])))


def _pairs(raw: Any) -> list[tuple[str, Any]]:
    return [(_text(raw[i]), raw[i + 1]) for i in range(0, len(raw), 2)]


def _bools(raw: Any) -> list[bool]:
    return [bool(x) for x in raw]


def _renew_reply(raw: Any) -> tuple[list[str], list[str]]:
    ids = [_text(x) for x in raw]
    split = ids.index("+")
    return ids[:split], ids[split + 1 :]


def _peek_reply(raw: Any) -> PeekReply:
    # ... windows, the lanes' nested array (always), the busiest keys' (a limit with keys)
    head, rest = raw[:16], list(raw[16:])
    keys = rest.pop() if len(rest) >= 2 and isinstance(rest[-2], list) else None
    lanes = list(rest.pop())
    return PeekReply._make([*head[:9], list(head[9:16]), rest, lanes, keys])


#: ``lane`` is ``b"0"`` on a limit without lanes, else the caller's lane's ``Lane.arg``:
#: ``<priority>`` or ``<priority>:<usable share>`` (acquire.lua's header says what it does).
ACQUIRE: ScriptSpec[AcquireReply] = ScriptSpec(
    "acquire",
    "admission",
    # a limit with keys: the key's ctl and leases, and after the window fields the key's
    # constants, window fields and name (scripts/_lib/keys.lua)
    keys=("ctl", "leases", "line", "breaker", "waiting", "wake", "settled", "*key_ctl_leases"),
    args=("id", "tokens", "order", "join", "lane", "constants", "*window_fields_key_args"),
    reply=AcquireReply._make,
)
RELEASE: ScriptSpec[ReleaseReply] = ScriptSpec(
    "release",
    "admission",
    keys=("leases", "settled", "ctl", "line", "breaker", "waiting", "wake", "*key_leases"),
    args=("lease", "outcome", "retry_after_ms", "settled", "clock", "constants"),
    reply=ReleaseReply._make,
    idempotent=True,
)
#: The lean release (release_lean.lua): what release does for a limit with no breaker,
#: adaptive cap or discovery, when the call leaves nothing else to do; its reply is the
#: ``released`` flag alone (read as a :class:`ReleaseReply` by ``decision.read_release``).
RELEASE_LEAN: ScriptSpec[ReleaseReply] = ScriptSpec(
    "release_lean",
    "admission",
    keys=("leases", "line", "waiting", "wake", "*key_leases"),
    args=("lease", "line_constants"),
    reply=lambda raw: ReleaseReply(int(raw), 0, 0, "", 0),
    idempotent=True,
)
LEAVE: ScriptSpec[bool] = ScriptSpec(
    "leave",
    "admission",
    keys=("line", "waiting", "wake"),
    args=("ticket", "ticket_ttl_ms", "wake_grace_ms"),
    reply=bool,
    idempotent=True,
)
SETTLE: ScriptSpec[SettleReply] = ScriptSpec(
    "settle",
    "admission",
    keys=("ctl", "settled", "leases", "*key_ctl"),
    # then, with a key's ctl: the key's token windows, their number and triples
    args=("lease", "actual", "reserved", "n_windows", "*field_emission_ceiling"),
    reply=SettleReply._make,
    idempotent=True,
)
RENEW: ScriptSpec[tuple[list[str], list[str]]] = ScriptSpec(
    "renew",
    "admission",
    keys=("leases", "settled", "breaker", "ctl", "*key_leases"),
    args=("lease_ttl_ms", "max_in_flight", "initial_cap", "*lease_tokens"),
    reply=_renew_reply,
    idempotent=True,
)
OBSERVE: ScriptSpec[ObserveReply] = ScriptSpec(
    "observe",
    "admission",
    keys=("ctl", "leases"),
    args=("lease", "provider_factor", "n_windows", "*field_emission_tolerance_units"),
    reply=ObserveReply._make,
    idempotent=True,
)
PEEK: ScriptSpec[PeekReply] = ScriptSpec(
    "peek",
    "admission",
    keys=("ctl", "leases", "line", "breaker"),
    # then the number of lanes and their priorities; a limit with keys: then how many
    # busiest keys to report and their keys' prefix
    args=("oldest_scan", "constants", "*window_fields_lanes_keys"),
    reply=_peek_reply,
    idempotent=True,
)
BREAKER_ADMIN: ScriptSpec[list[Any]] = ScriptSpec(
    "breaker_admin", "admission", keys=("breaker",), args=("operation", "*ago_ms"), reply=list
)
_QUALITY_LIMITS = ("window_ms", "ratio", "min_rate", "min_calls", "reset_ms", "probes")
#: One judged call, counted by the limit's quality breaker (in the release's write).
QUALITY_COUNT: ScriptSpec[QualityReply] = ScriptSpec(
    "quality_count",
    "quality",
    keys=("quality",),
    args=(
        "verdict",
        "reasons",
        *_QUALITY_LIMITS,
        "baseline_calls",
        "config",
        "known_baseline",
        "known_n",
        "known_open_ms",
    ),
    reply=_quality_reply,
)
#: The quality breaker's state (an open one past its reset timeout half-opens).
QUALITY_READ: ScriptSpec[QualityReply] = ScriptSpec(
    "quality_read",
    "quality",
    keys=("quality",),
    args=("window_ms", "ratio", "min_rate", "reset_ms"),
    reply=_quality_reply,
    idempotent=True,
)
#: A limit's runtime override (``fleet.set_limit``), under a version that only grows.
LIMIT_CONFIG: ScriptSpec[CasReply] = ScriptSpec(
    "limit_config",
    "admission",
    keys=("config",),
    args=("limit", "read_version", "fields_json", "floor", "*limits"),
    reply=CasReply._make,
)

# -- resilience -----------------------------------------------------------------------

EMPTY_MISSING: ScriptSpec[int] = ScriptSpec(
    "empty_missing",
    "resilience",
    keys=("ctl",),
    args=("*field_tolerance",),
    reply=int,
    idempotent=True,
)
CHARGE: ScriptSpec[ChargeReply] = ScriptSpec(
    "charge",
    "resilience",
    keys=("ctl", "leases"),
    args=("n_windows", "*field_ms_then_ttl_then_slots"),
    reply=lambda raw: ChargeReply(int(raw[0]), list(raw[1:])),
)
HANDOVER: ScriptSpec[HandoverReply] = ScriptSpec(
    "handover",
    "resilience",
    keys=("handover",),
    args=("down_ms", "ahead_ms", "keep_ms"),
    reply=HandoverReply._make,
    idempotent=True,
)
PRESENCE: ScriptSpec[PresenceReply] = ScriptSpec(
    "presence",
    "resilience",
    keys=("live", "held"),
    args=("process", "ttl_ms", "slots_json"),
    reply=PresenceReply._make,
    idempotent=True,
)

# -- durability -----------------------------------------------------------------------

_LEDGER_KEYS = ("ledger", "history")
LEDGER_ENQUEUE: ScriptSpec[EnqueueReply] = ScriptSpec(
    "ledger_enqueue",
    "ledger",
    _LEDGER_KEYS,
    ("key", "task", "ttl_ms", "run_id", "publish_lease_ms"),
    _enqueue_reply,
)
LEDGER_CLAIM: ScriptSpec[ClaimReply] = ScriptSpec(
    "ledger_claim",
    "ledger",
    _LEDGER_KEYS,
    ("owner", "lease_ms", "ttl_ms", "key", "task", "singleton", "task_id"),
    _claim_reply,
)
#: KEYS: one ledger hash per claim, any number (``call`` takes the keys as given).
LEDGER_RENEW: ScriptSpec[list[bool]] = ScriptSpec(
    "ledger_renew", "ledger", ("*ledgers",), ("*owners_then_lease_ms",), _bools
)
LEDGER_FINISH: ScriptSpec[bool] = ScriptSpec(
    "ledger_finish", "ledger", _LEDGER_KEYS, ("owner", "outcome", "result", "ttl_ms"), bool
)
LEDGER_PUBLISHED: ScriptSpec[bool] = ScriptSpec(
    "ledger_published", "ledger", _LEDGER_KEYS, ("run_id", "outcome", "error", "ttl_ms"), bool
)
LEDGER_LOST: ScriptSpec[bool] = ScriptSpec(
    "ledger_lost", "ledger", _LEDGER_KEYS, ("task_id", "release", "error", "ttl_ms"), bool
)
STEP_PUT: ScriptSpec[bool] = ScriptSpec(
    "step_put", "ledger", ("steps",), ("step", "result", "ttl_ms"), bool
)
DEFER_ADD: ScriptSpec[int] = ScriptSpec(
    "defer_add",
    "defer",
    ("due", "items"),
    ("item", "delay_ms", "message"),
    int,
    idempotent=True,
)
DEFER_TAKE: ScriptSpec[list[tuple[str, Any]]] = ScriptSpec(
    "defer_take", "defer", ("due", "items", "taken"), ("count", "claim_ms"), _pairs
)
DEFER_ACK: ScriptSpec[int] = ScriptSpec(
    "defer_ack", "defer", ("taken", "items", "published"), ("*items",), int, idempotent=True
)
DEFER_FATE: ScriptSpec[str] = ScriptSpec(
    "defer_fate", "defer", ("due", "taken", "published"), ("item",), _text
)

# -- coordination ---------------------------------------------------------------------

LOCK_ACQUIRE: ScriptSpec[LockReply] = ScriptSpec(
    "lock_acquire", "coordination", ("lease", "fence"), ("owner", "lease_ms"), LockReply._make
)
LOCK_RENEW: ScriptSpec[bool] = ScriptSpec(
    "lock_renew", "coordination", ("lease",), ("owner", "lease_ms"), bool
)
LOCK_RELEASE: ScriptSpec[bool] = ScriptSpec(
    "lock_release", "coordination", ("lease", "wake"), ("owner", "wake_keep_ms"), bool
)
RECORD_CAS: ScriptSpec[CasReply] = ScriptSpec(
    "record_cas", "coordination", ("record",), ("version", "value", "ttl_ms"), CasReply._make
)

# -- distribution ---------------------------------------------------------------------


def _texts(raw: Any) -> list[str]:
    return [_text(item) for item in raw]


AFFINITY_PRESENCE: ScriptSpec[list[str]] = ScriptSpec(
    "affinity_presence",
    "distribution",
    ("workers",),
    ("worker", "lease_ms", "announce"),
    _texts,
    idempotent=True,
)
AFFINITY_HOMES: ScriptSpec[list[str]] = ScriptSpec(
    "affinity_homes",
    "distribution",
    ("*homes",),
    ("owner", "lease_ms", "wanted"),
    _texts,
    idempotent=True,
)

#: Every script, by the name the store runs it under.
SPECS: dict[str, ScriptSpec[Any]] = {
    spec.name: spec
    for spec in (
        ACQUIRE, RELEASE, RELEASE_LEAN, LEAVE, SETTLE, RENEW, OBSERVE, PEEK, BREAKER_ADMIN,
        LIMIT_CONFIG,
        EMPTY_MISSING, CHARGE, HANDOVER, PRESENCE,
        LEDGER_ENQUEUE, LEDGER_CLAIM, LEDGER_RENEW, LEDGER_FINISH, LEDGER_PUBLISHED,
        LEDGER_LOST, STEP_PUT, DEFER_ADD, DEFER_TAKE, DEFER_ACK, DEFER_FATE,
        LOCK_ACQUIRE, LOCK_RENEW, LOCK_RELEASE, RECORD_CAS, QUALITY_COUNT, QUALITY_READ,
        AFFINITY_PRESENCE, AFFINITY_HOMES,
    )
}  # fmt: skip
#: The names of every script (each registered once per process).
SCRIPTS = tuple(SPECS)
#: Scripts that may run twice with the effect of once: the store sends them again when
#: the connection drops under them. ``acquire`` is not here: its resend marks itself a
#: retry (:attr:`AcquireMode.RESEND_ASK`) so the script answers with the lease the first
#: send may have made.
IDEMPOTENT = frozenset(spec.name for spec in SPECS.values() if spec.idempotent)
