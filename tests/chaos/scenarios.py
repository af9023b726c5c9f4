"""The chaos scenarios with workers: each one function, short parameters for CI (pytest,
``test_scenarios.py``) and long ones for ``benchmarks/chaos.py``.

Every scenario returns a :class:`Figures` (faults injected, tasks, executions, leaks, 429s,
named checks); it fails when a check does. ``DEPENDS_ON`` names the issue-20 defects a
scenario exposes on code without their fixes.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import random
import threading
import time
from typing import Any

from celery_fleet.testing.chaos import Figures, wait_progress, wait_until
from celery_fleet.testing.faults import Killer

from .rig import Rig, load_app, rig

# Which issue-20 defects each scenario exposes (numbers as in the issue).
DEPENDS_ON: dict[str, str] = {
    "sigkill_storm": "2 (a SIGKILLed early-ack key stays running; a new publish runs nothing)",
    "duplicate_storm": "2 (as the SIGKILL storm)",
    "broker_down": "1 (a failed keyed publish leaves the key queued)",
    "fleet_redis_faults": "4 (frozen/slow Redis defeats store_down), 5 (orphaned leases), 7",
    "provider_outage": "none known",
    "time_limits": "none known",
    "fencing": "6 (fencing tokens and leader terms go back after an empty restart)",
    "sentinel_failover": "12 (releases lost in the outage freeze the cap for a lease; writes to "
    "a demoted master after SIGCONT), 4 (SIGSTOP: no local admission)",
    "fuzz": "10 (raw exceptions: release/settle of a non-Decision, and siblings)",
}


@dataclasses.dataclass(frozen=True)
class StormParams:
    """A keyed burst (half early, half late ack) while pool children holding slots die."""

    keys: int = 60
    copies: int = 1  # publishes per key (the duplicate storm: 10, from `publishers` processes)
    publishers: int = 1
    kills: int = 30
    every_s: float = 0.25  # between kills, jittered
    workers: int = 1
    concurrency: int = 4
    cap: int = 3
    lease_s: float = 2.0
    hold_s: float = 0.3
    republish_every_s: float = 3.0
    stall_s: float = 20.0  # after the storm: no completion for this long is a stuck key
    timeout_s: float = 150.0


def _keyed_task(app: Any, i: int) -> Any:
    return app.keyed_early if i % 2 == 0 else app.keyed_late


def _field(i: int) -> str:
    return f"{'early' if i % 2 == 0 else 'late'}:{i}"


def _publish_copies(env: dict[str, str], items: list[int], hold_s: float) -> None:
    """A spawned publisher (the duplicate storm): the app imported afresh with ``env``."""
    app = load_app(env)
    for i in items:
        _keyed_task(app, i).delay(env["CHAOS_NS"], i, hold_s)


def _publish(r: Rig, p: StormParams) -> None:
    items = [i for i in range(p.keys) for _ in range(p.copies)]
    random.Random(1).shuffle(items)
    if p.publishers <= 1:
        for i in items:
            _keyed_task(r.app, i).delay(r.tag, i, p.hold_s)
        return
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_publish_copies, args=(r.env, items[k :: p.publishers], p.hold_s))
        for k in range(p.publishers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)


def _republish_missing(r: Rig, p: StormParams) -> int:
    """Publish again every key that has not completed: what a user does after a crash."""
    done = r.probe.done()
    missing = [i for i in range(p.keys) if _field(i) not in done]
    for i in missing:
        _keyed_task(r.app, i).delay(r.tag, i, p.hold_s)
    return len(missing)


def _check_keys(fig: Figures, r: Rig, keys: int, settle_s: float) -> None:
    """Every key completed exactly once; after the lease TTL no slot is held; the ledger."""
    time.sleep(settle_s)  # late duplicates and dead holders' leases: give them their time
    done = r.probe.done()
    counts = [done.get(_field(i), 0) for i in range(keys)]
    fig.executions = sum(counts)
    never = [i for i, c in enumerate(counts) if c == 0]
    twice = sum(c > 1 for c in counts)
    early = sum(i % 2 == 0 for i in never)
    fig.check(
        "every key completed exactly once",
        not never and twice == 0,
        f"{len(never)} never ({early} early-ack, {len(never) - early} late-ack), "
        f"{twice} more than once, of {keys}",
    )
    fig.leaks = r.in_flight("cap")
    fig.check("0 slots held after the lease TTL", fig.leaks == 0, f"{fig.leaks} held")
    states: dict[str, int] = {}
    for i in range(keys):
        kind = "early" if i % 2 == 0 else "late"
        state = r.app.fleet.key_record(f"{kind}:{r.tag}:{i}").get("state", "absent")
        states[state] = states.get(state, 0) + 1
    fig.extra["ledger"] = states


def _storm(name: str, p: StormParams) -> Figures:
    fig = Figures(name, params=_describe(p), tasks=p.keys)
    started = time.monotonic()
    with rig(p.workers, p.concurrency, p.cap, p.lease_s) as r:
        killer = Killer(r.probe, r.workers, seed=7).start(p.kills, p.every_s)
        publisher = threading.Thread(target=_publish, args=(r, p), daemon=True)
        publisher.start()
        deadline = time.monotonic() + p.timeout_s
        republished = 0
        publisher.join(p.timeout_s)
        last, moved = (-1, -1), time.monotonic()
        while time.monotonic() < deadline:
            if wait_until(
                lambda: killer.done() and len(r.probe.done()) >= p.keys, p.republish_every_s, 0.2
            ):
                break
            now = (len(r.probe.done()), killer.kills)
            if now != last:
                last, moved = now, time.monotonic()
            elif time.monotonic() - moved > p.stall_s:
                break  # the keys left never complete, however often they are published
            republished += _republish_missing(r, p)
        killer.stop()
        fig.faults = killer.kills
        fig.extra["republished"] = republished
        fig.check("faults injected", killer.kills >= p.kills, f"{killer.kills} of {p.kills} kills")
        _check_keys(fig, r, p.keys, p.lease_s + 2.0)
        most = r.probe.most()
        fig.check("cap never exceeded", most <= p.cap, f"at most {most} inside, cap {p.cap}")
    fig.seconds = time.monotonic() - started
    return fig


def sigkill_storm(p: StormParams) -> Figures:
    """SIGKILL of pool children holding slots and keys (early and late ack) -> every keyed
    task completes exactly once, 0 slots leaked after the lease TTL, cap never exceeded."""
    return _storm("sigkill_storm", p)


def duplicate_storm(p: StormParams) -> Figures:
    """1,000 publishes of 100 keys (long) while children are killed -> 100 executions."""
    return _storm("duplicate_storm", p)


# -- the broker down during publishes of keyed tasks -----------------------------------


@dataclasses.dataclass(frozen=True)
class BrokerParams:
    keys: int = 40
    down_s: float = 3.0
    publish_every_s: float = 0.05
    hold_s: float = 0.05
    timeout_s: float = 90.0


def _revive_and_count(r: Rig) -> int:
    """Completed keys so far, after restarting any worker the broker outage killed: kombu's
    Redis transport can crash a worker that acks while the connection is lost
    ("Unrecoverable error: AttributeError ... 'hostname'", celery 5.7, kombu 5.7), which a
    supervisor restarts; the keys are the fleet's business, the restart is not."""
    r.workers.revive()
    return len(r.probe.done())


