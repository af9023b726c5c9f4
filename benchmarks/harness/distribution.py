"""The distribution benchmark's workload and arithmetic (``benchmarks/distribution.py``).

No worker, no Redis: the plan of tasks (customers, some ``heavy`` times heavier), the warm-up
cache the workers hold per process, and the figures a run's records give (makespan,
locality, per-worker utilisation, how a customer's tasks spread, what a SIGKILL lost or ran
twice). ``tests/test_distribution_bench.py`` checks them on hand-made records.

Times are ``time.monotonic()`` seconds: on Linux that is CLOCK_MONOTONIC, one clock for every
process of the host, so the client's start and the workers' task times compare.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MODES",
    "ModeStats",
    "Record",
    "TaskSpec",
    "WarmCache",
    "Workload",
    "kill_lines",
    "ratios",
    "settled",
    "summarise",
    "table",
    "targets",
]

#: The modes of issue 24, in the order a run alternates them.
MODES = ("shared", "dedicated", "steal")


@dataclass(frozen=True)
class Workload:
    """``customers`` customers, ``tasks_per_customer`` tasks each; every ``heavy_every``-th
    customer is ``heavy`` times slower; a worker's first task of a customer also pays
    ``warmup_s`` (its cache for that customer)."""

    customers: int = 24
    tasks_per_customer: int = 8
    light_s: float = 0.08
    heavy: float = 10.0
    heavy_every: int = 6
    warmup_s: float = 0.1

    def customer(self, c: int) -> str:
        return f"c{c:02d}"

    def is_heavy(self, c: int) -> bool:
        return c % self.heavy_every == 0

    def cost_s(self, c: int) -> float:
        return self.light_s * (self.heavy if self.is_heavy(c) else 1.0)

    def plan(self) -> list[TaskSpec]:
        """Every task, interleaved round-robin over the customers (the publish order): each
        customer's work arrives spread over the run, not in one block."""
        return [
            TaskSpec(self.customer(c), self.cost_s(c))
            for _ in range(self.tasks_per_customer)
            for c in range(self.customers)
        ]

    def work_s(self) -> float:
        """The task time of the whole plan without any warm-up."""
        return sum(t.cost_s for t in self.plan())


@dataclass(frozen=True)
class TaskSpec:
    customer: str
    cost_s: float


