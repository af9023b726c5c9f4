"""Priority lanes of a limit: who is served first, and the share of every budget kept for them.

A limit may declare lanes::

    "openai": {
        "rpm": 600, "max_in_flight": 12,
        "lanes": {"interactive": {"priority": 0, "reserve": 0.34},
                  "batch": {"priority": 1}},
    }

- ``priority``: a small non-negative int, unique per limit; a lower number is served first.
  A waiting ticket of a lane goes before every ticket of the lanes below it (the line's
  order key is ``priority * 2**42 + first-asked ms``, see :mod:`~celery_fleet.admission.line`).
- ``reserve`` (default 0, in ``[0, 1)``): the share of EVERY budget of the limit (its
  in-flight cap and each window's burst) kept for this lane and the lanes above it. The
  reserves of a limit sum to less than 1. The lowest lane takes none (a
  :class:`~celery_fleet.errors.ConfigError`): kept for it and the lanes above, a reserve
  would be kept for every caller, from no one; that lane is owed what the others leave.

A caller of lane L may use the part of each budget not reserved for the lanes above it,
its *usable share* ``1 - sum(reserve of lanes with a lower priority number)``: lane L and
the lanes below it hold at most ``floor(cap * share)`` in flight together and spend at most
that share of each window's burst. With the example, batch may hold at most
``floor(12 * 0.66) = 7`` in flight and spend at most 66% of each window's burst, so an
interactive caller finds room at once behind a saturated batch lane; interactive may use
everything.

Every lane but the first is also *guaranteed* a part of each budget while it waits
(:attr:`Lane.guarantee`): its own reserve, and for the lowest lane what the reserves leave
(its share; nothing when no lane above reserves anything: then priority alone decides, and
a saturated higher lane starves the lower ones). While a lane holds less than
``floor(cap * guarantee)`` in flight and has spent less than that part of each window's
rate lately, it is *owed*: its waiting tickets go before those of the lanes above, which
leave it that budget. So behind a saturated interactive lane, batch still gets 7 of the
12 slots and 66% of each window (a lane's guarantee clock keeps up to the window's burst
of credit, so a full bucket is shared too), and never more while interactive waits
(``store/scripts/_lib/lanes.lua``). With tiny budgets
the floor may round a guarantee to zero (a cap of 1 is interactive's whenever it waits).

A caller that names no lane is in the limit's **lowest-priority lane** (the last one): a
caller that did not say it is urgent must not spend what is kept for the ones that did.
``lane=`` naming a lane the limit does not have, or any lane on a limit without lanes,
is a :class:`~celery_fleet.errors.ConfigError`.

The lane travels with the caller's ticket: a ticket (and so its lease) of a limit with
lanes ends with ``~<priority>`` (:attr:`Lane.marker`), which is how the acquire script's
ARGV is chosen for it (:attr:`Lane.arg`) and how ``celery fleet status`` counts each lane's
leases without a write on the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..checks import check_name, number, reject_unknown
from ..errors import ConfigError

__all__ = ["Lane", "Lanes", "parse_lanes", "check_lane", "MAX_PRIORITY"]

#: Priorities stay small: ``priority * 2**42 + ms`` must stay exact in a Lua double (2**53).
MAX_PRIORITY = 999
_LANE_KEYS = frozenset({"priority", "reserve"})


@dataclass(frozen=True)
class Lane:
    """One lane of a limit: its name, priority, own reserve and usable share (see module)."""

    name: str
    priority: int
    reserve: float
    #: the part of each budget this lane may use: 1 - the reserves of the lanes above
    share: float
    #: the part of each budget it is owed while it waits (0: none; see module)
    guarantee: float = 0.0
    #: (priority, guarantee) of each lane below with a guarantee, highest first
    below: tuple[tuple[int, float], ...] = ()

    @property
    def marker(self) -> str:
        """What a ticket of this lane ends with (``~<priority>``)."""
        return f"~{self.priority}"

    @property
    def arg(self) -> bytes:
        """acquire.lua's ARGV[5] (``store/scripts/_lib/lanes.lua``): ``<priority>`` for a
        lane that may use everything, else ``<priority>:<usable share>``, with
        ``:<guarantee>`` if it has one; then ``|<priority>:<guarantee>`` per lane below."""
        own = f"{self.priority}"
        if self.share < 1.0 or self.guarantee > 0:
            own += f":{self.share!r}"
        if self.guarantee > 0:
            own += f":{self.guarantee!r}"
        return (own + "".join(f"|{p}:{g!r}" for p, g in self.below)).encode()

    def usable(self, budget: float) -> int:
        """Of an in-flight cap of ``budget``, how many this lane may hold (at least 1)."""
        return max(1, math.floor(budget * self.share)) if self.share < 1.0 else int(budget)


@dataclass(frozen=True)
class Lanes:
    """A limit's lanes, highest priority (lowest number) first.

    Example::

        lanes = parse_lanes({"interactive": {"priority": 0, "reserve": 0.3},
                             "batch": {"priority": 1}}, "fleet_limits['openai']['lanes']")
        lanes.get("batch").share   # 0.7
        lanes.get(None).name       # "batch": the lowest-priority lane
    """

    limit: str
    lanes: tuple[Lane, ...]

    @property
    def default(self) -> Lane:
        """The lane of a caller that names none: the lowest-priority one."""
        return self.lanes[-1]

    def get(self, name: str | None) -> Lane:
        """The lane called ``name`` (None: :attr:`default`); :class:`ConfigError` if unknown."""
        if name is None:
            return self.default
        for lane in self.lanes:
            if lane.name == name:
                return lane
        known = ", ".join(lane.name for lane in self.lanes)
        raise ConfigError(f"unknown lane {name!r} of limit {self.limit!r}; its lanes: {known}")

    def of_ticket(self, ticket: str) -> Lane:
        """The lane a ticket (or lease) id says it is in (:attr:`Lane.marker`); a ticket
        without a known marker is in :attr:`default`."""
        # a keyed ticket ends with its key's mark after the lane's (tenancy.KEY_MARK)
        _, sep, tail = ticket.partition("-k")[0].rpartition("~")
        if sep:
            for lane in self.lanes:
                if str(lane.priority) == tail:
                    return lane
        return self.default


def check_lane(lanes: Lanes | None, limit: str, lane: object) -> Lane | None:
    """The :class:`Lane` a caller's ``lane=`` names on limit ``limit`` (None on a limit
    without lanes and no lane named); :class:`ConfigError` for anything else."""
    if lane is not None and not isinstance(lane, str):
        raise ConfigError(f"lane must be a lane name (str) or None, got {lane!r}")
    if lanes is None:
        if lane is None:
            return None
        raise ConfigError(
            f"lane={lane!r} but limit {limit!r} has no lanes "
            f"(declare them in fleet_limits[{limit!r}]['lanes'])"
        )
    return lanes.get(lane)


def _refuse_lowest_reserve(parsed: list[tuple[int, float, str]], setting: str) -> None:
    """A reserve is kept for its lane *and the lanes above*: on the lowest lane that is
    every caller, so it would keep nothing from anyone (the scripts never read it) while
    still counting in the reserves' sum. Refused, saying what does what was meant."""
    priority, reserve, name = parsed[-1]
    if reserve <= 0:
        return
    if len(parsed) == 1:
        raise ConfigError(
            f"{setting}[{name!r}]['reserve'] = {reserve:g}: a limit with one lane has no one "
            f"to keep a reserve from (a reserve is kept for a lane and the lanes above it); "
            f"remove it, or add a lower lane"
        )
    raise ConfigError(
        f"{setting}[{name!r}]['reserve'] = {reserve:g}: {name!r} is the lowest lane "
        f"(priority {priority}), and a reserve is kept for a lane and the lanes above it, "
        f"which for the lowest lane is every caller: it would keep nothing. Remove it: the "
        f"lowest lane is already owed what the reserves above leave it (1 - their sum); "
        f"to owe it more, lower those reserves"
    )