def broker_down(p: BrokerParams) -> Figures:
    """The broker stops (its data kept) while keyed tasks are published; publishes that
    raised are published again after recovery -> every key runs exactly once."""
    fig = Figures("broker_down", params=_describe(p), tasks=p.keys)
    started = time.monotonic()
    with rig(cap=4, lease_s=2.0) as r:
        failed: list[int] = []
        for i in range(p.keys):
            if i == p.keys // 3:
                r.broker.down()
                fig.faults += 1
                down_at = time.monotonic()
            if fig.faults and r.broker.proc is None and time.monotonic() - down_at > p.down_s:
                r.broker.up()
            try:
                _keyed_task(r.app, i).delay(r.tag, i, p.hold_s)
            except Exception:  # kombu's OperationalError: what the caller sees
                failed.append(i)
            time.sleep(p.publish_every_s)
        if r.broker.proc is None:
            time.sleep(max(0.0, p.down_s - (time.monotonic() - down_at)))
            r.broker.up()
        fig.extra["failed_publishes"] = len(failed)
        fig.check("some publishes failed", bool(failed), "the outage must hit publishes")
        for i in failed:  # after recovery: the caller publishes again what raised
            _keyed_task(r.app, i).delay(r.tag, i, p.hold_s)
        wait_progress(lambda: _revive_and_count(r), p.keys, 20.0, p.timeout_s)
        fig.extra["worker_restarts"] = r.workers.restarts
        _check_keys(fig, r, p.keys, 2.0)
    fig.seconds = time.monotonic() - started
    return fig


