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
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import redis

from celery_fleet.quality.breaker import _limits_args
from celery_fleet.quality.config import QualityConfig
from celery_fleet.store.specs import QUALITY_COUNT, QUALITY_READ, QualityReply
from celery_fleet.store.sync import script_source

__all__ = ["ClockedBreaker", "Recovery", "recovery_run", "clocked_source"]

_TIME = "local t = redis.call('TIME')\n  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000"


def clocked_source(name: str, tree: str | None = None) -> str:
    """Script ``name`` with ``q_now()`` reading the last ARGV (ms) instead of Redis TIME;
    ``tree``: from another checkout of the package (a baseline measured in the same run)."""
    text = script_source(name) if tree is None else _source_in(tree, name)
    if _TIME not in text:
        raise RuntimeError(f"{name}: q_now() no longer reads TIME as expected; update the harness")
    return text.replace(_TIME, "return tonumber(ARGV[#ARGV])")


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
        args = [verdict, why, *_limits_args(self.cfg), self.cfg.baseline_calls, now_ms]
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
