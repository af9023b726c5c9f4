"""More chaos scenarios: a provider outage and the breaker, Celery time limits inside a
slot, fencing tokens and leader terms across empty restarts (see ``scenarios.py``)."""

from __future__ import annotations

import dataclasses
import gc
import threading
import time

from celery_fleet import Fleet
from celery_fleet.testing import ProviderSim
from celery_fleet.testing.chaos import Figures, wait_progress, wait_until
from celery_fleet.testing.faults import KeptRedisServer
from celery_fleet.testing.phases import Phase
from celery_fleet.testing.redis_server import free_port

from .rig import rig
from .scenarios import _describe

# -- provider outage: 503s, the breaker opens fleet-wide ---------------------------------


@dataclasses.dataclass(frozen=True)
class OutageParams:
    rate_per_s: float = 6.0  # calls published per second, before, during and after
    outage_start_s: float = 3.0
    outage_s: float = 8.0
    reset_s: float = 2.0  # the breaker's reset_timeout
    tail_s: float = 3.0  # publishing after the outage
    timeout_s: float = 120.0


def provider_outage(p: OutageParams) -> Figures:
    """The provider answers 503 for ``outage_s`` -> the breaker opens fleet-wide, at most
    one probe per reset interval reaches the provider, 0 tasks failed, all complete."""
    fig = Figures("provider_outage", params=_describe(p), faults=1)
    started = time.monotonic()
    port = free_port()
    env = {"CHAOS_PROVIDER": f"http://127.0.0.1:{port}/v1", "CHAOS_RESET": str(p.reset_s)}
    end = p.outage_start_s + p.outage_s
    sim = ProviderSim(
        rpm=None,
        tpm=None,
        max_in_flight=None,
        latency=0.05,
        port=port,
        seed=1,
        phases=[Phase(start=p.outage_start_s, end=end, status=503)],
    )
    with rig(cap=4, lease_s=5.0, extra_env=env) as r:
        sim.start()
        try:
            states: list[tuple[float, str]] = []
            stop = threading.Event()

            def watch() -> None:
                breaker = r.app.fleet.breaker("llm")
                while not stop.is_set():
                    states.append((sim.elapsed_s(), breaker.state().state))
                    stop.wait(0.05)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            n = 0
            while sim.elapsed_s() < end + p.tail_s:
                r.app.call_provider.delay(n)
                n += 1
                time.sleep(1.0 / p.rate_per_s)
            fig.tasks = n
            wait_progress(lambda: len(r.probe.done()), n, 30.0, p.timeout_s)
            stop.set()
            watcher.join(5)
            log = sim.log
        finally:
            sim.stop()
        done = r.probe.done()
        fig.executions = sum(done.values())
        missing = sum(done.get(f"call:{i}", 0) != 1 for i in range(n))
        fig.check(
            "0 tasks failed, all complete after recovery",
            missing == 0,
            f"{missing} of {n} not completed once",
        )
        opened = [t for t, s in states if s != "closed" and p.outage_start_s <= t <= end]
        fig.check("the breaker opened", bool(opened), "never seen open during the outage")
        if opened:
            _check_probes(fig, log, opened[0], end, p.reset_s)
        fig.http_429 = sum(rec.outcome == "429" for rec in log)
        fig.extra["provider_503s"] = sum(rec.outcome == "503" for rec in log)
        fig.leaks = r.in_flight("llm")
    fig.seconds = time.monotonic() - started
    return fig


def _check_probes(fig: Figures, log: list, opened_s: float, end_s: float, reset_s: float) -> None:  # type: ignore[type-arg]
    """After the breaker opened (plus the calls already on the wire), the 503s that reach
    the provider are probes: at most one per reset interval."""
    probes = [rec.t_s for rec in log if rec.outcome == "503" and rec.t_s > opened_s + 0.5]
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    most = int((end_s - opened_s) / reset_s) + 1
    fig.extra["probes"] = len(probes)
    fig.extra["opened_at_s"] = round(opened_s, 1)
    fig.check(
        "at most 1 probe per reset interval",
        len(probes) <= most and all(g >= 0.8 * reset_s for g in gaps),
        f"{len(probes)} probes (most {most}), shortest gap "
        f"{min(gaps, default=reset_s):.2f} s, reset {reset_s} s",
    )


