"""The quality benchmark's arithmetic (benchmarks/quality.py), kept pure so it can be tested.

Everything here reads what a run saw — the provider simulator's request log (``t_s``,
``outcome``) and the quality transitions this process heard (``(t_s, state)``, on the same
timeline) — and turns it into the reported figures and tables. No Redis, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "CapacityPhase",
    "Logged",
    "capacity_rows",
    "capacity_table",
    "delay_after",
    "opens",
    "per_10s",
    "quality_table",
    "recovery_report",
    "recovery_table",
    "wasted_calls",
]


class Logged(Protocol):
    """What is read of a :class:`~celery_fleet.testing.RequestRecord`."""

    @property
    def t_s(self) -> float: ...

    @property
    def outcome(self) -> str: ...


@dataclass(frozen=True)
class CapacityPhase:
    """The provider's real request rate (per minute) over ``[start_s, end_s)`` of a run."""

    start_s: float
    end_s: float
    rpm: float

    @property
    def per_10s(self) -> float:
        return self.rpm / 6


def per_10s(log: Iterable[Logged], start_s: float, end_s: float, outcome: str = "served") -> float:
    """Requests per 10 s over ``[start_s, end_s)``: ``served`` (ok and garbage answers), or
    those of one outcome (``"429"``)."""
    if end_s <= start_s:
        return 0.0
    want = ("ok", "garbage") if outcome == "served" else (outcome,)
    n = sum(start_s <= r.t_s < end_s and r.outcome in want for r in log)
    return n * 10 / (end_s - start_s)


def capacity_rows(
    log: Sequence[Logged], phases: Sequence[CapacityPhase], declared_rpm: float
) -> list[dict[str, Any]]:
    """Per phase: real and declared capacity, what was served (whole phase, and its second
    half once settled) as a share of the real one, and the 429s."""
    rows = []
    for p in phases:
        mid = (p.start_s + p.end_s) / 2
        calls = sum(p.start_s <= r.t_s < p.end_s for r in log)
        refused = sum(p.start_s <= r.t_s < p.end_s and r.outcome == "429" for r in log)
        served = per_10s(log, p.start_s, p.end_s)
        settled = per_10s(log, mid, p.end_s)
        rows.append(
            {
                "phase": f"{p.start_s:g}-{p.end_s:g} s",
                "real_per_10s": round(p.per_10s, 1),
                "declared_per_10s": round(declared_rpm / 6, 1),
                "served_per_10s": round(served, 1),
                "used": round(served / p.per_10s, 3),
                "settled_used": round(settled / p.per_10s, 3),
                "calls": calls,
                "429s": refused,
                "share_429": round(refused / calls, 4) if calls else 0.0,
            }
        )
    return rows


def delay_after(
    transitions: Sequence[tuple[float, str]], start_s: float, state: str = "open"
) -> float | None:
    """Seconds from ``start_s`` to the first transition to ``state`` at or after it (None:
    never)."""
    for t_s, seen in transitions:
        if seen == state and t_s >= start_s:
            return round(t_s - start_s, 3)
    return None


def opens(transitions: Iterable[tuple[float, str]]) -> int:
    """How many times the breaker opened (a healthy run's false opens)."""
    return sum(state == "open" for _, state in transitions)


def wasted_calls(log: Iterable[Logged], start_s: float, end_s: float) -> int:
    """Garbage answers the provider served (and billed) over ``[start_s, end_s)``."""
    return sum(start_s <= r.t_s < end_s and r.outcome == "garbage" for r in log)


def capacity_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one line per mode and phase."""
    head = (
        "| mode | phase | real /10 s | declared /10 s | served /10 s | used of real "
        "| settled (2nd half) | calls | 429s | 429 share |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {mode} | {r['phase']} | {r['real_per_10s']:g} | {r['declared_per_10s']:g} "
        f"| {r['served_per_10s']:g} | {r['used']:.0%} | {r['settled_used']:.0%} | {r['calls']} "
        f"| {r['429s']} | {r['share_429']:.1%} |"
        for mode, rows in runs.items()
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def quality_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per ``on_degraded`` mode, detection, recovery and calls wasted on garbage."""
    head = (
        "| on_degraded | burst | opened after | closed after burst end | garbage served "
        "during burst | of which after open | calls during burst | refused (QualityDegraded) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|\n"
    )

    def secs(v: float | None) -> str:
        return "never" if v is None else f"{v:.2f} s"

    lines = [
        f"| {r['mode']} | {r['burst']} | {secs(r['opened_after_s'])} "
        f"| {secs(r['closed_after_s'])} | {r['garbage_in_burst']} | {r['garbage_after_open']} "
        f"| {r['calls_in_burst']} | {r['refused']} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def recovery_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: per code (``before``/``after``) and judged-call rate, the open and close
    delays of :func:`benchmarks.harness.quality_clock.recovery_row`."""
    head = (
        "| code | 50% for | judged calls/s | window | opened (runs) | opened after (median) "
        "| closed after return to 2%: median | p90 | max | closed within 20 s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} s"

    lines = [
        f"| {code} | {r['burst_s']:g} s | {r['rate']:g} | {r['window_s']:g} s "
        f"| {r['opened']}/{r['runs']} "
        f"| {secs(r['open_median_s'])} | {secs(r['closed_median_s'])} "
        f"| {secs(r['closed_p90_s'])} | {secs(r['closed_max_s'])} "
        f"| {'-' if r['within_20s'] is None else format(r['within_20s'], '.0%')} |"
        for code, rows in runs.items()
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def recovery_report(rec: dict[str, Any], seeds: int) -> str:
    """The recovery part's text: its table, false closes during long incidents and false
    opens over a steady 2% (the figures of ``quality_clock.recovery_figures``)."""
    lines = [
        f"\nQuality breaker recovery on a simulated clock (the shipped scripts, real Redis; "
        f"{seeds} runs per rate, Poisson calls, pause, 2% garbage, 10 or 30 s at 50%, back to 2%; "
        f"window max(30, 60/rate) s, defaults otherwise: reset_timeout 10 s, 20 probes).\n\n",
        recovery_table(rec["rows"]),
        f"\nFalse closes during a {rec['incident_s'] / 60:g}-minute incident "
        "(half-opens that closed while the garbage went on):\n\n",
    ]
    for code, rows in rec["incidents"].items():
        cells = ", ".join(
            f"{r['rate']:g}/s at {r['bad']:.0%}: {r['false_closes']} of {r['half_opens']}"
            for r in rows
        )
        lines.append(f"- {code}: {cells}\n")
    steady = "; ".join(
        f"{code}: " + ", ".join(f"{r}/s {n}" for r, n in per.items())
        for code, per in rec["steady"].items()
    )
    hours = rec["steady_s"] / 3600
    lines.append(f"\nFalse opens over {hours:g} simulated hours at 2%: {steady}.\n")
    return "".join(lines)
