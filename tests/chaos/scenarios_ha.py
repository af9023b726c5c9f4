"""Sentinel failover under load, with the default lease (60 s) and policy (``local``): the
master SIGKILLed, or SIGSTOPped and resumed after the failover -> admissions resume within
the failover time + 1 s (under ``local`` they go on through the store-down policy), the
fleet is back on the new master within one retry period (``fallback.RETRY_S``: a process
asks Redis again every second) + the hand-over (``fallback.HANDOVER_S``, when every process
leaves its local limiter together) + 1 s of the promotion, no write reaches the demoted
master, cap held."""

from __future__ import annotations

import dataclasses
import threading
import time

from celery_fleet import Fleet, FleetError
from celery_fleet.resilience.fallback import HANDOVER_S, RETRY_S
from celery_fleet.testing.chaos import Figures
from celery_fleet.testing.redis_ha import SentinelSet

from .scenarios import _describe


@dataclasses.dataclass(frozen=True)
class FailoverParams:
    threads: int = 8
    cap: int = 4
    hold_s: float = 0.1
    before_s: float = 2.0  # load before the failure
    after_s: float = 6.0  # load after the new master is known
    kinds: tuple[str, ...] = ("kill", "pause")


class _Load:
    """Threads holding slots of 'llm'; an independent counter of holders, and when each
    admission went through Redis (not the store-down policy's local lease)."""

    def __init__(self, fleet: Fleet, p: FailoverParams) -> None:
        self.fleet, self.p = fleet, p
        self.lock = threading.Lock()
        self.inside = self.most = 0
        self.redis_admissions: list[float] = []
        self.local_times: list[float] = []
        self.refusals: dict[str, int] = {}
        self.stop = threading.Event()
        self.pool = [threading.Thread(target=self._agent, daemon=True) for _ in range(p.threads)]

    def start(self) -> _Load:
        for t in self.pool:
            t.start()
        return self

    def _agent(self) -> None:
        while not self.stop.is_set():
            try:
                with self.fleet.slot("llm", max_wait=2) as slot:
                    local = str(slot.lease_id or "").startswith("local.")
                    with self.lock:
                        self.inside += 1
                        self.most = max(self.most, self.inside)
                        if local:
                            self.local_times.append(time.monotonic())
                        else:
                            self.redis_admissions.append(time.monotonic())
                    time.sleep(self.p.hold_s)
                    with self.lock:
                        self.inside -= 1
            except FleetError as exc:
                name = type(exc).__name__
                self.refusals[name] = self.refusals.get(name, 0) + 1
                time.sleep(0.05)

    @property
    def local_admissions(self) -> int:
        return len(self.local_times)

    def join(self) -> None:
        self.stop.set()
        for t in self.pool:
            t.join(15)


def _evalsha_calls(port: int) -> int:
    import redis

    client = redis.Redis(port=port, socket_timeout=2)
    try:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("calls", 0))
    finally:
        client.close()


def _one_failover(kind: str, p: FailoverParams, fig: Figures) -> None:
    with SentinelSet(master_name="chaos-ha", down_after_ms=1000, failover_timeout_ms=3000) as ha:
        fleet = Fleet(
            redis_url=ha.url,
            redis_transport_options={"master_name": ha.master_name},
            namespace="chaos-ha",
            limits={"llm": {"max_in_flight": p.cap}},  # the default lease and store_down
        )
        old = ha.master()
        load = _Load(fleet, p).start()
        time.sleep(p.before_s)
        (ha.kill if kind == "kill" else ha.pause)(old)
        fig.faults += 1
        failed_at = time.monotonic()
        ha.wait_for_failover(old.port, timeout=30)
        promoted_at = time.monotonic()
        demoted_writes = 0
        if kind == "pause":
            ha.resume(old)
            before = _evalsha_calls(old.port)
        time.sleep(p.after_s)
        if kind == "pause":
            demoted_writes = _evalsha_calls(old.port) - before
        load.join()
        resumed = [t for t in load.redis_admissions if t >= promoted_at]  # the new master's
        gap = (resumed[0] - promoted_at) if resumed else float("inf")
        failover_s = promoted_at - failed_at
        after = sorted(t for t in load.redis_admissions + load.local_times if t > failed_at)
        # The longest time nobody was admitted, from the failure on.
        stall = max((b - a for a, b in zip([failed_at, *after[:-1]], after, strict=True)),
                    default=float("inf"))  # fmt: skip
        fig.tasks += len(load.redis_admissions) + load.local_admissions
        fig.executions += len(load.redis_admissions) + load.local_admissions
        fig.extra[f"{kind}: failover s"] = round(failover_s, 1)
        fig.extra[f"{kind}: refusals"] = load.refusals
        fig.extra[f"{kind}: local admissions"] = load.local_admissions
        fig.check(f"{kind}: admissions resume within failover + 1 s",
                  stall <= failover_s + 1.0,
                  f"longest stall {stall:.1f} s (failover {failover_s:.1f} s)")  # fmt: skip
        fig.check(f"{kind}: back on the new master within a retry + the hand-over + 1 s",
                  gap <= RETRY_S + HANDOVER_S + 1.0,
                  f"first Redis admission {gap:.1f} s after the promotion")  # fmt: skip
        fig.check(f"{kind}: no write reaches the demoted master", demoted_writes == 0,
                  f"{demoted_writes} EVALSHA on the old master after SIGCONT")  # fmt: skip
        fig.check(f"{kind}: cap held", load.most <= p.cap, f"{load.most} at once, cap {p.cap}")


def sentinel_failover(p: FailoverParams) -> Figures:
    """One Sentinel set per kind of failure; figures summed over them."""
    fig = Figures("sentinel_failover", params=_describe(p))
    started = time.monotonic()
    for kind in p.kinds:
        _one_failover(kind, p, fig)
    fig.seconds = time.monotonic() - started
    return fig