# -- Celery time limits inside fleet.slot --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TimeLimitParams:
    soft: int = 4  # tasks past their soft limit (1 s) inside the slot
    hard: int = 4  # tasks past their hard limit (1 s): the pool kills the child
    hold_s: float = 3.0
    lease_s: float = 2.0
    timeout_s: float = 90.0


def time_limits(p: TimeLimitParams) -> Figures:
    """Soft and hard Celery time limits inside ``fleet.slot`` -> a soft limit releases the
    slot at once; a hard limit's slot is reclaimed within the lease TTL; nothing leaks."""
    fig = Figures("time_limits", params=_describe(p), tasks=p.soft + p.hard)
    started = time.monotonic()
    with rig(cap=4, lease_s=p.lease_s) as r:
        soft = [r.app.soft_overrun.delay(i, p.hold_s) for i in range(p.soft)]
        for res in soft:
            res.get(timeout=p.timeout_s, propagate=False)
        held = r.in_flight()
        fig.check(
            "a soft time limit releases the slot",
            held == 0,
            f"{held} held right after the soft limits",
        )
        hard = [r.app.hard_overrun.delay(i, p.hold_s) for i in range(p.hard)]
        for res in hard:
            res.get(timeout=p.timeout_s, propagate=False)
        states = [res.state for res in soft + hard]
        limits_hit = int(r.probe.client.get(r.probe.key("soft_limits")) or 0)
        limits_hit += sum(
            type(res.result).__name__ in ("TimeLimitExceeded", "WorkerLostError") for res in hard
        )
        fig.faults = limits_hit
        # A result someone waited on unsubscribes when collected: while its backend still
        # runs (after the rig, the collection would meet a closed server, a warning).
        del soft, hard, res
        gc.collect()
        fig.executions = sum(r.probe.done().values())
        fig.check(
            "every time limit hit",
            limits_hit == p.soft + p.hard,
            f"{limits_hit} of {p.soft + p.hard}; states {sorted(set(states))}",
        )
        reclaimed = wait_until(lambda: r.in_flight() == 0, p.lease_s + 3.0, 0.1)
        fig.leaks = r.in_flight()
        fig.check(
            "a hard limit's slot is reclaimed within the lease TTL",
            reclaimed,
            f"{fig.leaks} held {p.lease_s + 3.0:.0f} s later",
        )
    fig.seconds = time.monotonic() - started
    return fig


# -- fencing tokens and leader terms across empty restarts -------------------------------


@dataclasses.dataclass(frozen=True)
class FencingParams:
    restarts: int = 2
    locks: int = 20  # lock acquisitions per round
    terms: int = 3  # leader terms per round


def fencing(p: FencingParams) -> Figures:
    """Lock tokens and leader terms, with the fleet's Redis restarted empty between rounds
    -> both strictly increase (a resource that refuses older tokens stays safe)."""
    fig = Figures("fencing", params=_describe(p))
    started = time.monotonic()
    with KeptRedisServer() as server:
        fleet = Fleet(redis_url=server.url, namespace="fence", limits={"cap": {"max_in_flight": 1}})
        tokens: list[int] = []
        terms: list[int] = []
        for round_ in range(p.restarts + 1):
            if round_:
                server.restart_empty()
                fig.faults += 1
            for _ in range(p.locks):
                with fleet.lock("resource", ttl=5) as lock:
                    tokens.append(int(lock.token or 0))
            for _ in range(p.terms):
                leader = fleet.leader("boss", lease=2).start()
                leader.wait(10)
                terms.append(int(leader.token or 0))
                leader.stop()
        fig.tasks = len(tokens) + len(terms)
        fig.executions = fig.tasks
        fig.check("lock tokens strictly increase", _increasing(tokens), _drops(tokens))
        fig.check("leader terms strictly increase", _increasing(terms), _drops(terms))
    fig.seconds = time.monotonic() - started
    return fig


def _increasing(values: list[int]) -> bool:
    return all(b > a for a, b in zip(values, values[1:], strict=False))


def _drops(values: list[int]) -> str:
    drops = [f"{a}->{b}" for a, b in zip(values, values[1:], strict=False) if b <= a]
    return f"{len(values)} values; went back: {', '.join(drops[:4]) or 'never'}"
