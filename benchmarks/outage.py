"""The herd with the fleet's Redis down for 10 s in the middle: the store-down policies.

N agents x S model calls (default 100 x 5: more than the provider's budget allows for
~45 s) run in real ``celery worker`` prefork processes (default 2 x 8) against
``ProviderSim`` through the ``openai`` SDK, each call in ``fleet.slot("model")``. The
broker and results live in the shared Redis (``REDIS_URL``, DB 13); the fleet's state
lives in a private ``redis-server`` (``RedisServer``, a free port) that is stopped
``--lead`` s (15) after the agents are fired and started again, empty, ``--outage`` s (10)
later. One run per ``fleet_store_down`` policy (``--policies``, default local, open,
closed), each with fresh workers and a fresh fleet Redis, so each is the others' baseline.

Measured per policy, on the provider simulator's own clock and log:

- tasks completed / failed (task results), makespan (firing to the last agent's end), and
  lost: when nothing moves for ``--stall`` s after the restart, the unfinished agents are
  looked for in the queue, the workers (active, reserved, ETA) and the fleet's deferred
  set; those found nowhere are lost (e.g. reschedules kept in the fleet's Redis,
  ``fleet_defer="redis"``, when it restarts empty) and the run ends there;
- calls that reached the provider during the outage (any outcome) against its budget for
  that window, ``rpm / 60 x (restart - stop)``, as % over (negative: under);
- 429s: during the outage, after the restart, in all (and which provider limit refused);
- leases held at the stop (requests the provider was serving at that moment: they hold
  in-flight budget the local limiter does not know of);
- the local share N the processes used (what each admission reports) against the number
  of worker processes;
- recovery: from the restart to the first admission through Redis again, to the last
  lease the policy still handed out (a process asks Redis again at most every
  ``fallback.RETRY_S``; in brackets how many it handed out after the restart), and until
  the rate of calls reaching the provider is back at its budget: the first moment from
  which every 2 s window for the next 4 s holds rpm / 60 x 2 calls +- 20%.

The agent is the README's loop without durable steps (``self.step`` stores results in
the fleet's Redis: while it is down a step refuses to run, ``Throttled("store_down")``,
whatever the policy, so a durable agent would measure the steps, not the policy).

Prints a table, and ratios of ``local`` against the other two; appends a section to
benchmarks/RESULTS.md. The same module is the workers' Celery app (``celery -A
benchmarks.outage worker`` with ``OUTAGE_ROLE=worker`` and the settings in its
environment, see :func:`worker_app`).

Run: ``python benchmarks/outage.py [--quick]`` or ``make bench-outage`` (~3 minutes on 2
cores; ``--quick``: 60 agents, outage at 8 s, ~2 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery  # noqa: E402

from benchmarks.harness.herd import (  # noqa: E402
    Herd,
    Scenario,
    add_scenario_args,
    close_app,
    scenario_from_args,
    stop_processes,
)
from celery_fleet.testing.redis_server import RedisServer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DB = 13  # broker, results and what the agents report (the shared Redis); keys deleted after
POLICIES = ("local", "open", "closed")
AGENT = "outage.agent"
TARGETS = {"failed": 0, "over": 0.10}  # under "local"
#: Rate recovery: every ``RATE_SPAN_S`` window starting within ``RATE_HOLD_S`` holds the
#: budget +- ``RATE_TOL``.
RATE_SPAN_S, RATE_HOLD_S, RATE_TOL = 2.0, 4.0, 0.20
DEFAULTS = {
    "agents": 100,
    "steps": 5,
    "rpm": 600,
    "tpm": 0,
    "max_in_flight": 8,
    "workers": 2,
    "concurrency": 8,
    "pool": "prefork",
}
QUICK = {"agents": 60, "lead": 8.0, "timeout": 120.0}


# -- the workers' side ----------------------------------------------------------------------


def worker_app() -> Celery:
    """The Celery app of the benchmark's workers, from ``OUTAGE_*`` environment variables.

    One limit, ``model``: the provider's rpm (and in-flight cap), ``burst`` and
    ``headroom`` as given; ``fleet_store_down`` = ``OUTAGE_POLICY``. Each admitted slot is
    reported to the shared Redis (not the fleet's): when, Redis or policy lease, the local
    share, the live count presence last read; reschedules are counted.
    """
    from celery import signals

    from celery_fleet import Fleet, FleetTask, fleet_task
    from celery_fleet.celery.signals import task_rescheduled
    from celery_fleet.resilience.fallback import is_local_lease
    from example_project import model

    env = os.environ
    broker = env["OUTAGE_BROKER"]
    limit: dict[str, Any] = {
        "rpm": int(env["OUTAGE_RPM"]),
        "burst": float(env["OUTAGE_BURST"]),
        "headroom": float(env["OUTAGE_HEADROOM"]),
    }
    if int(env["OUTAGE_IN_FLIGHT"]):
        limit["max_in_flight"] = int(env["OUTAGE_IN_FLIGHT"])
    with_tokens = bool(int(env["OUTAGE_TPM"]))
    if with_tokens:
        limit["tpm"] = int(env["OUTAGE_TPM"])
    app = Celery("outage", broker=broker, backend=broker)
    app.conf.update(
        task_default_queue=env["OUTAGE_QUEUE"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_transport_options={"visibility_timeout": 900},
        worker_prefetch_multiplier=1,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        fleet_redis_url=env["OUTAGE_FLEET_REDIS"],
        fleet_namespace=env["OUTAGE_NS"],
        fleet_store_down=env["OUTAGE_POLICY"],
        fleet_max_countdown=300,
        fleet_max_wait=float(env["OUTAGE_MAX_WAIT"]),
        fleet_limits={"model": limit},
    )
    if env.get("OUTAGE_DEFER"):
        app.conf.fleet_defer = env["OUTAGE_DEFER"]
    if int(env.get("OUTAGE_EXPECTED", "0")):
        app.conf.fleet_expected_processes = int(env["OUTAGE_EXPECTED"])
    fleet = Fleet(app)
    keys = report_keys(env["OUTAGE_NS"])
    probes: dict[int, redis.Redis] = {}

    def probe() -> redis.Redis:
        pid = os.getpid()
        if pid not in probes:
            probes[pid] = redis.Redis.from_url(broker)
        return probes[pid]

    def note(slot: Any) -> None:
        lease = slot.lease_id or ""
        kind = lease.split(".", 1)[0] if is_local_lease(lease) else "redis"
        down = fleet.store_down
        record = {
            "at": slot.decision.at_ms / 1000.0,
            "kind": kind,
            "pid": os.getpid(),
            "share": down.local.share if kind == "local" else None,
            "live": fleet.presence.last_count,
        }
        probe().rpush(keys["admissions"], json.dumps(record))

    @fleet_task(app=app, bind=True, name=AGENT)
    def agent(self: FleetTask, goal: str, steps: int = 5) -> dict[str, Any]:
        """``steps`` model calls, each in its own slot; a reschedule starts it over."""
        started_at, tokens, notes = time.time(), 0, []
        for i in range(steps):
            messages = model.messages_for(goal, i, notes)
            reserve = model.estimate_tokens(messages) if with_tokens else 0
            with fleet.slot("model", tokens=reserve) as slot:
                note(slot)
                raw = model.ask_raw(messages, f"{self.request.id}/call-{i}")
                slot.observe(raw.headers)
                resp = raw.parse()
                if with_tokens:
                    slot.settle(tokens=resp.usage.total_tokens)
            notes.append(resp.choices[0].message.content or "")
            tokens += resp.usage.total_tokens
        return model.summary(goal, steps, tokens, started_at)

    @task_rescheduled.connect(weak=False)
    def _rescheduled(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "name", "") == AGENT:
            probe().incr(keys["reschedules"])

    @signals.worker_process_init.connect(weak=False)
    def _warm_up(**_: Any) -> None:
        model.client()  # before the first agent arrives (cheap, as worker_process_init must be)
        fleet.check()

    return app


def report_keys(namespace: str) -> dict[str, str]:
    """Where the agents report (one hash tag under the run's name: its cleanup drops them)."""
    return {name: f"{{{namespace}:outage}}:{name}" for name in ("admissions", "reschedules")}


def ended_ok(meta: dict[str, Any]) -> bool:
    """Whether a task's result meta is final: SUCCESS, FAILURE or REVOKED (a rescheduled
    task is PENDING or in a state of its own until it ends)."""
    return meta["status"] in ("SUCCESS", "FAILURE", "REVOKED")


def error_of(meta: dict[str, Any]) -> str:
    """``"ExcType: message"`` of a failed task's result meta (message cut at 120 chars)."""
    result = meta.get("result")
    if isinstance(result, dict):
        return f"{result.get('exc_type', '?')}: {str(result.get('exc_message', ''))[:120]}"
    return f"{type(result).__name__}: {str(result)[:120]}"


# -- the arithmetic -------------------------------------------------------------------------


def count_in(times: list[float], start: float, end: float) -> int:
    return sum(start <= t < end for t in times)


def over_budget(reached: int, budget: float) -> float:
    """Calls that reached the provider above (negative: below) its budget, as a fraction."""
    return reached / budget - 1.0 if budget > 0 else math.nan


def rate_back_at(
    times: list[float],
    since: float,
    until: float,
    per_s: float,
    span_s: float = RATE_SPAN_S,
    hold_s: float = RATE_HOLD_S,
    tol: float = RATE_TOL,
    step_s: float = 0.25,
) -> float | None:
    """The first ``t >= since`` from which every ``span_s`` window starting in
    ``[t, t + hold_s]`` holds ``per_s * span_s`` arrivals +- ``tol`` (None: never before
    ``until``, the end of sustained demand)."""
    want = per_s * span_s
    ordered = sorted(times)

    def ok(s: float) -> bool:
        return abs(count_in(ordered, s, s + span_s) - want) <= tol * want

    t = since
    while t + hold_s + span_s <= until:
        steps = int(round(hold_s / step_s))
        if all(ok(t + i * step_s) for i in range(steps + 1)):
            return t
        t += step_s
    return None


# -- one policy -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """One policy's run; times in seconds from firing the agents (the provider's clock)."""

    policy: str
    agents: int
    completed: int
    failed: int
    errors: dict[str, int]
    ended: str  # "done", "timeout" or "stalled" (nothing moved, unfinished agents nowhere)
    unfinished: int
    lost: int  # unfinished and found nowhere (queue, workers, the fleet's deferred set)
    where: dict[str, int]  # where the unfinished ones were found at the last look
    makespan_s: float
    down_s: float  # the fleet Redis stopped
    up_s: float  # it answered again (empty)
    budget: float  # the provider's budget for [down_s, up_s)
    reached: int  # calls that reached the provider in [down_s, up_s), any outcome
    served_outage: int  # of which 200s
    n429_outage: int
    n429_after: int
    n429: int
    n429_by_limit: dict[str, int]
    requests: int
    served: int
    held_at_stop: int
    most_in_flight_outage: int
    processes: int  # worker processes that admitted before the outage
    shares: dict[str, int]  # local share N -> admissions that used it
    live_counts: dict[str, int]  # presence's last count at the admissions before the stop
    first_redis_s: float | None  # restart -> first admission through Redis
    last_policy_s: float | None  # restart -> the last lease the policy handed out
    policy_after: int  # leases the policy handed out after the restart
    rate_back_s: float | None  # restart -> provider arrival rate back at the budget
    demand_until_s: float
    reschedules: int
    kinds_outage: dict[str, int]  # admissions by lease kind during the outage
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def over(self) -> float:
        return over_budget(self.reached, self.budget)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "raw"}
        out["over"] = None if math.isnan(self.over) else round(self.over, 4)
        return out


class OutageHerd(Herd):
    """A :class:`Herd` whose workers keep the fleet's state in a private redis-server that
    this herd stops and starts again mid-run."""

    includes = ()  # the workers' app is this module, which defines the agent itself

    def __init__(
        self, scenario: Scenario, redis_url: str, args: argparse.Namespace, db: int = DB
    ) -> None:
        super().__init__(scenario, redis_url, db)
        self.args = args
        self.fleet_redis = RedisServer()
        self._policy = "local"

    def __exit__(self, *exc: object) -> None:
        try:
            self.fleet_redis.stop()
        finally:
            super().__exit__(*exc)

    def worker_env(self, run: str) -> dict[str, str]:
        a, s = self.args, self.scenario
        return {
            **os.environ,
            "OUTAGE_ROLE": "worker",
            "OUTAGE_BROKER": self.url,
            "OUTAGE_FLEET_REDIS": self.fleet_redis.url,
            "OUTAGE_NS": run,
            "OUTAGE_QUEUE": run,
            "OUTAGE_POLICY": self._policy,
            "OUTAGE_RPM": str(s.rpm),
            "OUTAGE_TPM": str(s.tpm),
            "OUTAGE_IN_FLIGHT": str(s.max_in_flight),
            "OUTAGE_BURST": str(a.burst),
            "OUTAGE_HEADROOM": str(a.headroom),
            "OUTAGE_MAX_WAIT": str(a.max_wait),
            "OUTAGE_EXPECTED": str(a.expected_processes or 0),
            "OUTAGE_DEFER": a.defer or "",
            "OPENAI_BASE_URL": self.sim.base_url,
            "OPENAI_API_KEY": "sim",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }

    def _worker_command(self, name: str, queue: str) -> list[str]:
        command = super()._worker_command(name, queue)
        command[command.index("example_project.app")] = "benchmarks.outage"
        return command

    def _start_workers(self, mode: str, run: str) -> list[tuple[str, subprocess.Popen[bytes]]]:
        """The workers, their output to ``--logs`` (else nowhere); stopped if one fails."""
        if not self.args.logs:
            return super()._start_workers(mode, run)
        Path(self.args.logs).mkdir(parents=True, exist_ok=True)
        procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        try:
            for i in range(self.scenario.workers):
                name = f"{run}-{i}@%h"
                command = [*self._worker_command(name, run), "-l", "INFO"]
                with open(Path(self.args.logs) / f"{run}-{i}.log", "wb") as out:
                    proc = subprocess.Popen(
                        command,
                        cwd=self.worker_cwd,
                        env=self.worker_env(run),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                procs.append((name.replace("%h", os.uname().nodename), proc))
        except BaseException:
            stop_processes(*(p for _, p in procs))
            raise
        return procs

    def run_policy(self, policy: str, progress: Any = None) -> Outcome:
        s = self.scenario
        self._policy = policy
        run = f"outage-{policy}-{uuid.uuid4().hex[:8]}"
        app = Celery("outage-client", broker=self.url, backend=self.url)
        ids: list[str] = []
        with contextlib.ExitStack() as started:  # undone in reverse order, also on errors
            started.callback(self._cleanup_all, app, run, ids)
            self.fleet_redis.start()  # fresh and empty
            started.callback(self.fleet_redis.stop)
            workers = self._start_workers(policy, run)
            started.callback(stop_processes, *(proc for _, proc in workers))
            self._wait_ready(app, [n for n, _ in workers])
            self.sim.reset_stats(refill=True)
            sim_t0 = self.sim.elapsed_s()
            epoch = time.time() - self.sim.elapsed_s()  # wall clock = epoch + provider clock
            ids += [
                app.send_task(AGENT, args=(f"agent {i}",), kwargs={"steps": s.steps}, queue=run).id
                for i in range(s.agents)
            ]
            names = [n for n, _ in workers]
            metas, times, ended, where = self._drive(app, ids, sim_t0, policy, progress, run, names)
            reported = self._reported(run)
        return self._outcome(policy, metas, times, ended, where, sim_t0, epoch, reported)

    def _drive(
        self,
        app: Celery,
        ids: list[str],
        sim_t0: float,
        label: str,
        progress: Any,
        run: str,
        names: list[str],
    ) -> tuple[list[dict[str, Any]], dict[str, float], str, dict[str, str]]:
        """Wait for the agents; stop the fleet's Redis at ``lead`` and start it ``outage``
        later. Returns the metas, the stop/restart times (provider clock, from firing), how
        the wait ended (``"done"``, ``"timeout"``, ``"stalled"``: nothing moved for
        ``--stall`` s after the restart and no unfinished agent is anywhere, see
        :meth:`_locate`) and where the unfinished agents were last seen."""
        a = self.args
        deadline = time.monotonic() + a.timeout
        times: dict[str, float] = {}
        moved, last_state = time.monotonic(), (-1, -1)
        where: dict[str, str] = {}
        while True:
            now = self.sim.elapsed_s() - sim_t0
            if "down" not in times and now >= a.lead:
                times["down"] = self.sim.elapsed_s() - sim_t0
                self.fleet_redis.stop()
                print(f"  {label}: fleet Redis stopped at {times['down']:.1f} s", file=sys.stderr)
            elif "down" in times and "up" not in times and now >= times["down"] + a.outage:
                self.fleet_redis.start()  # the same port, empty
                times["up"] = self.sim.elapsed_s() - sim_t0
                print(f"  {label}: fleet Redis back at {times['up']:.1f} s", file=sys.stderr)
            metas = self._metas(app, ids)
            done = sum(m["status"] == "SUCCESS" for m in metas)
            failed = sum(m["status"] in ("FAILURE", "REVOKED") for m in metas)
            n_log = len(self.sim.log)
            if progress:
                progress(
                    label, done, failed, len(ids), sum(r.outcome == "429" for r in self.sim.log)
                )
            if done + failed == len(ids) and "up" in times:
                return metas, times, "done", {}
            if done + failed == len(ids) and "down" not in times:
                errors = Counter(error_of(m) for m in metas if m["status"] != "SUCCESS")
                raise RuntimeError(
                    f"{label}: every agent ended before the outage at {a.lead:g} s ({failed} "
                    f"failed: {dict(errors)}): fire more agents (--agents) or start the "
                    f"outage earlier (--lead)"
                )
            if (done + failed, n_log) != last_state:
                moved, last_state = time.monotonic(), (done + failed, n_log)
            elif "up" in times and time.monotonic() - moved > a.stall:
                unfinished = [i for i, m in zip(ids, metas, strict=True) if not ended_ok(m)]
                where = self._locate(app, unfinished, run, names)
                print(
                    f"  {label}: nothing moved for {a.stall:g} s; {len(unfinished)} agents "
                    f"unfinished, found: {dict(Counter(where.values())) or 'none'}",
                    file=sys.stderr,
                )
                if not where:
                    return metas, times, "stalled", where
                moved = time.monotonic()
            if time.monotonic() > deadline:
                return metas, times, "timeout", where
            time.sleep(0.1)

    def _locate(self, app: Celery, ids: list[str], run: str, names: list[str]) -> dict[str, str]:
        """Where each of ``ids`` is now: deferred in the fleet's Redis, in the queue,
        unacknowledged (an ETA message a worker holds) or in a worker (active, reserved,
        scheduled). An id found nowhere is lost."""
        wanted, where = set(ids), {}
        fleet = redis.Redis.from_url(self.fleet_redis.url)
        broker = redis.Redis.from_url(self.url)
        try:
            with contextlib.suppress(redis.RedisError):
                for item in fleet.hkeys(f"{{{run}:_deferred}}:items"):
                    where[item.decode().rsplit(":", 1)[0]] = "deferred"
            for raw in broker.lrange(run, 0, -1):
                where[json.loads(raw)["headers"]["id"]] = "queued"
            for raw in broker.hvals("unacked"):
                with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                    where.setdefault(json.loads(raw)[0]["headers"]["id"], "unacked")
        finally:
            fleet.close()
            broker.close()
        inspect = app.control.inspect(destination=names, timeout=1.0)
        for state in ("active", "reserved", "scheduled"):
            for tasks in (getattr(inspect, state)() or {}).values():
                for task in tasks:
                    task_id = task.get("id") or task.get("request", {}).get("id")
                    where.setdefault(task_id, f"worker ({state})")
        return {i: w for i, w in where.items() if i in wanted}

    def _reported(self, run: str) -> dict[str, Any]:
        client = redis.Redis.from_url(self.url)
        try:
            k = report_keys(run)
            return {
                "admissions": [json.loads(x) for x in client.lrange(k["admissions"], 0, -1)],
                "reschedules": int(client.get(k["reschedules"]) or 0),
            }
        finally:
            client.close()

    def _cleanup_all(self, app: Celery, run: str, ids: list[str]) -> None:
        """The run's queue, reports and results (only this run's keys: DB 13 is shared)."""
        client = redis.Redis.from_url(self.url)
        try:
            keys = [run, *client.scan_iter(match=f"{{{run}:*", count=1000)]
            keys += [app.backend.get_key_for_task(i) for i in ids]
            for i in range(0, len(keys), 500):
                client.delete(*keys[i : i + 500])
        finally:
            client.close()
            close_app(app)

    def _outcome(
        self,
        policy: str,
        metas: list[dict[str, Any]],
        times: dict[str, float],
        ended: str,
        where: dict[str, str],
        sim_t0: float,
        epoch: float,
        reported: dict[str, Any],
    ) -> Outcome:
        s = self.scenario
        log = self.sim.log
        down, up = times.get("down", math.nan), times.get("up", math.nan)
        arrivals = [r.t_s - sim_t0 for r in log]
        in_outage = [r for r in log if down <= r.t_s - sim_t0 < up]
        served = [r for r in log if r.status == 200]
        ok = [m["result"] for m in metas if m["status"] == "SUCCESS"]
        ends = [m["finished_at"] - epoch - sim_t0 for m in ok]
        errors = Counter(error_of(m) for m in metas if m["status"] in ("FAILURE", "REVOKED"))
        # admissions the workers reported, on the provider clock from firing
        adm = [{**r, "t": r["at"] - epoch - sim_t0} for r in reported["admissions"]]
        before = [r for r in adm if r["t"] < down]
        during = [r for r in adm if down <= r["t"] < up]
        after = [r for r in adm if r["t"] >= up]
        first_redis = min((r["t"] for r in after if r["kind"] == "redis"), default=None)
        last_policy = max((r["t"] for r in after if r["kind"] != "redis"), default=None)
        # sustained demand ends when the backlog no longer fills the budget: the last
        # arrival, less the time the stragglers' last calls take
        demand_until = (max(arrivals) if arrivals else 0.0) - 2.0
        per_s = s.rpm / 60.0
        back = rate_back_at(arrivals, up, demand_until, per_s) if not math.isnan(up) else None
        return Outcome(
            policy=policy,
            agents=len(metas),
            completed=len(ok),
            failed=sum(m["status"] in ("FAILURE", "REVOKED") for m in metas),
            errors=dict(errors),
            ended=ended,
            unfinished=sum(not ended_ok(m) for m in metas),
            lost=sum(not ended_ok(m) for m in metas) if ended == "stalled" else 0,
            where=dict(Counter(where.values())),
            makespan_s=round(max(ends), 2) if ends and ended == "done" else math.nan,
            down_s=round(down, 3),
            up_s=round(up, 3),
            budget=per_s * (up - down),
            reached=len(in_outage),
            served_outage=sum(r.status == 200 for r in in_outage),
            n429_outage=sum(r.outcome == "429" for r in in_outage),
            n429_after=sum(r.outcome == "429" and r.t_s - sim_t0 >= up for r in log),
            n429=sum(r.outcome == "429" for r in log),
            n429_by_limit=dict(Counter(str(r.limit) for r in log if r.outcome == "429")),
            requests=len(log),
            served=len(served),
            held_at_stop=sum(r.t_s - sim_t0 < down < r.t_s - sim_t0 + r.latency_s for r in served),
            most_in_flight_outage=max((r.in_flight + 1 for r in in_outage), default=0),
            processes=len({r["pid"] for r in before}),
            shares=dict(Counter(str(r["share"]) for r in during if r["kind"] == "local")),
            live_counts=dict(Counter(str(r["live"]) for r in before if r["t"] > down - 5.0)),
            first_redis_s=round(first_redis - up, 2) if first_redis is not None else None,
            last_policy_s=round(last_policy - up, 2) if last_policy is not None else None,
            policy_after=sum(r["kind"] != "redis" for r in after),
            rate_back_s=round(back - up, 2) if back is not None else None,
            demand_until_s=round(demand_until, 2),
            reschedules=reported["reschedules"],
            kinds_outage=dict(Counter(r["kind"] for r in during)),
            raw={
                "provider": [
                    (
                        round(r.t_s - sim_t0, 4),
                        r.outcome,
                        r.limit,
                        round(r.latency_s, 4),
                        r.in_flight,
                    )
                    for r in log
                ],
                "admissions": adm,
            },
        )


# -- report ---------------------------------------------------------------------------------


def _s(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f} s"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:+.1%}"


def _shares(o: Outcome) -> str:
    return ", ".join(f"{k}" for k in sorted(o.shares, key=str)) or "-"


COLUMNS: list[tuple[str, Any]] = [
    ("policy", lambda o: o.policy),
    ("completed", lambda o: f"{o.completed}/{o.agents}"),
    ("failed", lambda o: str(o.failed)),
    ("lost", lambda o: str(o.lost) if o.ended != "timeout" else f"? ({o.unfinished} at timeout)"),
    ("reached in outage / budget", lambda o: f"{o.reached} / {o.budget:.0f}"),
    ("over budget", lambda o: _pct(o.over)),
    ("429s outage / after / all", lambda o: f"{o.n429_outage} / {o.n429_after} / {o.n429}"),
    ("first Redis admission", lambda o: _s(o.first_redis_s)),
    ("last policy lease", lambda o: _s(o.last_policy_s) + f" ({o.policy_after})"),
    ("rate back at budget", lambda o: _s(o.rate_back_s)),
    ("makespan", lambda o: _s(o.makespan_s)),
    ("local N / procs", lambda o: f"{_shares(o)} / {o.processes}"),
    ("held at stop", lambda o: str(o.held_at_stop)),
    ("resched", lambda o: str(o.reschedules)),
]


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


RATIO_ROWS: list[tuple[str, Any]] = [
    ("tasks completed", lambda o: o.completed),
    ("tasks failed", lambda o: o.failed),
    ("tasks unfinished (lost or timed out)", lambda o: o.unfinished),
    ("calls reaching the provider in the outage", lambda o: o.reached),
    ("of which served (200)", lambda o: o.served_outage),
    ("429s, whole run", lambda o: o.n429),
    ("requests, whole run", lambda o: o.requests),
    ("makespan, s", lambda o: o.makespan_s),
    ("restart -> rate back at budget, s", lambda o: o.rate_back_s),
]


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def tables(outcomes: list[Outcome]) -> tuple[list[list[str]], list[list[str]]]:
    """The per-policy table and the ratio table (``local`` against the others), as rows."""
    main = [[name for name, _ in COLUMNS]] + [[f(o) for _, f in COLUMNS] for o in outcomes]
    by = {o.policy: o for o in outcomes}
    base = [p for p in POLICIES if p in by and p != "local"]
    head = ["metric", *[p for p in POLICIES if p in by]]
    if "local" in by:
        head += [f"local / {p}" for p in base]
    ratios = [head]
    for name, f in RATIO_ROWS:
        row = [name, *[_cell(f(by[p])) for p in POLICIES if p in by]]
        if "local" in by:
            row += [_ratio(f(by["local"]), f(by[p])) for p in base]
        ratios.append(row)
    return main, ratios


def plain(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_rows(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def verdict(outcomes: list[Outcome]) -> str:
    local = next((o for o in outcomes if o.policy == "local"), None)
    if local is None:
        return "no run under 'local': target not checked"
    ok_failed = local.failed == TARGETS["failed"] and local.ended == "done"
    ok_over = local.over <= TARGETS["over"]
    return (
        f"target under 'local' {'met' if ok_failed and ok_over else 'MISSED'}: "
        f"{local.failed} failed, {local.unfinished} unfinished "
        f"({'met' if ok_failed else 'MISSED'}; target 0), "
        f"{_pct(local.over)} over the outage window's budget "
        f"({'met' if ok_over else 'MISSED'}; target <= +10%)"
    )


def setup_text(args: argparse.Namespace, s: Scenario) -> str:
    n = s.workers * s.concurrency
    expected = (
        f"fleet_expected_processes {args.expected_processes}"
        if args.expected_processes
        else "N from presence"
    )
    if args.defer:
        expected += f", fleet_defer {args.defer!r}"
    return (
        f"{s.agents} agents x {s.steps} calls fired at once; provider {s.rpm} rpm (bucket "
        f"{s.provider_burst_s:g} s), {s.max_in_flight or 'no'} in flight, latency median "
        f"{s.latency} s (sigma {s.latency_sigma}); fleet limit `model` rpm {s.rpm}, "
        f"max_in_flight {s.max_in_flight or None}, burst {args.burst}, headroom "
        f"{args.headroom}, fleet_max_wait {args.max_wait:g}; {s.workers} x {s.concurrency} "
        f"{s.pool} worker processes ({n}; {expected}). Broker and results: shared Redis "
        f"DB {DB}; fleet state: a private redis-server, stopped {args.lead:g} s after firing "
        f"and started again (empty) {args.outage:g} s later. Budget of the window = rpm / 60 "
        f"x (restart - stop), on the provider's clock; 'reached' counts every request that "
        f"arrived at the provider in it, 429s included. Rate back at budget: the first moment "
        f"after the restart from which every {RATE_SPAN_S:g} s window for {RATE_HOLD_S:g} s "
        f"holds the budget +-{RATE_TOL:.0%}."
    )


def markdown(args: argparse.Namespace, outcomes: list[Outcome], command: str) -> str:
    from goodput import machine  # benchmarks/ is on sys.path as a script

    s = scenario_of(args)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    main, ratios = tables(outcomes)
    return "\n".join(
        [
            f"\n## Outage: {s.agents} agents x {s.steps} calls, fleet Redis down "
            f"{args.outage:g} s at {args.lead:g} s ({when})\n",
            f"Machine: {machine()}  ",
            f"Command: `{command}`\n",
            setup_text(args, s) + "\n",
            markdown_rows(main),
            "",
            markdown_rows(ratios),
            "",
            verdict(outcomes) + ".",
            "",
        ]
    )


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="--quick: 60 agents, outage at 8 s (still 10 s long), timeout 120 s per "
        "policy (~2.5 minutes); explicit options still win.",
    )
    add_scenario_args(p)
    p.add_argument("--quick", action="store_true", help="a shorter run (see below)")
    p.add_argument("--policies", default=",".join(POLICIES), help="fleet_store_down values")
    p.add_argument("--lead", type=float, default=15.0, help="s from firing to the stop")
    p.add_argument("--outage", type=float, default=10.0, help="s the fleet's Redis is down")
    p.add_argument("--burst", type=float, default=0.05, help="the fleet limit's burst")
    p.add_argument("--headroom", type=float, default=0.0, help="the fleet limit's headroom")
    p.add_argument(
        "--provider-burst", type=float, default=6.0, help="s of rpm the provider's bucket holds"
    )
    p.add_argument("--max-wait", type=float, default=30.0, help="fleet_max_wait, s")
    p.add_argument(
        "--expected-processes", type=int, default=0, help="fleet_expected_processes (0: unset)"
    )
    p.add_argument("--defer", choices=["redis", "countdown"], help="fleet_defer (default: unset)")
    p.add_argument("--timeout", type=float, default=180.0, help="s per policy")
    p.add_argument(
        "--stall",
        type=float,
        default=15.0,
        help="s without progress after the restart before looking for unfinished agents",
    )
    p.add_argument("--json", help="write the figures as JSON here")
    p.add_argument("--dump", help="write every policy's provider log and admissions here")
    p.add_argument("--logs", help="a directory for the workers' logs (default: none)")
    p.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    p.set_defaults(**DEFAULTS)
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    unknown = sorted(set(args.policies) - set(POLICIES))
    if unknown or not args.policies:
        p.error(f"--policies: one or more of {', '.join(POLICIES)}; got {unknown}")
    return args


def scenario_of(args: argparse.Namespace) -> Scenario:
    return dataclasses.replace(
        scenario_from_args(args), provider_burst_s=args.provider_burst, timeout_s=args.timeout
    )


def main(argv: list[str] | None = None) -> int:
    from benchmarks.harness.demo import progress

    args = parse_args(argv)
    scenario = scenario_of(args)
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    print(
        f"outage: {scenario.agents} agents x {scenario.steps} calls, {scenario.rpm} rpm, "
        f"{scenario.workers} x {scenario.concurrency} {scenario.pool}; fleet Redis down "
        f"{args.outage:g} s at {args.lead:g} s; policies {', '.join(args.policies)}",
        file=sys.stderr,
    )
    outcomes: list[Outcome] = []
    with OutageHerd(scenario, base, args) as herd:
        for policy in args.policies:
            outcomes.append(herd.run_policy(policy, progress))
    main_rows, ratio_rows = tables(outcomes)
    print("\n" + plain(main_rows) + "\n\n" + plain(ratio_rows) + "\n\n" + verdict(outcomes))
    for o in outcomes:
        extra = {
            "429s by limit": o.n429_by_limit,
            "admissions in outage by kind": o.kinds_outage,
            "presence counts before stop": o.live_counts,
            "local shares": o.shares,
            "most in flight at provider (outage)": o.most_in_flight_outage,
            "errors": o.errors,
        }
        print(f"  {o.policy}: {json.dumps(extra)}")
    payload = {
        "scenario": dataclasses.asdict(scenario),
        "fleet": {"burst": args.burst, "headroom": args.headroom, "max_wait": args.max_wait},
        "outage": {"lead_s": args.lead, "duration_s": args.outage},
        "runs": [o.summary() for o in outcomes],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if args.dump:
        Path(args.dump).write_text(json.dumps({o.policy: o.raw for o in outcomes}) + "\n")
    if not args.no_write:
        command = "python benchmarks/outage.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        with RESULTS.open("a") as f:
            f.write(markdown(args, outcomes, command.strip()))
        print(f"appended to {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if os.environ.get("OUTAGE_ROLE") == "worker":  # imported by `celery -A benchmarks.outage`
    app = worker_app()

if __name__ == "__main__":
    sys.exit(main())
