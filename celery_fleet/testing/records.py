"""The provider simulator's request log: a :class:`RequestRecord` per request, and counters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RequestRecord", "summarize"]


@dataclass(frozen=True)
class RequestRecord:
    """One chat completion request as the simulator saw it, logged when it was decided (arrival).

    Tests assert on these instead of on timing: which limit refused, what was charged, how
    many requests were in flight, which task sent it.

    - ``t_s``: seconds since the simulator started (its phase timeline).
    - ``outcome``: ``"ok"``, ``"garbage"``, ``"429"``, ``"400"`` or a phase status (``"503"``);
      ``status`` is the HTTP status sent.
    - ``limit``: for a 429, ``"requests"``, ``"tokens"`` or ``"concurrency"``.
    - ``cost``: the request's TPM cost (charged only when admitted).
    - ``latency_s``: the simulated service time of an admitted request.
    - ``in_flight``: requests being served when it arrived (not counting itself).
    - ``task_id``: the ``x-fleet-task-id`` (or ``x-task-id``) header.
    - ``retry_after_ms``: the hint of a 429 (None when it can never pass).
    - ``completion_tokens``: the ``usage`` reported (0 for empty garbage).
    - ``kind``: for garbage, its kind (``"empty"``, ``"refusal"``, ...; see ``Phase``).

    Example::

        assert [r.limit for r in sim.log if r.outcome == "429"] == ["tokens"]
    """

    t_s: float
    outcome: str
    status: int
    limit: str | None = None
    cost: int = 0
    latency_s: float = 0.0
    in_flight: int = 0
    task_id: str | None = None
    retry_after_ms: int | None = None
    completion_tokens: int = 0
    kind: str = ""

    @property
    def admitted(self) -> bool:
        """Whether the request was charged and served (``ok`` or ``garbage``)."""
        return self.outcome in ("ok", "garbage")


def summarize(log: Sequence[RequestRecord]) -> dict[str, Any]:
    """Counters over a log: outcomes, 429s by refusing limit, peak in flight, tokens charged.

    ``max_in_flight_observed`` is the highest count reached at an admission (the only
    moment the count grows); ``tokens_charged`` sums the cost of admitted requests.
    """
    refused = [r.limit for r in log if r.outcome == "429"]
    admitted = [r for r in log if r.admitted]
    return {
        "requests": len(log),
        "ok": sum(r.outcome == "ok" for r in log),
        "garbage": sum(r.outcome == "garbage" for r in log),
        "garbage_kinds": _kinds(log),
        "rate_limited": {dim: refused.count(dim) for dim in ("requests", "tokens", "concurrency")},
        "errors_503": sum(r.outcome == "503" for r in log),
        "errors_other": sum(r.status >= 500 and r.outcome != "503" for r in log),
        "bad_requests": sum(r.outcome == "400" for r in log),
        "max_in_flight_observed": max((r.in_flight + 1 for r in admitted), default=0),
        "tokens_charged": sum(r.cost for r in admitted),
        "completion_tokens": sum(r.completion_tokens for r in admitted),
    }


def _kinds(log: Sequence[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in log:
        if r.outcome == "garbage":
            counts[r.kind] = counts.get(r.kind, 0) + 1
    return counts
