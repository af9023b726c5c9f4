"""Goodput under sustained overload: do agents get their work done without paying twice?

:class:`GoodputHerd` is a :class:`~benchmarks.harness.herd.Herd` (one ProviderSim, real
``celery worker`` processes, workers stopped by pid) that runs the agents of
:mod:`benchmarks.harness.goodput_agents` in one configuration at a time: a package (the
current one, or the code of an older commit exported to a directory, the baseline), an
agent kind (``plain`` or ``durable``) and ``fleet_max_wait``. It fires every agent at
once, waits until they are done or the timeout passes, and measures from the provider's
own log (paid and useful calls, 429s), the task results (completion times) and what the
agents reported through Redis (admission order, reschedules).

The pure helpers below (:func:`ideal_s`, :func:`wasted`, :func:`percentile`,
:func:`ticket_order`) hold the arithmetic and are tested on their own.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from .herd import ROOT, Herd, Scenario, stop_processes

AGENTS_MODULE = "benchmarks.harness.goodput_agents"
KINDS = {"baseline": "plain_agent", "plain": "plain_agent", "durable": "durable_agent"}
#: Ties in :func:`ticket_order` (s): ``line`` ages are exact but first asks are estimated
#: (``at_ms - waited_s``, early by a round trip plus thread scheduling); a ``stamp`` is
#: taken one round trip before the first ask while 10-40 threads that started together
#: compete for the GIL. ``strict``: ``line`` with no ties at all.
TIE_S = {"line": 0.02, "stamp": 0.05, "strict": 0.0}
Progress = Callable[[str, int, int, int, int], None]  # label, done, failed, total, 429s


def keys(namespace: str) -> dict[str, str]:
    """The Redis keys the agents of ``namespace`` report through (one hash tag, so the
    run's cleanup of ``{<namespace>:*`` deletes them)."""
    tag = f"{{{namespace}:goodput}}"
    return {name: f"{tag}:{name}" for name in ("admissions", "ages", "reschedules")}


# -- the arithmetic ------------------------------------------------------------------------


def effective_rate(rpm: float, headroom: float) -> float:
    """Calls per second the fleet admits when sustained: the rpm left after headroom / 60."""
    return rpm * (1.0 - headroom) / 60.0


def ideal_s(useful_calls: int, rpm: float, headroom: float) -> float:
    """The ideal makespan: useful calls at the fleet's effective rate (no burst credit)."""
    return useful_calls / effective_rate(rpm, headroom)


def wasted(paid: int, useful: int) -> float:
    """The fraction of paid calls that were not needed: ``(paid - useful) / paid``."""
    return (paid - useful) / paid if paid else 0.0


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Admission:
    """One admitted slot: its caller's age, when it first asked and when it was admitted
    (seconds, one clock), and whether it was refused before (a contended admission)."""

    age: float
    ask: float
    admit: float
    contended: bool


def ticket_order(admissions: Sequence[Admission], tie_s: float = 0.0) -> tuple[int, int]:
    """``(contended, passed)``: how many admissions waited, and how many of those were
    passed while they waited: some younger caller was admitted after they asked and before
    they were. ``1 - passed / contended`` is the share in ticket order.

    Differences up to ``tie_s`` are ties: in age, and in time from either end of the wait
    (a first ask is known only to a round trip or so; two callers woken by one refill are
    admitted within milliseconds of each other, in whichever order they ask)."""
    ordered = sorted(admissions, key=lambda a: a.admit)
    admits = [a.admit for a in ordered]
    contended = passed = 0
    for b in admissions:
        if not b.contended:
            continue
        contended += 1
        lo = bisect.bisect_right(admits, b.ask + tie_s)
        hi = bisect.bisect_left(admits, b.admit - tie_s)
        if any(a.age > b.age + tie_s for a in ordered[lo:hi]):
            passed += 1
    return contended, passed


def admissions_from(
    records: Iterable[dict[str, Any]], ages: dict[str, float]
) -> dict[str, list[Admission]]:
    """The agents' admission records, all on the Redis clock (s): admitted at ``at_ms``,
    first asked ``waited_s`` before, aged two ways: ``line``, the run's ``since_ms`` (what
    the new package's line orders by; absent on the old one) and ``stamp``, the task's own
    first ask (``ages``, stamped by the agents on any package)."""
    out: dict[str, list[Admission]] = {"line": [], "stamp": []}
    for r in records:
        admit = r["at_ms"] / 1000.0
        ask, contended = admit - r["waited_s"], r["attempts"] > 1
        if r.get("since_ms"):
            out["line"].append(Admission(r["since_ms"] / 1000.0, ask, admit, contended))
        if r["task"] in ages:
            out["stamp"].append(Admission(ages[r["task"]] / 1000.0, ask, admit, contended))
    return out


# -- one configuration ---------------------------------------------------------------------


@dataclass
class Outcome:
    """What one configuration did (times in seconds from firing the agents)."""

    kind: str
    max_wait_s: float
    package: str
    agents: int
    steps: int
    done: int
    failed: int
    timed_out: bool
    paid: int
    useful: int
    requests: int
    provider_429: int
    reschedules: int
    makespan_s: float
    ideal_s: float
    completion_s: list[float] = field(repr=False)
    order: dict[str, tuple[int, int]]
    #: what the agents reported and the provider's log, for a closer look (``--dump``)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def wasted(self) -> float:
        return wasted(self.paid, self.useful)

    @property
    def ratio(self) -> float:
        return self.makespan_s / self.ideal_s if self.ideal_s else math.nan

    def in_order(self, age: str = "line") -> float:
        """The share of contended admissions in ticket order (``line``, ``stamp``, ``strict``)."""
        contended, passed = self.order.get(age, (0, 0))
        return 1.0 - passed / contended if contended else math.nan

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("completion_s", "raw")}
        out.update(
            wasted=round(self.wasted, 4),
            ratio=round(self.ratio, 3),
            p50_s=percentile(self.completion_s, 50),
            p99_s=percentile(self.completion_s, 99),
            max_s=percentile(self.completion_s, 100),
            in_order_line=round(self.in_order("line"), 4),
            in_order_stamp=round(self.in_order("stamp"), 4),
            in_order_strict=round(self.in_order("strict"), 4),
        )
        # JSON has no NaN: a figure that does not exist (no agent done, no contention) is None
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def export_commit(commit: str, into: Path) -> Path:
    """``git archive <commit> celery_fleet`` unpacked under ``into``: the old package."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "celery_fleet"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


class GoodputHerd(Herd):
    """A Herd that runs the goodput agents; ``burst`` and ``headroom``: the model limit's."""

    includes = (*Herd.includes, AGENTS_MODULE)

    def __init__(
        self, scenario: Scenario, redis_url: str, db: int, burst: float, headroom: float
    ) -> None:
        super().__init__(scenario, redis_url, db)
        self.burst, self.headroom = burst, headroom
        self._extra_env: dict[str, str] = {}

    def __enter__(self) -> GoodputHerd:
        super().__enter__()
        return self

    def worker_env(self, run: str) -> dict[str, str]:
        return {
            **super().worker_env(run),
            "MODEL_BURST": str(self.burst),
            "MODEL_HEADROOM": str(self.headroom),
            **self._extra_env,
        }

    def run_config(
        self,
        kind: str,
        max_wait_s: float,
        timeout_s: float,
        old_package: Path | None = None,
        progress: Progress | None = None,
    ) -> Outcome:
        """Run every agent once in one configuration (``old_package``: a directory whose
        ``celery_fleet`` the workers must import instead of the current one)."""
        s = self.scenario
        run = f"goodput-{kind}-{uuid.uuid4().hex[:8]}"
        pythonpath = [str(old_package)] if old_package else []
        self._extra_env = {
            "EXAMPLE_MAX_WAIT": str(max_wait_s),
            "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT)]),
        }
        # A worker's sys.path[0] is its cwd: the checkout's celery_fleet would come first.
        self.worker_cwd = old_package or ROOT
        app = Celery("goodput-client", broker=self.url, backend=self.url)
        with contextlib.ExitStack() as started:
            started.callback(self._cleanup, app, run)
            workers = self._start_workers(kind, run)
            started.callback(stop_processes, *(proc for _, proc in workers), grace_s=10.0)
            self._wait_ready(app, [n for n, _ in workers])
            package = app.send_task(f"{AGENTS_MODULE}.whoami", queue=run).get(timeout=60)
            package = str(package["celery_fleet"])
            if old_package and not package.startswith(str(old_package)):
                raise RuntimeError(f"baseline worker imported {package}, not {old_package}")
            self.sim.reset_stats(refill=True)
            t0 = time.time()
            ids = [
                app.send_task(
                    f"{AGENTS_MODULE}.{KINDS[kind]}",
                    args=(f"agent {i}",),
                    kwargs={"steps": s.steps},
                    queue=run,
                ).id
                for i in range(s.agents)
            ]
            label = f"{kind} {max_wait_s:g}s"
            metas, timed_out = self._wait_done(app, ids, timeout_s, label, progress)
            reported = self._reported(run)
            waited_s = time.time() - t0
        return self._outcome(kind, max_wait_s, package, t0, waited_s, metas, timed_out, reported)

    def _wait_done(
        self, app: Celery, ids: list[str], timeout_s: float, label: str, progress: Progress | None
    ) -> tuple[list[dict[str, Any]], bool]:
        deadline = time.monotonic() + timeout_s
        while True:
            metas = self._metas(app, ids)
            done = sum(m["status"] == "SUCCESS" for m in metas)
            failed = sum(m["status"] in ("FAILURE", "REVOKED") for m in metas)
            if progress:
                progress(
                    label, done, failed, len(ids), sum(r.outcome == "429" for r in self.sim.log)
                )
            if done + failed == len(ids):
                return metas, False
            if time.monotonic() > deadline:
                return metas, True
            time.sleep(0.25)

    def _reported(self, run: str) -> dict[str, Any]:
        """What the agents wrote to Redis (read before the run's keys are deleted)."""
        client = redis.Redis.from_url(self.url)
        try:
            k = keys(run)
            records = [json.loads(raw) for raw in client.lrange(k["admissions"], 0, -1)]
            ages = {
                t.decode() if isinstance(t, bytes) else t: float(v)
                for t, v in client.hgetall(k["ages"]).items()
            }
            return {
                "records": records,
                "ages": ages,
                "reschedules": int(client.get(k["reschedules"]) or 0),
            }
        finally:
            client.close()

    def _outcome(
        self,
        kind: str,
        max_wait_s: float,
        package: str,
        t0: float,
        waited_s: float,
        metas: list[dict[str, Any]],
        timed_out: bool,
        reported: dict[str, Any],
    ) -> Outcome:
        s = self.scenario
        ok = [m["result"] for m in metas if m["status"] == "SUCCESS"]
        log = self.sim.log
        served = [r.task_id for r in log if r.admitted]
        completion = sorted(round(r["finished_at"] - t0, 3) for r in ok)
        admissions = admissions_from(reported["records"], reported["ages"])
        admissions["strict"] = admissions["line"]
        order = {age: ticket_order(adm, TIE_S[age]) for age, adm in admissions.items()}
        return Outcome(
            kind=kind,
            max_wait_s=max_wait_s,
            package=package,
            agents=s.agents,
            steps=s.steps,
            done=len(ok),
            failed=sum(m["status"] in ("FAILURE", "REVOKED") for m in metas),
            timed_out=timed_out,
            paid=len(served),
            useful=len(set(served)),  # distinct (task, step): N x S when every agent is done
            requests=len(log),
            provider_429=sum(r.outcome == "429" for r in log),
            reschedules=reported["reschedules"],
            makespan_s=round(max(completion) if ok and not timed_out else waited_s, 3),
            ideal_s=round(ideal_s(s.agents * s.steps, s.rpm, self.headroom), 3),
            completion_s=completion,
            order=order,
            raw={
                **reported,
                "t0": t0,
                # the provider's t_s + epoch = wall-clock time (the Redis clock's) of arrival
                "provider_epoch": time.time() - self.sim.elapsed_s(),
                "provider": [(r.t_s, r.outcome, r.task_id, r.latency_s) for r in log],
            },
        )


def flush_db(url: str, db: int) -> None:
    """FLUSHDB the benchmark's own DB, after checking the client is on that DB."""
    client = redis.Redis.from_url(url)
    try:
        if client.connection_pool.connection_kwargs.get("db") != db:
            raise RuntimeError(f"{url} is not DB {db}: refusing to flush it")
        client.flushdb()
    finally:
        client.close()
