"""The quality breaker's real scripts on a real Redis, on a simulated clock.

``quality_count.lua`` and ``quality_read.lua`` read Redis ``TIME``; here the one line of
``_lib/quality.lua`` that does (``q_now``) reads the last ARGV instead, so a run of hours
of traffic at 1 judged call per second takes a second, and a test's timeline is exact.
Everything else is the shipped text. Used by ``tests/test_quality_recovery.py`` and by
``benchmarks/quality.py`` (the recovery part).

Example::

    breaker = ClockedBreaker(client, "{bench:llm}:quality", QualityConfig())
    breaker.count(1_000.0, garbage=False)      # at t = 1 s
    breaker.read(12_500.0).state               # "closed"
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import redis

from celery_fleet.quality.breaker import _limits_args
from celery_fleet.quality.config import QualityConfig
from celery_fleet.store.specs import QUALITY_COUNT, QUALITY_READ, QualityReply
from celery_fleet.store.sync import script_source

__all__ = [
    "ClockedBreaker",
    "Recovery",
    "clocked_source",
    "incident_row",
    "recovery_figures",
    "recovery_row",
    "recovery_run",
    "steady_opens",
]

_TIME = "local t = redis.call('TIME')\n  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000"


def clocked_source(name: str, tree: str | None = None) -> str:
    """Script ``name`` with ``q_now()`` reading the last ARGV (ms) instead of Redis TIME;
    ``tree``: from another checkout of the package (a baseline measured in the same run)."""
    text = script_source(name) if tree is None else _source_in(tree, name)
    if _TIME not in text:
        raise RuntimeError(f"{name}: q_now() no longer reads TIME as expected; update the harness")
    return text.replace(_TIME, "return tonumber(ARGV[#ARGV])")


@cache
def _source_in(tree: str, name: str) -> str:
    code = "import sys; from celery_fleet.store.sync import script_source as s; "
    code += f"sys.stdout.write(s({name!r}))"
    env = {**os.environ, "PYTHONPATH": tree}
    # cwd=tree: `python -c` puts the working directory first on sys.path
    return subprocess.check_output([sys.executable, "-c", code], env=env, cwd=tree).decode()


class ClockedBreaker:
    """One limit's quality breaker, its scripts (this tree's, or ``tree``'s) run at the
    times given (ms)."""

    def __init__(
        self, client: redis.Redis, key: str, cfg: QualityConfig, tree: str | None = None
    ) -> None:
        self.client, self.key, self.cfg = client, key, cfg
        self._count = client.register_script(clocked_source("quality_count", tree))
        self._read = client.register_script(clocked_source("quality_read", tree))

    def count(self, now_ms: float, garbage: bool, reasons: str = "empty") -> QualityReply:
        """Count one judged call at ``now_ms``."""
        verdict, why = ("garbage", reasons) if garbage else ("ok", "")
        args = [
            verdict,
            why,
            *_limits_args(self.cfg),
            self.cfg.baseline_calls,
            "",
            "",
            "",
            0,
            now_ms,
        ]
        return QUALITY_COUNT.read(self._count(keys=[self.key], args=args))

    def read(self, now_ms: float) -> QualityReply:
        """Read the state at ``now_ms`` (an open breaker past its reset timeout half-opens)."""
        a = _limits_args(self.cfg)
        return QUALITY_READ.read(self._read(keys=[self.key], args=[a[0], a[1], a[2], a[4], now_ms]))


@dataclass
class Recovery:
    """What one run saw: transitions ``(t_s, state)``, and the open/close delays."""

    transitions: list[tuple[float, str]] = field(default_factory=list)
    opened_after_s: float | None = None
    closed_after_s: float | None = None
    calls: int = 0
    refused: int = 0


def recovery_run(
    client: redis.Redis,
    key: str,
    cfg: QualityConfig,
    rate: float,
    *,
    seed: int,
    warm_s: float,
    burst_s: float,
    after_s: float = 60.0,
    base: float = 0.02,
    bad: float = 0.5,
    pause: bool = True,
    tree: str | None = None,
) -> Recovery:
    """Judged calls at ``rate`` a second (Poisson arrivals): ``warm_s`` at garbage rate
    ``base``, ``burst_s`` at ``bad``, then ``base`` again for up to ``after_s``. With
    ``pause``, a call that finds the breaker open is refused (not counted), as admission
    does; otherwise (``flag``) every call is counted. Delays: the first open after the
    burst began, the first close after it ended (the return to ``base``)."""
    rng = random.Random(seed)
    out = Recovery()
    state = "closed"
    start, end, stop = warm_s, warm_s + burst_s, warm_s + burst_s + after_s
    t = 0.0
    breaker = ClockedBreaker(client, key, cfg, tree)
    while t < stop:
        t += rng.expovariate(rate)
        garbage = rng.random() < (bad if start <= t < end else base)
        now_ms = t * 1000
        if pause and state == "open":
            reply: Any = breaker.read(now_ms)
            state = _note(out, t, reply)
            if state == "open":
                out.refused += 1
                continue
        reply = breaker.count(now_ms, garbage)
        out.calls += 1
        state = _note(out, t, reply)
        if out.opened_after_s is None and t >= start and state == "open":
            out.opened_after_s = round(t - start, 3)
        if t >= end and state == "closed" and any(s == "open" for _, s in out.transitions):
            out.closed_after_s = round(t - end, 3)
            break
    return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _note(out: Recovery, t: float, reply: QualityReply) -> str:
    transition = _text(reply.transition)
    if transition:
        out.transitions.append((round(t, 3), transition))
    return _text(reply.state)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def recovery_row(
    client: redis.Redis,
    namespace: str,
    rate: float,
    seeds: int,
    burst_s: float = 30.0,
    tree: str | None = None,
) -> dict[str, Any]:
    """Recovery at ``rate`` judged calls/s over ``seeds`` runs (``pause``, window
    ``max(30, 60/rate)`` s so that ``min_calls`` fits in it, defaults otherwise): opened
    after the jump to 50%, closed after the return to 2% (median, p90, max), and the
    share of runs closed within 20 s."""
    cfg = QualityConfig(window_s=max(30.0, 60.0 / rate))
    opened, closed = [], []
    for seed in range(seeds):
        key = f"{{{namespace}:rec{rate:g}-{seed}}}:quality"
        run = recovery_run(
            client, key, cfg, rate, seed=seed, warm_s=2 * cfg.window_s + 70, burst_s=burst_s,
            tree=tree,
        )  # fmt: skip
        client.delete(key)
        if run.opened_after_s is not None:
            opened.append(run.opened_after_s)
        if run.closed_after_s is not None:
            closed.append(run.closed_after_s)
    return {
        "rate": rate,
        "burst_s": burst_s,
        "window_s": cfg.window_s,
        "runs": seeds,
        "opened": len(opened),
        "open_median_s": round(statistics.median(opened), 1) if opened else None,
        "closed_median_s": round(statistics.median(closed), 1) if closed else None,
        "closed_p90_s": round(_pct(closed, 0.9), 1) if closed else None,
        "closed_max_s": round(max(closed), 1) if closed else None,
        "within_20s": round(sum(c <= 20 for c in closed) / len(closed), 2) if closed else None,
    }


def incident_row(
    client: redis.Redis,
    namespace: str,
    rate: float,
    bad: float,
    seconds: float,
    tree: str | None = None,
) -> dict[str, Any]:
    """A long incident at garbage rate ``bad``: how many half-opens closed the breaker
    while the garbage went on (false closes), of how many."""
    cfg = QualityConfig(window_s=max(30.0, 60.0 / rate))
    key = f"{{{namespace}:inc{rate:g}-{bad:g}}}:quality"
    warm = 2 * cfg.window_s + 70
    run = recovery_run(
        client, key, cfg, rate, seed=7, warm_s=warm, burst_s=seconds, after_s=0, bad=bad,
        tree=tree,
    )  # fmt: skip
    client.delete(key)
    during = [s for t, s in run.transitions if t >= warm]
    return {"rate": rate, "bad": bad, "half_opens": during.count("half_open"),
            "false_closes": during.count("closed")}  # fmt: skip


def steady_opens(
    client: redis.Redis, namespace: str, rate: float, seconds: float, tree: str | None = None
) -> int:
    """Opens over ``seconds`` of calls at a steady 2% (false opens)."""
    cfg = QualityConfig(window_s=max(30.0, 60.0 / rate))
    key = f"{{{namespace}:steady{rate:g}}}:quality"
    run = recovery_run(
        client, key, cfg, rate, seed=11, warm_s=seconds, burst_s=0, after_s=0, tree=tree
    )
    client.delete(key)
    return sum(s == "open" for _, s in run.transitions)


def recovery_figures(
    client: redis.Redis,
    rates: Sequence[float],
    bursts: Sequence[float],
    seeds: int,
    trees: Mapping[str, str | None],
    incident_s: float,
    steady_s: float,
) -> dict[str, Any]:
    """Per tree (``{"before": "/tmp/before", "after": None}``; None: this one): recovery
    rows per burst length and rate, false closes during ``incident_s`` of 25% and 50%
    garbage (1 and 5 calls/s), and false opens over ``steady_s`` at 2% (1 and 2 calls/s)."""
    ns = f"bench-quality-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"rows": {}, "incidents": {}, "steady": {}}
    for code, tree in trees.items():
        print(f"recovery: {code} ...", file=sys.stderr)
        out["rows"][code] = [
            recovery_row(client, ns, r, seeds, burst, tree=tree) for burst in bursts for r in rates
        ]
        out["incidents"][code] = [
            incident_row(client, ns, r, bad, incident_s, tree=tree)
            for r in (1, 5) for bad in (0.5, 0.25)
        ]  # fmt: skip
        out["steady"][code] = {r: steady_opens(client, ns, r, steady_s, tree=tree) for r in (1, 2)}
    out["incident_s"], out["steady_s"] = incident_s, steady_s
    return out
