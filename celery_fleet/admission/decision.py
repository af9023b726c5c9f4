"""What admission answers, and where a limit's state lives: the types every layer shares.

:class:`Decision` (go, or wait N ms and why), :class:`Release` (what giving a slot back
found), :class:`LimitKeys` (a limit's Redis keys, all under one hash tag) and the helpers
that read a script's raw numbers safely. Also each limit's fixed script
arguments (:func:`acquire_args`, :func:`release_args`, :func:`release_lean_args`), when a
release may go lean (:func:`lean_release`), and how a release's reply reads
(:func:`read_release`), as an acquire's does (:func:`read_acquire`). Kept apart from
:mod:`celery_fleet.admission.core`, which sends the script calls.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass
from typing import Any

from ..store.specs import AcquireReply, ReleaseReply
from .config import TOKENS, LimitConfig, Window
from .discover import cap_bound
from .line import TICKET_TTL_MS, WAKE_GRACE_MS

__all__ = [
    "Decision",
    "Release",
    "LimitKeys",
    "new_lease_id",
    "process_tag",
    "ticket_tag",
    "clamp_wait_ms",
    "acquire_args",
    "release_args",
    "release_lean_args",
    "lean_release",
    "read_release",
    "read_acquire",
    "key_token_args",
    "MAX_WAIT_MS",
]

#: No wait reported to a caller is longer than this (a year), whatever Redis holds.
MAX_WAIT_MS = 366 * 86_400_000


@dataclass(frozen=True)
class LimitKeys:
    """The Redis keys of one limit, all in one hash slot."""

    ctl: str
    leases: str
    settled: str
    line: str
    breaker: str
    waiting: str
    wake: str  # a prefix: wake + a ticket's process tag is that process's wake-up list

    @classmethod
    def build(cls, namespace: str, limit: str) -> LimitKeys:
        tag = f"{{{namespace}:{limit}}}"
        parts = ("ctl", "leases", "settled", "line", "breaker", "waiting", "wake:")
        return cls(*(f"{tag}:{part}" for part in parts))


@dataclass(frozen=True)
class Decision:
    """The answer to one admission request.

    ``allowed`` with a ``lease_id`` when admitted; otherwise ``wait_ms`` until the same
    request would be admitted and ``reason``: ``"circuit_open"``, ``"paused"``,
    ``"in_flight"``, ``"queued"`` (older tickets come first) or the window that refused,
    e.g. ``"tokens/60s"``. ``in_flight`` counts live leases (including this one when
    admitted); ``at_ms`` is the Redis clock at the decision; ``probe`` marks the one call a
    half-open breaker lets through; ``ahead`` is how many tickets stand before the caller
    and ``line`` how many wait in all. ``place``: on a limit with keys, the fair-share
    place (virtual start tag) a refused ticket holds in line (0: none), for
    :meth:`~celery_fleet.admission.core.Admission.order_of` to keep across tickets.
    """

    limit: str
    allowed: bool
    wait_ms: int
    lease_id: str | None
    reason: str
    in_flight: int
    tokens: int
    at_ms: float
    probe: bool = False
    ahead: int = 0
    line: int = 0
    place: float = 0.0

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True)
class Release:
    """What release found: whether the lease was still held, for how long, the breaker
    transition this call caused (``"open"``, ``"closed"`` or ``""``) and the adaptive cap."""

    released: bool
    held_ms: int
    at_ms: float
    transition: str = ""
    cap: float = 0.0


#: This process's tag (pid, 8 hex characters): the first part of every ticket it makes.
_tag: list[object] = [None, ""]

#: The random part of ticket ids: a generator of this module's own (a caller's
#: ``random.seed()`` must not make a process repeat its ids), seeded from ``os.urandom``,
#: and again in a forked child (:func:`_after_fork`), so parent and child never share a
#: sequence; the process tag (``os.urandom`` too) sets processes apart anyway.
_rng = random.Random()
_bits = _rng.getrandbits


def process_tag() -> str:
    """8 random hex characters naming this process (new after a fork): a ticket starts with
    it, and the line wakes a ticket on its process's list (scripts/_lib/line.lua)."""
    if _tag[0] != os.getpid():
        _tag[0], _tag[1] = os.getpid(), os.urandom(4).hex()
    return str(_tag[1])


def new_lease_id() -> str:
    """A ticket / lease id: this process's tag and 64 random bits (unique enough, cheaper
    than uuid4 on the hot path; no syscall: ``os.urandom`` seeds the generator only, and a
    fork clears the tag and reseeds it, see :func:`_after_fork`)."""
    tag = _tag[1]
    if not tag:
        tag = process_tag()
    return f"{tag}{_bits(64):016x}"


def _after_fork() -> None:
    """In a forked child: a tag and a random sequence of its own (Python runs this for
    ``os.fork()`` and every multiprocessing/billiard fork)."""
    _tag[0], _tag[1] = None, ""
    _rng.seed()


os.register_at_fork(after_in_child=_after_fork)


def ticket_tag(ticket: str) -> str:
    """The process tag of a ticket: its first 8 characters (all of a shorter one)."""
    return ticket[:8]


def _reason(field: str) -> str:
    if field[:4] == "key:":  # a key's own window: "key requests/60s"
        return "key " + _reason(field[4:])
    if ":" not in field:
        return field
    kind, period = field.split(":", 1)
    return f"{'requests' if kind == 'r' else 'tokens'}/{period}s"


