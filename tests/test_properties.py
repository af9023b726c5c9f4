"""Properties under contention: 4 processes hammering one limit, checked from Redis's clock.

Every admission and release carries the Redis TIME at which the script ran, so the
intervals during which leases were held are known exactly, independently of any counter
the implementation keeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from celery_fleet.admission.config import parse_limits

HAMMER = textwrap.dedent(
    """
    import json, random, sys, time
    from celery_fleet import Fleet
    url, ns, limits, seconds, hold_ms, max_tokens = sys.argv[1:7]
    fleet = Fleet(redis_url=url, namespace=ns, limits=json.loads(limits))
    rng = random.Random()
    out = []
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        tokens = rng.randint(1, int(max_tokens)) if int(max_tokens) else 0
        d = fleet.try_acquire("llm", tokens=tokens)
        if not d:
            time.sleep(min(d.wait_ms, 5) / 1000.0)
            continue
        time.sleep(rng.uniform(0, float(hold_ms)) / 1000.0)
        r = fleet.release(d)
        out.append((d.at_ms, r.at_ms, tokens, r.released))
    print(json.dumps(out))
    """
)


def _hammer(
    redis_url: str,
    namespace: str,
    limits: dict,
    seconds: float,
    hold_ms: float,
    max_tokens: int,
    procs: int = 4,
) -> list[tuple[float, float, int, bool]]:
    args = [json.dumps(limits), str(seconds), str(hold_ms), str(max_tokens)]
    running = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, redis_url, namespace, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    records = []
    for p in running:
        stdout, _ = p.communicate(timeout=seconds + 60)
        assert p.returncode == 0
        records += [tuple(r) for r in json.loads(stdout)]
    return records


@pytest.mark.slow
def test_rate_and_tokens_never_exceed_burst_plus_rate_times_t(
    redis_url: str, namespace: str
) -> None:
    limits = {"llm": {"rpm": 1200, "tpm": 60_000, "burst": 0.05}}  # 20 req/s, 1000 tok/s
    cfg = parse_limits(limits)["llm"]
    req_w, tok_w = cfg.windows
    records = _hammer(redis_url, namespace, limits, seconds=3.0, hold_ms=2, max_tokens=100)
    starts = sorted(r[0] for r in records)
    span_s = (starts[-1] - starts[0]) / 1000.0
    # Every window [t_i, t_j]: admitted <= burst + rate * (t_j - t_i) (+1), per dimension.
    by_time = sorted(records)
    cum_tokens = [0]
    for r in by_time:
        cum_tokens.append(cum_tokens[-1] + r[2])
    for i in range(len(by_time)):
        for j in range(i, len(by_time)):
            elapsed_s = (by_time[j][0] - by_time[i][0]) / 1000.0
            assert j - i + 1 <= req_w.burst + req_w.budget / 60.0 * elapsed_s + 1
            spent = cum_tokens[j + 1] - cum_tokens[i]
            assert spent <= tok_w.burst + tok_w.budget / 60.0 * elapsed_s + 100
    tokens_so_far = cum_tokens[-1]
    # Not vacuous: the hammering did reach the limit.
    assert len(records) >= req_w.burst + 0.5 * req_w.budget / 60.0 * span_s or (
        tokens_so_far >= tok_w.burst + 0.5 * tok_w.budget / 60.0 * span_s
    )


@pytest.mark.slow
def test_in_flight_never_exceeds_the_cap_at_any_instant(redis_url: str, namespace: str) -> None:
    limits = {"llm": {"max_in_flight": 3}}
    records = _hammer(redis_url, namespace, limits, seconds=3.0, hold_ms=20, max_tokens=0)
    assert all(ok for *_, ok in records), "a lease expired while held"
    # Sweep the Redis-clock intervals; at equal times count the release first
    # (scripts run one at a time, so a tie cannot hide an overlap of distinct calls).
    events = sorted(
        [(a, 1) for a, *_ in records] + [(r, -1) for _, r, *_ in records],
        key=lambda e: (e[0], e[1]),
    )
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 3  # reached (not vacuous) and never exceeded