class WarmCache:
    """What a worker process has loaded, per customer: the first task of a customer loads it
    (sleeps ``warmup_s``), later ones find it warm. A task arriving while another thread is
    loading the same customer waits for that load and counts as cold (it paid a wait)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, threading.Event] = {}

    def enter(self, customer: str, warmup_s: float) -> bool:
        """Make ``customer`` loaded in this process; True when it already was (warm)."""
        with self._lock:
            ready = self._loaded.get(customer)
            loader = ready is None
            if ready is None:
                ready = self._loaded[customer] = threading.Event()
        if loader:
            time.sleep(warmup_s)
            ready.set()
            return False
        if ready.is_set():
            return True
        ready.wait()
        return False


@dataclass(frozen=True)
class Record:
    """One task run as a worker reported it (``ev`` "done"; "start" records only count runs)."""

    id: str
    customer: str
    worker: str
    warm: bool
    start: float
    end: float
    ev: str = "done"
    redelivered: bool = False
    queue: str = ""  # the routing key it was delivered with (its affinity queue)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Record:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            id=data["id"],
            customer=data.get("customer", ""),
            worker=data.get("worker", ""),
            warm=bool(data.get("warm", False)),
            start=float(data.get("start", 0.0)),
            end=float(data.get("end", 0.0)),
            ev=data.get("ev", "done"),
            redelivered=bool(data.get("redelivered", False)),
            queue=data.get("queue") or "",
        )


@dataclass
class ModeStats:
    """What one run of one mode gave."""

    mode: str
    published: int  # tasks sent
    tasks: int  # completions (a task completed twice counts twice)
    makespan_s: float
    locality: float  # share of completed tasks that ran warm
    affinity: float  # mean over customers: share of its tasks on its most used worker
    utilisation: dict[str, float]  # worker: busy slot-seconds / (slots x makespan)
    per_worker: dict[str, int]  # worker: tasks completed
    runs: int  # task starts (a task cut by a SIGKILL starts again elsewhere)
    lost: list[str] = field(default_factory=list)  # expected ids never completed
    twice: list[str] = field(default_factory=list)  # ids completed more than once
    killed: str = ""
    kill_at_s: float = float("nan")
    #: when the last redelivered task started (s after t0): a SIGKILL's cut tasks ran again
    redelivered_s: float = float("nan")
    #: tasks run by a worker other than their queue's home (seen from the records; None:
    #: the mode has no homes)
    stolen: int | None = None
    #: the same as the fleet counted it (``{<ns>:affinity}:stats``; None: not read)
    fleet_stolen: int | None = None

    @property
    def exactly_once(self) -> bool:
        return not self.lost and not self.twice

    @property
    def mean_utilisation(self) -> float:
        return statistics.fmean(self.utilisation.values()) if self.utilisation else 0.0


def summarise(
    mode: str,
    records: Iterable[Record],
    *,
    t0: float,
    slots: int,
    expected: Sequence[str],
    workers: Sequence[str] = (),
    homes: Mapping[str, str] | None = None,
) -> ModeStats:
    """The figures of one run from its records.

    ``t0``: when the client began publishing; the makespan runs from it to the last task's
    end. ``slots``: concurrency per worker; a worker's utilisation is its tasks' summed
    time (warm-up included: it is work the worker did) over ``slots x makespan``.
    ``workers``: names to list even when they ran nothing. ``expected``: every task id
    published; each must be completed exactly once. ``homes``: each affinity queue's home
    worker when the run began; a task run by another worker was stolen (None: no homes,
    nothing counted).
    """
    records = list(records)
    done = [r for r in records if r.ev == "done"]
    starts = sum(r.ev == "start" for r in records)
    makespan = max((r.end for r in done), default=t0) - t0
    busy: dict[str, float] = {w: 0.0 for w in workers}
    count: dict[str, int] = {w: 0 for w in workers}
    by_customer: dict[str, Counter[str]] = defaultdict(Counter)
    for r in done:
        busy[r.worker] = busy.get(r.worker, 0.0) + (r.end - r.start)
        count[r.worker] = count.get(r.worker, 0) + 1
        by_customer[r.customer][r.worker] += 1
    completions = Counter(r.id for r in done)
    again = [r.start - t0 for r in done if r.redelivered]
    denominator = slots * makespan
    return ModeStats(
        mode=mode,
        published=len(expected),
        tasks=len(done),
        makespan_s=makespan,
        locality=sum(r.warm for r in done) / len(done) if done else 0.0,
        affinity=statistics.fmean(max(c.values()) / sum(c.values()) for c in by_customer.values())
        if by_customer
        else 0.0,
        utilisation={w: (b / denominator if denominator > 0 else 0.0) for w, b in busy.items()},
        per_worker=count,
        runs=starts,
        lost=sorted(set(expected) - set(completions)),
        twice=sorted(i for i, n in completions.items() if n > 1),
        redelivered_s=max(again, default=float("nan")),
        stolen=None
        if homes is None
        else sum(homes.get(r.queue, r.worker) != r.worker for r in done),
    )


@dataclass(frozen=True)
class Targets:
    """Issue 24's targets: steal's makespan within ``makespan_slack`` of shared's, and its
    locality at least ``locality_share`` of dedicated's."""

    makespan_ratio: float  # steal / shared (lower is better)
    locality_ratio: float  # steal / dedicated (higher is better)
    makespan_slack: float = 0.10
    locality_share: float = 0.90

    @property
    def makespan_met(self) -> bool:
        return self.makespan_ratio <= 1.0 + self.makespan_slack

    @property
    def locality_met(self) -> bool:
        return self.locality_ratio >= self.locality_share


def targets(shared: ModeStats, dedicated: ModeStats, steal: ModeStats) -> Targets:
    """Steal against shared (makespan) and against dedicated (locality)."""
    return Targets(
        makespan_ratio=steal.makespan_s / shared.makespan_s if shared.makespan_s else float("inf"),
        locality_ratio=steal.locality / dedicated.locality if dedicated.locality else float("inf"),
    )