def clamp_wait_ms(wait_ms: object) -> int:
    """A wait from Redis as an int in ``[0, MAX_WAIT_MS]``, whatever the store held."""
    try:
        wait: int = int(wait_ms)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return MAX_WAIT_MS
    return min(max(wait, 0), MAX_WAIT_MS)


def _doubles(*values: float) -> bytes:
    """Numbers a script reads with one ``struct.unpack`` (cheaper in Redis than a tonumber
    per argument): little-endian IEEE doubles."""
    return struct.pack(f"<{len(values)}d", *values)


def acquire_args(cfg: LimitConfig) -> list[bytes]:
    """The acquire script's fixed arguments for a limit: its constants, then its windows."""
    constants = _doubles(
        cfg.lease_s * 1000,
        cap_bound(cfg),
        cfg.adaptive.initial_in_flight if cfg.adaptive else 0,
        int(cfg.breaker.reset_timeout_s * 1000) if cfg.breaker else 0,
        TICKET_TTL_MS,
        WAKE_GRACE_MS,
        len(cfg.windows),
        *(x for w in cfg.windows for x in (w.emission_ms, w.tolerance_ms)),
        *(cfg.discover.acquire_tail() if cfg.discover else ()),
    )
    return [constants, *(w.field.encode() for w in cfg.windows)]


def key_token_args(windows: tuple[Window, ...]) -> list[object]:
    """settle's arguments for a key's own token windows: their number, then per window
    its field, T and how far ahead of now its arrival time may go (as for the limit)."""
    token = [w for w in windows if w.dimension == TOKENS]
    triples = (
        (w.field, repr(w.emission_ms), repr(w.tolerance_ms + w.period_s * 1000.0)) for w in token
    )
    return [len(token), *(x for t in triples for x in t)]


def release_args(cfg: LimitConfig) -> list[bytes]:
    """The release script's fixed arguments for a limit: the line's, the adaptive and the
    breaker parameters (zeros when the limit has none), as doubles."""
    a, b = cfg.adaptive, cfg.breaker
    adaptive = (
        (
            1,
            cap_bound(cfg),
            a.min_in_flight,
            a.initial_in_flight,
            a.increase,
            a.decrease,
            a.probe_interval_s * 1000,
            (a.latency_target_s or 0) * 1000,
        )
        if a
        else (0,) * 8
    )
    breaker = (
        (1, b.failure_rate, b.min_calls, b.window_s * 1000, int(b.count_rate_limits))
        if b
        else (0,) * 5
    )
    discover = cfg.discover.release_tail() if cfg.discover else ()
    return [_doubles(cap_bound(cfg), TICKET_TTL_MS, WAKE_GRACE_MS, *adaptive, *breaker, *discover)]


def release_lean_args(cfg: LimitConfig) -> list[bytes] | None:
    """The lean release's fixed arguments for a limit (release_lean.lua: the line's
    constants), or None when its releases must all run release.lua: a breaker counts every
    outcome, an adaptive cap and capacity discovery learn from it."""
    if cfg.breaker or cfg.adaptive or cfg.discover:
        return None
    return [_doubles(cap_bound(cfg), TICKET_TTL_MS, WAKE_GRACE_MS)]


def lean_release(lease_id: str, retry_after_ms: int, settled: bytes, clock: bool) -> bool:
    """Whether a release of ``lease_id`` on a limit that has a lean release may take it:
    release.lua would do nothing but give the lease back and wake the line. Not when it
    pauses the limit (``retry_after_ms``), drops a settled record, reads the clock for its
    caller, or samples the hold time: release.lua samples one lease in 32, those acquired
    at a microsecond divisible by 32 (the lease's first field, see acquire.lua)."""
    if retry_after_ms or clock or settled != b"0":
        return False
    acquired_us = lease_id.partition(".")[0]
    return not (acquired_us.isdigit() and int(acquired_us) % 32 == 0)


def read_release(reply: Any) -> ReleaseReply:
    """A release's reply as a :class:`ReleaseReply`: release.lua's five fields, or the lean
    release's one ``released`` flag (its clock fields 0, no transition, no cap)."""
    if reply.__class__ is int:
        return ReleaseReply(reply, 0, 0, "", 0)
    return tuple.__new__(ReleaseReply, reply)


def read_acquire(reply: Any) -> AcquireReply:
    """An acquire's reply as an :class:`AcquireReply`.

    The common admission (no probe, nobody in line) answers the lease alone, one bulk
    string: its first two fields are the Redis time (µs) and the leases in flight then,
    this one included (``"<acquired µs>.<in flight>.<tokens>.<id>"``, acquire.lua), so
    nothing is lost. Every other answer is the eight-element array.
    """
    cls = reply.__class__
    if cls is bytes:
        now_us, in_flight, _rest = reply.split(b".", 2)
        return AcquireReply(1, 0, reply, int(in_flight), int(now_us), 0, 0, 0)
    if cls is str:  # a client that decodes replies
        now_us, in_flight, _rest = reply.split(".", 2)
        return AcquireReply(1, 0, reply, int(in_flight), int(now_us), 0, 0, 0)
    return tuple.__new__(AcquireReply, reply)
