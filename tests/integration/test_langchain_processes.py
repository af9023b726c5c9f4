"""FleetRateLimiter is fleet-wide: two processes share one rate, the provider sees it.

Two Python processes, each calling a real ``ChatOpenAI(rate_limiter=FleetRateLimiter(...))``
from 4 threads, start together against a :class:`ProviderSim` that allows 12 requests a
second (6 at once): the fleet's 10 a second, shared, draws no 429. Each process on a
namespace of its own (a per-process limiter, like LangChain's ``InMemoryRateLimiter``)
sends 20 a second together and draws 429s: the scenario is one only a shared limit passes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("langchain_openai")

from celery_fleet.testing import ProviderSim

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CALLS = 15


def run_two(redis_url: str, namespaces: tuple[str, str], sim: ProviderSim) -> list[dict[str, int]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.langchain_agents",
                redis_url,
                ns,
                sim.base_url,
                str(CALLS),
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for ns in namespaces
    ]
    try:
        for p in procs:  # both built and connected: then both start at once
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def provider() -> ProviderSim:
    # 12 requests a second, 6 at once from a full bucket; no token or concurrency limit
    return ProviderSim(rpm=720, tpm=None, max_in_flight=None, burst_s=0.5, latency=0.01).start()


def test_two_processes_share_the_fleets_rate_and_draw_no_429(
    redis_url: str, namespace: str
) -> None:
    sim = provider()
    try:
        results = run_two(redis_url, (namespace, namespace), sim)
        stats = sim.stats()
    finally:
        sim.stop()
    assert [r["ok"] for r in results] == [CALLS, CALLS], results
    assert stats["ok"] == 2 * CALLS and stats["rate_limited"]["requests"] == 0, stats


def test_a_limiter_per_process_draws_429s(redis_url: str, namespace: str) -> None:
    sim = provider()
    try:
        results = run_two(redis_url, (namespace, f"{namespace}-b"), sim)
        stats = sim.stats()
    finally:
        sim.stop()
    assert stats["rate_limited"]["requests"] > 0, stats
    assert sum(r["failed"] for r in results) == stats["rate_limited"]["requests"]