def _median_or_none(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return int(statistics.median(known)) if known else None


def median_stats(runs: Sequence[ModeStats]) -> ModeStats:
    """One mode's repeated runs as one: median makespan, locality, affinity and utilisation;
    the union of lost / twice ids. A single run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    workers = sorted({w for r in runs for w in r.utilisation})
    return ModeStats(
        mode=runs[0].mode,
        published=runs[0].published,
        tasks=int(statistics.median(r.tasks for r in runs)),
        makespan_s=statistics.median(r.makespan_s for r in runs),
        locality=statistics.median(r.locality for r in runs),
        affinity=statistics.median(r.affinity for r in runs),
        utilisation={
            w: statistics.median(r.utilisation.get(w, 0.0) for r in runs) for w in workers
        },
        per_worker={
            w: int(statistics.median(r.per_worker.get(w, 0) for r in runs)) for w in workers
        },
        runs=int(statistics.median(r.runs for r in runs)),
        stolen=_median_or_none([r.stolen for r in runs]),
        fleet_stolen=_median_or_none([r.fleet_stolen for r in runs]),
        lost=sorted({i for r in runs for i in r.lost}),
        twice=sorted({i for r in runs for i in r.twice}),
    )


def settled(homes: dict[str, set[str]], workers: Sequence[str], queues: int) -> bool:
    """Whether the affinity queues each worker consumes (``homes``, from ``inspect
    active_queues``) are spread: every worker has some, none is consumed twice, and all
    ``queues`` are consumed."""
    if set(homes) != set(workers) or any(not qs for qs in homes.values()):
        return False
    every = [q for qs in homes.values() for q in qs]
    return len(every) == len(set(every)) == queues


def short(worker: str) -> str:
    return worker.split("@")[0]


def stolen_text(r: ModeStats) -> str:
    """``stolen`` as seen from the records, with the fleet's own count after a slash when
    it differs; only the fleet's (``/n``) when the records could not tell (the homes moved:
    a SIGKILL run); "-" when the mode has no homes."""
    if r.stolen is None:
        return "-" if r.fleet_stolen is None else f"/{r.fleet_stolen}"
    if r.fleet_stolen is None or r.fleet_stolen == r.stolen:
        return str(r.stolen)
    return f"{r.stolen}/{r.fleet_stolen}"


def table(rows: list[ModeStats]) -> str:
    """The text table of the modes (one row each)."""
    names = sorted({w for r in rows for w in r.utilisation})
    head = (
        f"{'mode':<10}{'makespan s':>11}{'locality':>10}{'affinity':>10}"
        f"{'util mean':>10}{'stolen':>8}  per worker: util (tasks)"
    )
    lines = [head]
    for r in rows:
        per = "  ".join(
            f"{short(w)} {r.utilisation.get(w, 0.0):.2f} ({r.per_worker.get(w, 0)})" for w in names
        )
        lines.append(
            f"{r.mode:<10}{r.makespan_s:>11.2f}{r.locality:>10.3f}{r.affinity:>10.3f}"
            f"{r.mean_utilisation:>10.2f}{stolen_text(r):>8}  {per}"
        )
    return "\n".join(lines)


def ratios(by_mode: dict[str, ModeStats]) -> list[str]:
    """Ratio lines against the baselines measured in this run, and the targets."""
    lines = []
    shared, dedicated = by_mode.get("shared"), by_mode.get("dedicated")
    for mode, s in by_mode.items():
        parts = []
        if shared and shared.makespan_s:
            parts.append(f"makespan / shared {s.makespan_s / shared.makespan_s:.3f}")
        if dedicated and dedicated.locality:
            parts.append(f"locality / dedicated {s.locality / dedicated.locality:.3f}")
        lines.append(f"{mode}: " + ", ".join(parts))
    if all(m in by_mode for m in MODES):
        t = targets(by_mode["shared"], by_mode["dedicated"], by_mode["steal"])
        lines.append(
            f"target steal makespan <= 1.10 x shared: {t.makespan_ratio:.3f} "
            f"{'MET' if t.makespan_met else 'NOT MET'}"
        )
        lines.append(
            f"target steal locality >= 0.90 x dedicated: {t.locality_ratio:.3f} "
            f"{'MET' if t.locality_met else 'NOT MET'}"
        )
    else:
        lines.append("targets: not checked (they need shared, dedicated and steal in the run)")
    return lines


def kill_lines(rows: list[ModeStats]) -> list[str]:
    """One line per SIGKILL run: who was killed when, lost / twice, the extra starts of the
    tasks the kill cut (and when the last of them started again), the verdict."""
    lines = []
    for r in rows:
        verdict = "exactly once" if r.exactly_once else "LOST OR TWICE"
        cut = r.redelivered_s - r.kill_at_s
        again = f", the last {cut:.1f} s after the kill" if math.isfinite(cut) else ""
        lines.append(
            f"{r.mode}: {short(r.killed) or 'nobody'} SIGKILLed at {r.kill_at_s:.2f} s; "
            f"{r.tasks} completions of {r.published} tasks, lost {len(r.lost)}, twice "
            f"{len(r.twice)}; {r.runs} runs (+{r.runs - r.tasks} restarted{again}); "
            f"makespan {r.makespan_s:.2f} s: {verdict}"
        )
    return lines
