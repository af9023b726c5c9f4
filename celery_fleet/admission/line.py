"""The line: callers refused by a limit wait in order of age, woken rather than polling.

A caller that means to wait (``join=True``) and is refused takes a ticket,
ordered by ``(lane priority, first-asked time)``, and from then on nobody younger (nor
any caller of a lower lane, see :mod:`~celery_fleet.admission.lanes`) passes it: a
budget that frees up goes to the oldest ticket, whoever asks first. The waiter blocks on
its wake-up; the release that frees an in-flight slot, or the admission of the ticket
before it, wakes it, so waiters do not poll. A ticket is a lease: it expires
``TICKET_TTL_MS`` after its holder last asked, and a woken holder that does not ask within
``WAKE_GRACE_MS`` loses it, so a SIGKILLed waiter stops blocking the line. The age travels
with the caller (``since_ms``): asking again with it, even after the ticket expired or a
task was rescheduled, puts the caller back in its old place. With nobody waiting the line
costs one ``ZCARD`` inside the same single round trip.

Where it lives (all under the limit's hash tag, beside the admission keys):

- ``{ns:limit}:line``: zset, ticket id -> order key ``priority * LANE_SPAN + first-asked
  ms``: the priority of the caller's lane (0 on a limit without lanes) goes first.
- ``{ns:limit}:waiting``: zset, ticket id -> expiry (ms).
- ``{ns:limit}:wake:<tag>``: list of the tickets of one process to wake (a ticket's first 8
  characters are its process's tag); the process's one listener of the limit pops it
  (:mod:`celery_fleet.store.wakeups`).

The decisions are made inside ``acquire.lua`` (who may pass), ``release.lua`` (wake the first
when a slot frees up) and ``leave.lua``; the sweep and wake-up are ``scripts/_lib/line.lua``. This
module holds the constants the scripts are given and the helpers around them.
"""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["TICKET_TTL_MS", "WAKE_GRACE_MS", "REFRESH_S", "LANE_SPAN", "check_since", "ages"]

#: A ticket whose holder has not asked for this long is dropped from the line.
TICKET_TTL_MS = 30_000
#: A woken waiter must ask within this, or it is taken for dead and loses its ticket.
WAKE_GRACE_MS = 2_000
#: Waiters re-ask at least this often, which keeps their tickets alive.
REFRESH_S = TICKET_TTL_MS / 3000.0
#: Order keys: lane * LANE_SPAN + first-asked ms (ms since the epoch stay below 2**42).
LANE_SPAN = 2**42


def check_since(since_ms: object) -> int:
    """An order key's age as whole ms since the epoch (0 = now), or :class:`ConfigError`."""
    if isinstance(since_ms, bool) or not isinstance(since_ms, int | float):
        raise ConfigError(f"since_ms must be a number of ms (Redis clock), got {since_ms!r}")
    if not 0 <= since_ms < LANE_SPAN:
        raise ConfigError(f"since_ms must be in [0, 2**42) ms, got {since_ms!r}")
    return int(since_ms)


def ages(reply: list[object]) -> list[tuple[str, float]]:
    """``ZRANGE line 0 -1 WITHSCORES`` as ``(ticket, first-asked ms)`` pairs, oldest first.

    redis-py pairs members and scores up (``[[member, score], ...]``) or not, by protocol
    version: both are read.
    """
    flat = [x for item in reply for x in (item if isinstance(item, list | tuple) else [item])]
    out = []
    for member, score in zip(flat[::2], flat[1::2], strict=True):
        ticket = member.decode() if isinstance(member, bytes) else str(member)
        out.append((ticket, float(score) % LANE_SPAN))  # type: ignore[arg-type]
    return out