def parse_lanes(raw: object, limit: str, setting: str) -> Lanes | None:
    """Parse a limit's ``lanes`` option (None: the limit has none); every error names the
    setting and the bad value."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            f"{setting} must be a non-empty dict of lane name -> "
            f"{{'priority': int, 'reserve': float}}, got {raw!r}"
        )
    parsed: list[tuple[int, float, str]] = []
    for name, spec in raw.items():
        where = f"{setting}[{name!r}]"
        check_name(name, f"{setting} key", colon=False)
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a dict like {{'priority': 0}}, got {spec!r}")
        reject_unknown(spec, _LANE_KEYS, where)
        priority = spec.get("priority")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(
                f"{where}['priority'] must be an int 0..{MAX_PRIORITY}, got {priority!r}"
            )
        if not 0 <= priority <= MAX_PRIORITY:
            raise ConfigError(f"{where}['priority'] must be in 0..{MAX_PRIORITY}, got {priority!r}")
        reserve = number(spec.get("reserve", 0.0), f"{where}['reserve']", lo=0.0, hi_open=1.0)
        parsed.append((priority, reserve, name))
    parsed.sort()
    for (p1, _, n1), (p2, _, n2) in zip(parsed, parsed[1:], strict=False):
        if p1 == p2:
            raise ConfigError(f"{setting}: lanes {n1!r} and {n2!r} both have priority {p1}")
    _refuse_lowest_reserve(parsed, setting)
    total = sum(reserve for _, reserve, _ in parsed)
    if total >= 1.0:
        raise ConfigError(
            f"{setting}: the reserves sum to {total:g}; they must leave something (sum < 1)"
        )
    shares, above = [], 0.0
    for _, reserve, _ in parsed:
        shares.append(1.0 - above)
        above += reserve
    # every lane but the first is owed its reserve; the lowest, what the reserves leave
    owed = [0.0] + [reserve for _, reserve, _ in parsed[1:-1]]
    if len(parsed) > 1:
        # what the reserves above leave; none reserved: priority alone, nothing owed
        owed.append(shares[-1] if shares[-1] < 1.0 else 0.0)
    lanes = []
    for i, (priority, reserve, name) in enumerate(parsed):
        lower = zip(parsed[i + 1 :], owed[i + 1 :], strict=True)
        below = tuple((p, g) for (p, _, _), g in lower if g > 0)
        lanes.append(Lane(name, priority, reserve, shares[i], owed[i], below))
    return Lanes(limit, tuple(lanes))
