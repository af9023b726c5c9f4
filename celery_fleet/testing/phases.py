"""Capacity limits and the timeline of phases (capacity cuts, outages, garbage) of the simulator.

A scenario such as "the provider halves its concurrency at t=10 s, returns 503 from t=30 s
to 40 s, then answers empty completions for 5 s" is a list of :class:`Phase` values; the
CLI spells the same thing ``--phase 10:25:max_in_flight=4 --phase 30:40:status=503``.
A phase's capacity may also be *above* what a user declares (the provider's real limit:
its rate-limit headers report it), and its garbage may be one kind in a share of answers
(``--phase 0:600:garbage=refusal,share=0.02``: a 2% base rate of refusals).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .garbage import KINDS

__all__ = ["Limits", "Phase", "Effect", "effective_at", "parse_phase"]


@dataclass(frozen=True)
class Limits:
    """The capacity of the simulated provider; ``None`` in a field means unlimited.

    Example::

        Limits(rpm=600, tpm=90_000, max_in_flight=8)
    """

    rpm: float | None = None
    tpm: float | None = None
    max_in_flight: int | None = None

    def check(self, burst_s: float, where: str = "") -> None:
        """Raise ``ValueError`` naming the setting if a limit can never admit a request.

        A per-minute limit whose bucket holds less than one request (``rpm * burst_s / 60 < 1``)
        would refuse everything forever, which is a configuration mistake, not a scenario.
        """
        at = f" in {where}" if where else ""
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and value * burst_s / 60.0 >= 1.0):
                raise ValueError(f"{name}={value!r}{at}: need {name} * burst_s / 60 >= 1")
        if self.max_in_flight is not None and not self.max_in_flight >= 1:
            raise ValueError(f"max_in_flight={self.max_in_flight!r}{at}: need >= 1 or None")


@dataclass(frozen=True)
class Phase:
    """A window ``[start, end)`` (seconds since the simulator started) that changes its behaviour.

    Capacity fields (``rpm``, ``tpm``, ``max_in_flight``) replace the base limit while the
    phase is active; ``None`` leaves it unchanged. ``status`` answers every request with that
    HTTP error (e.g. 503) without charging anything; ``garbage`` answers 200 with useless
    output of one kind (:data:`~celery_fleet.testing.garbage.KINDS`: ``"empty"`` (also
    ``True``), ``"truncated"``, ``"refusal"``, ``"invalid_json"``, ``"repetition"``) in a
    ``share`` of its answers (drawn per answer; charged and delayed like a normal one).
    When phases overlap, later ones in the list win field by field.

    Example::

        Phase(start=10, end=25, max_in_flight=4)   # capacity cut
        Phase(start=0, end=60, rpm=900)            # real capacity above a declared 600
        Phase(start=30, end=40, status=503)        # outage
        Phase(start=40, end=45, garbage=True)      # empty answers
        Phase(start=45, end=90, garbage="refusal", share=0.2)   # a fifth are refusals
    """

    start: float
    end: float
    rpm: float | None = None
    tpm: float | None = None
    max_in_flight: int | None = None
    status: int | None = None
    garbage: bool | str = False
    share: float = 1.0

    def __post_init__(self) -> None:
        if self.garbage is True:
            object.__setattr__(self, "garbage", "empty")
        if self.garbage not in (False, "") and self.garbage not in KINDS:
            raise ValueError(f"phase garbage must be one of {KINDS} or True, got {self.garbage!r}")
        if not 0 < self.share <= 1:
            raise ValueError(f"phase share must be in (0, 1], got {self.share!r}")
        if not (0 <= self.start < self.end):
            raise ValueError(
                f"phase needs 0 <= start < end, got start={self.start!r} end={self.end!r}"
            )
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"phase status must be an HTTP error 400..599, got {self.status!r}")
        if self.status is not None and self.garbage:
            raise ValueError("a phase cannot set both status and garbage")
        changes = (self.rpm, self.tpm, self.max_in_flight, self.status)
        if all(v is None for v in changes) and not self.garbage:
            raise ValueError(f"phase {self.start}:{self.end} changes nothing")

    def active(self, t_s: float) -> bool:
        """Whether the phase applies at ``t_s`` seconds since start."""
        return self.start <= t_s < self.end

    def apply(self, limits: Limits) -> Limits:
        """``limits`` with this phase's capacity fields substituted."""
        return replace(
            limits,
            rpm=limits.rpm if self.rpm is None else self.rpm,
            tpm=limits.tpm if self.tpm is None else self.tpm,
            max_in_flight=limits.max_in_flight
            if self.max_in_flight is None
            else self.max_in_flight,
        )


@dataclass(frozen=True)
class Effect:
    """What the timeline says at one instant: the limits in force, a forced status, and the
    garbage kind ("" for none) with the share of answers it takes."""

    limits: Limits
    status: int | None = None
    garbage: str = ""
    share: float = 1.0


def effective_at(t_s: float, base: Limits, phases: Sequence[Phase]) -> Effect:
    """Fold the phases active at ``t_s`` over ``base``, later phases winning."""
    limits, status, garbage, share = base, None, "", 1.0
    for phase in phases:
        if phase.active(t_s):
            limits = phase.apply(limits)
            if phase.status is not None:
                status, garbage = phase.status, ""
            elif phase.garbage:
                status, garbage, share = None, str(phase.garbage), phase.share
    return Effect(limits, status, garbage, share)


_INT_KEYS = {"max_in_flight", "status"}
_FLOAT_KEYS = {"rpm", "tpm", "share"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_phase(text: str) -> Phase:
    """Parse the CLI form ``START:END:key=val[,key=val]`` into a :class:`Phase`.

    Keys are the :class:`Phase` fields (``max-in-flight`` is accepted for ``max_in_flight``);
    ``garbage`` takes 1/0/true/false or a kind (``refusal``), ``share`` a fraction. Errors
    name the offending part.

    Example::

        parse_phase("10:25:max_in_flight=4,rpm=300") == Phase(10, 25, rpm=300, max_in_flight=4)
    """
    parts = text.split(":", 2)
    if len(parts) != 3 or not parts[2]:
        raise ValueError(f"phase {text!r}: expected START:END:key=val[,key=val]")
    try:
        start, end = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"phase {text!r}: START and END must be numbers") from None
    fields: dict[str, object] = {}
    for item in parts[2].split(","):
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        raw = raw.strip()
        if not sep or not raw:
            raise ValueError(f"phase {text!r}: {item!r} is not key=val")
        try:
            if key in _INT_KEYS:
                fields[key] = int(raw)
            elif key in _FLOAT_KEYS:
                fields[key] = float(raw)
            elif key == "garbage" and raw.lower() in _TRUE | _FALSE:
                fields[key] = raw.lower() in _TRUE
            elif key == "garbage" and raw.lower() in KINDS:
                fields[key] = raw.lower()
            else:
                raise KeyError(key)
        except KeyError:
            known = sorted(_INT_KEYS | _FLOAT_KEYS | {"garbage"})
            raise ValueError(
                f"phase {text!r}: unknown key or value {item!r} (keys: {known})"
            ) from None
        except ValueError:
            raise ValueError(f"phase {text!r}: bad value in {item!r}") from None
    if any(isinstance(v, float) and not math.isfinite(v) for v in fields.values()):
        raise ValueError(f"phase {text!r}: limits must be finite")
    return Phase(start, end, **fields)  # type: ignore[arg-type]