# -- the fleet's Redis restarted empty, frozen, slowed -----------------------------------


@dataclasses.dataclass(frozen=True)
class RedisFaultParams:
    rate_per_s: float = 8.0  # tasks published per second while the faults run
    restarts: int = 2
    freeze_s: float = 4.0
    slows: int = 2
    slow_s: float = 2.0
    gap_s: float = 2.0  # between faults
    max_wait: float = 2.0
    hold_s: float = 0.2
    cap: int = 4
    timeout_s: float = 120.0


def fleet_redis_faults(p: RedisFaultParams) -> Figures:
    """The fleet's Redis restarted empty (twice), frozen, slowed mid-burst -> 0 tasks failed
    or stuck, local admission within the cap, no caller waits past max_wait + 1 s."""
    fig = Figures("fleet_redis_faults", params=_describe(p))
    started = time.monotonic()
    with rig(cap=p.cap, lease_s=6.0) as r:
        stop = threading.Event()
        published = [0]

        def publish() -> None:
            while not stop.is_set():
                r.app.patient.delay(published[0], p.hold_s, p.max_wait)
                published[0] += 1
                stop.wait(1.0 / p.rate_per_s)

        feeder = threading.Thread(target=publish, daemon=True)
        feeder.start()
        time.sleep(p.gap_s)
        timeline: list[tuple[float, str]] = []  # (wall clock, fault) for the worst wait
        for _ in range(p.restarts):
            timeline.append((time.time(), "restart"))
            r.fleet_redis.restart_empty()
            fig.faults += 1
            time.sleep(p.gap_s)
        timeline.append((time.time(), "freeze"))
        r.fleet_redis.freeze(p.freeze_s)
        fig.faults += 1
        time.sleep(p.gap_s)
        for _ in range(p.slows):
            timeline.append((time.time(), "slow"))
            r.fleet_redis.slow(p.slow_s)
            fig.faults += 1
            time.sleep(p.gap_s / 2)
        time.sleep(p.gap_s)
        stop.set()
        feeder.join(10)
        fig.tasks = published[0]
        wait_progress(lambda: len(r.probe.done()), fig.tasks, 30.0, p.timeout_s)
        done = r.probe.done()
        fig.executions = sum(done.values())
        errors = [e.decode() for e in r.probe.client.lrange(r.probe.key("errors"), 0, -1)]
        missing = sum(done.get(f"patient:{i}", 0) == 0 for i in range(fig.tasks))
        fig.check(
            "0 tasks failed or stuck",
            missing == 0 and not errors,
            f"{missing} not completed, {len(errors)} errors {errors[:2]}",
        )
        waits = [json.loads(w) for w in r.probe.client.lrange(r.probe.key("waits"), 0, -1)]
        over = [w["waited_s"] - w["max_wait"] for w in waits]
        worst = max(over, default=0.0)
        if waits:
            slowest = max(waits, key=lambda w: w["waited_s"] - w["max_wait"])
            began = slowest.get("ended", 0.0) - slowest["waited_s"]
            since = [f"{began - at:+.1f} s after {what}" for at, what in timeline if at <= began]
            fig.extra["slowest"] = f"{slowest['outcome']}, local={slowest['local']}, " + (
                since[-1] if since else "before the first fault"
            )
        fig.extra["asks"] = len(waits)
        fig.extra["local_admissions"] = sum(w["local"] for w in waits)
        fig.check(
            "no caller waits past max_wait + 1 s",
            worst <= 1.0,
            f"worst {worst + p.max_wait:.1f} s with max_wait {p.max_wait}",
        )
        local = r.probe.most("local")
        fig.check("local admission within the cap", local <= p.cap, f"{local} local at once")
        fig.extra["max_redis_holders"] = r.probe.most()
        fig.extra["max_holders_redis_and_local"] = r.probe.most("all")
        time.sleep(6.0 + 2.0)  # the lease TTL: what is still held now leaked
        fig.leaks = r.in_flight("cap")
        fig.check("0 slots held after the lease TTL", fig.leaks == 0, f"{fig.leaks} held")
    fig.seconds = time.monotonic() - started
    return fig


def _describe(p: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(p).items() if k != "timeout_s")
