"""The thundering-herd scenario: N agents fired in the same second at one provider.

One :class:`Herd` owns a :class:`~celery_fleet.testing.ProviderSim`; :meth:`Herd.run` starts
real ``celery worker`` processes for one mode, publishes every agent at once, waits for
all of them to end, stops the workers (by pid) and reads the provider's own log:

- ``plain``: ``baselines.plain_agent`` (SDK default retries),
- ``autoretry``: ``baselines.autoretry_agent`` (autoretry_for + retry_backoff + retry_jitter),
- ``fleet``: ``example_project.tasks.research_agent`` (celery-fleet admission).

The workers run the example project's app (``celery -A example_project.app``); the
baselines, which are no part of the example, are loaded beside it with ``-I``
(:attr:`Herd.includes`).

Used by ``python -m benchmarks.harness.demo`` and ``benchmarks/herd.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from celery_fleet.testing import Phase, ProviderSim

ROOT = Path(__file__).resolve().parents[2]  # the checkout: example_project and benchmarks
BASELINES = "benchmarks.harness.baselines"
TASKS = {
    "plain": f"{BASELINES}.plain_agent",
    "autoretry": f"{BASELINES}.autoretry_agent",
    "fleet": "example_project.tasks.research_agent",
}
Progress = Callable[[str, int, int, int, int], None]  # mode, done, failed, total, 429s


@dataclass(frozen=True)
class Scenario:
    """Everything that defines a herd run (defaults: the issue's default scenario)."""

    agents: int = 60
    steps: int = 5
    rpm: int = 600
    tpm: int = 90_000  # 0: no such limit, at the provider and in the fleet
    max_in_flight: int = 8  # 0: no such limit
    latency: float = 0.3
    latency_sigma: float = 0.25
    workers: int = 2
    concurrency: int = 8
    pool: str = "prefork"
    timeout_s: float = 300.0
    seed: int | None = 1
    declared_in_flight: int | None = None  # what fleet_limits declares (default: the truth)
    adaptive: bool = False
    breaker_reset_s: float = 10.0
    phases: tuple[Phase, ...] = ()  # provider phases, counted from the moment of firing
    provider_burst_s: float = 60.0  # seconds of rpm/tpm the provider's buckets hold

    @property
    def worker_slots(self) -> int:
        return self.workers * self.concurrency


@dataclass
class RunResult:
    """One mode's outcome, measured from the task results and the provider's log."""

    mode: str
    agents: int
    completed: int
    failed: int
    requests: int
    provider_429: int
    provider_5xx: int
    makespan_s: float
    lower_bound_s: float
    timeline: list[tuple[float, int, int]] = field(default_factory=list, repr=False)
    #: the provider's log relative to the firing: (t, outcome, latency) per request
    records: list[tuple[float, str, float]] = field(default_factory=list, repr=False)
    #: ``fleet-breaker`` Celery events the workers sent: (t, limit, state)
    breaker_events: list[tuple[float, str, str]] = field(default_factory=list, repr=False)

    @property
    def ratio(self) -> float:
        return self.makespan_s / self.lower_bound_s if self.lower_bound_s else math.nan

    @property
    def ratio_note(self) -> str:
        """Why :attr:`ratio` is no speed to compare: '' unless agents failed (less work done).

        The lower bound counts every agent's calls; a run whose agents died early did fewer,
        so it can end below 1x without being faster than possible.
        """
        if not self.failed:
            return ""
        agents = "agent" if self.failed == 1 else "agents"
        return f"{self.failed} {agents} died early, so less work was done"

    @property
    def rate_429(self) -> float:
        return self.provider_429 / self.requests if self.requests else 0.0

    def summary(self) -> dict[str, Any]:
        hidden = ("timeline", "records", "breaker_events")
        out = {k: v for k, v in asdict(self).items() if k not in hidden}
        out.update(ratio=round(self.ratio, 3), rate_429=round(self.rate_429, 4))
        return out


class Herd:
    """A simulated provider plus the means to run the example fleet against it."""

    #: Modules the workers import besides the app's own (``celery worker -I``): the tasks
    #: of the harness that the example project does not define.
    includes: tuple[str, ...] = (BASELINES,)

    def __init__(self, scenario: Scenario, redis_url: str, db: int = 11) -> None:
        self.scenario = scenario
        base = redis_url.rstrip("/")
        self.redis_base = base.rsplit("/", 1)[0] if base.count("/") > 2 else base
        self.db = db
        self.url = f"{self.redis_base}/{db}"
        self.sim = ProviderSim(
            rpm=scenario.rpm,
            tpm=scenario.tpm or None,
            max_in_flight=scenario.max_in_flight or None,
            latency=scenario.latency,
            latency_sigma=scenario.latency_sigma,
            burst_s=scenario.provider_burst_s,
            seed=scenario.seed,
        )
        #: where worker processes start (their ``sys.path[0]``: its packages come first)
        self.worker_cwd = ROOT

    def __enter__(self) -> Herd:
        self.sim.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sim.stop()

    def run(self, mode: str, progress: Progress | None = None) -> RunResult:
        """Fire every agent of the scenario at once in ``mode``; wait; measure.

        Whatever fails on the way (a Redis that refuses the event receiver, a worker that
        does not start, a timeout), every worker started is stopped by its pid, the event
        receiver and the client app are closed, and the run's keys are deleted.
        """
        run = f"herd-{mode}-{uuid.uuid4().hex[:8]}"
        app = Celery("herd-client", broker=self.url, backend=self.url)
        with contextlib.ExitStack() as started:  # undone in reverse order, also on errors
            started.callback(self._cleanup, app, run)
            events = BreakerEvents(app)  # first: a broker we cannot use fails before any worker
            started.callback(events.stop)
            workers = self._start_workers(mode, run)
            started.callback(self._stop_workers, workers)
            self._wait_ready(app, [n for n, _ in workers])
            self.sim.reset_stats(refill=True)
            self.sim.schedule(self.scenario.phases)
            sim_t0 = self.sim.elapsed_s()
            t0 = time.time()
            ids = [
                app.send_task(
                    TASKS[mode],
                    args=(f"agent {i}",),
                    kwargs={"steps": self.scenario.steps},
                    queue=run,
                ).id
                for i in range(self.scenario.agents)
            ]
            metas = self._wait_all(app, mode, ids, progress)
        result = self._measure(mode, t0, sim_t0, metas)
        result.breaker_events = [(t - t0, limit, state) for t, limit, state in events.seen]
        return result

    # -- workers ------------------------------------------------------------------------

    def _start_workers(self, mode: str, run: str) -> list[tuple[str, subprocess.Popen[bytes]]]:
        """Start ``scenario.workers`` worker processes; if one fails to start, stop the others."""
        s = self.scenario
        env = self.worker_env(run)
        procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        try:
            for i in range(s.workers):
                name = f"{run}-{i}@%h"
                proc = subprocess.Popen(
                    self._worker_command(name, run),
                    cwd=self.worker_cwd,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                procs.append((name.replace("%h", os.uname().nodename), proc))
        except BaseException:
            self._stop_workers(procs)
            raise
        return procs

    def worker_env(self, run: str) -> dict[str, str]:
        """The environment of the run's workers: the example project's settings for the
        scenario (its celeryconfig reads them)."""
        s = self.scenario
        return {
            **os.environ,
            "REDIS_URL": self.redis_base,
            "EXAMPLE_DB": str(self.db),
            "EXAMPLE_QUEUE": run,
            "EXAMPLE_NAMESPACE": run,
            "MODEL_RPM": str(s.rpm),
            "MODEL_TPM": str(s.tpm),
            "MODEL_MAX_IN_FLIGHT": str(s.declared_in_flight or s.max_in_flight),
            "MODEL_ADAPTIVE": "1" if s.adaptive else "0",
            "MODEL_BREAKER_RESET": str(s.breaker_reset_s),
            "OPENAI_BASE_URL": self.sim.base_url,
            "OPENAI_API_KEY": "sim",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }

    def _worker_command(self, name: str, queue: str) -> list[str]:
        """The ``celery worker`` command line of the worker ``name`` consuming ``queue``."""
        s = self.scenario
        include = ["-I", ",".join(self.includes)] if self.includes else []
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "example_project.app",
            "worker",
            *include,
            "-P",
            s.pool,
            "-c",
            str(s.concurrency),
            "-n",
            name,
            "-Q",
            queue,
            "-O",
            "fair",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ]

    def _wait_ready(self, app: Celery, names: list[str], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        missing = set(names)
        while missing:
            if time.monotonic() > deadline:
                raise RuntimeError(f"celery workers did not start: {sorted(missing)}")
            for reply in app.control.ping(destination=sorted(missing), timeout=0.5) or []:
                missing -= set(reply)

    @staticmethod
    def _stop_workers(workers: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
        stop_processes(*(proc for _, proc in workers))

    def _cleanup(self, app: Celery, run: str) -> None:
        """Delete the run's queue and keys; close the client app even when Redis refuses."""
        client = redis.Redis.from_url(self.url)
        try:
            keys = [run, *client.scan_iter(match=f"{{{run}:*", count=1000)]
            client.delete(*keys)
        finally:
            client.close()
            close_app(app)

    # -- measuring ----------------------------------------------------------------------

    def _metas(self, app: Celery, ids: list[str]) -> list[dict[str, Any]]:
        """Every task's result meta in one MGET (no per-result pub/sub subscriptions)."""
        backend = app.backend
        raw = backend.client.mget([backend.get_key_for_task(i) for i in ids])
        return [backend.decode_result(v) if v else {"status": "PENDING"} for v in raw]

    def _wait_all(
        self, app: Celery, mode: str, ids: list[str], progress: Progress | None
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.scenario.timeout_s
        while True:
            metas = self._metas(app, ids)
            done = sum(m["status"] == "SUCCESS" for m in metas)
            failed = sum(m["status"] in ("FAILURE", "REVOKED") for m in metas)
            if progress:
                n429 = sum(self.sim.stats()["rate_limited"].values())
                progress(mode, done, failed, len(ids), n429)
            if done + failed == len(ids):
                return metas
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mode}: {len(ids) - done - failed} agents still running")
            time.sleep(0.1)

    def _measure(
        self, mode: str, t0: float, sim_t0: float, metas: list[dict[str, Any]]
    ) -> RunResult:
        ok = [m for m in metas if m["status"] == "SUCCESS"]
        ends = [m["result"]["finished_at"] for m in ok]
        for m in metas:
            if m["status"] != "SUCCESS" and m.get("date_done"):
                ends.append(_timestamp(m["date_done"]))
        end = max(ends) if ends else time.time()
        log = self.sim.log
        costs = [rec.cost for rec in log if rec.outcome == "ok"]
        mean_cost = sum(costs) / len(costs) if costs else 0.0
        n_calls = self.scenario.agents * self.scenario.steps
        return RunResult(
            mode=mode,
            agents=len(metas),
            completed=len(ok),
            failed=len(metas) - len(ok),
            requests=len(log),
            provider_429=sum(rec.outcome == "429" for rec in log),
            provider_5xx=sum(rec.status >= 500 for rec in log),
            makespan_s=round(end - t0, 3),
            lower_bound_s=round(self.lower_bound_s(n_calls, mean_cost), 3),
            timeline=timeline(log, sim_t0, end - t0),
            records=[(r.t_s - sim_t0, r.outcome, r.latency_s) for r in log],
        )

    def lower_bound_s(self, n_calls: int, mean_cost: float) -> float:
        """The least time the provider allows for the whole herd (see benchmarks/RESULTS.md).

        The larger of the simulator's floor (RPM and TPM drain time beyond a full bucket;
        ``n_calls * mean latency / max_in_flight``) and one agent's chain of ``steps``
        sequential calls.
        """
        s = self.scenario
        mean_latency = s.latency * math.exp(s.latency_sigma**2 / 2)
        return max(self.sim.min_makespan_s(n_calls, mean_cost), s.steps * mean_latency)


def stop_processes(*procs: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    """SIGTERM every process still running, wait up to ``grace_s`` each, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _timestamp(date_done: Any) -> float:
    """A result's ``date_done`` (datetime or ISO string, UTC) as a Unix timestamp."""
    import datetime as dt

    if isinstance(date_done, str):
        date_done = dt.datetime.fromisoformat(date_done)
    if date_done.tzinfo is None:
        date_done = date_done.replace(tzinfo=dt.timezone.utc)
    return float(date_done.timestamp())


def close_app(app: Celery) -> None:
    """Close a client app with its result backend's pub/sub and pool: ``app.close()`` leaves
    them open on older Celery, and an unclosed socket fails a suite run with
    ``filterwarnings = error``."""
    if "backend" in app.__dict__ or getattr(app, "_backend", None) is not None:
        consumer = getattr(app.backend, "result_consumer", None)
        if consumer is not None:
            consumer.stop()
        backend_client = getattr(app.backend, "client", None)
        if backend_client is not None:
            backend_client.close()
    app.close()


class BreakerEvents:
    """Listens, like Flower, to the ``fleet-breaker`` events workers send (a thread)."""

    def __init__(self, app: Celery) -> None:
        self.seen: list[tuple[float, str, str]] = []
        self._conn = app.connection_for_read()
        try:  # the Receiver connects: a Redis that refuses us (NOAUTH) raises here
            self._receiver = app.events.Receiver(
                self._conn, handlers={"fleet-breaker": self._on_event, "*": lambda e: None}
            )
        except BaseException:
            self._conn.release()
            raise
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_event(self, event: dict[str, Any]) -> None:
        stamp = float(event.get("timestamp", time.time()))
        self.seen.append((stamp, event["limit"], event["state"]))

    def _run(self) -> None:
        try:
            self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except Exception:  # the connection closes under it at stop()
            pass

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(2)
        self._conn.release()


def add_scenario_args(parser: argparse.ArgumentParser) -> None:
    """The command-line options of a :class:`Scenario` (the demo and the benchmark share them)."""
    d = Scenario()
    parser.add_argument("--agents", type=int, default=d.agents)
    parser.add_argument("--steps", type=int, default=d.steps, help="model calls per agent")
    parser.add_argument("--rpm", type=int, default=d.rpm)
    parser.add_argument("--tpm", type=int, default=d.tpm)
    parser.add_argument("--max-in-flight", type=int, default=d.max_in_flight)
    parser.add_argument("--latency", type=float, default=d.latency, help="median s per call")
    parser.add_argument("--latency-sigma", type=float, default=d.latency_sigma)
    parser.add_argument("--workers", type=int, default=d.workers, help="celery worker instances")
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="slots per worker")
    parser.add_argument("--pool", default=d.pool, choices=["prefork", "threads", "solo"])
    parser.add_argument("--seed", type=int, default=d.seed)


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The Scenario the options of :func:`add_scenario_args` describe."""
    return Scenario(
        agents=args.agents,
        steps=args.steps,
        rpm=args.rpm,
        tpm=args.tpm,
        max_in_flight=args.max_in_flight,
        latency=args.latency,
        latency_sigma=args.latency_sigma,
        workers=args.workers,
        concurrency=args.concurrency,
        pool=args.pool,
        seed=args.seed,
    )


def timeline(
    log: list[Any], t0: float, span_s: float, step_s: float = 0.25
) -> list[tuple[float, int, int]]:
    """(t, requests in flight at the provider, 429s in the bin) every ``step_s`` from t0."""
    served = [(r.t_s - t0, r.t_s - t0 + r.latency_s) for r in log if r.outcome in ("ok", "garbage")]
    refused = [r.t_s - t0 for r in log if r.outcome == "429"]
    out = []
    for i in range(int(span_s / step_s) + 2):
        t = i * step_s
        busy = sum(a <= t < b for a, b in served)
        n429 = sum(t <= x < t + step_s for x in refused)
        out.append((round(t, 3), busy, n429))
    return out
