"""The 02:00 scenario, triggered by a real beat: entries on one crontab, each fanning out agents.

Three beat entries (``--entries``) share ``crontab(minute="*")`` (a crontab that fires every
minute, so a tick comes within a minute, not at 02:00); each runs a kickoff task that
publishes 20 agents (``--agents``); an agent makes one or two calls (alternately) to a
``ProviderSim`` through ``fleet.slot("model")`` and the ``openai`` SDK. Everything is
real: a ``celery beat`` subprocess (default ``PersistentScheduler``, its schedule file in
a temporary directory) and ``celery worker`` subprocesses (``benchmarks.harness.beat_agents``).
Two variants run one after the other, each for ``--ticks`` ticks, on a flushed Redis DB 8:

- ``plain``: the bare crontab; the kickoff publishes its agents with ``apply_async`` at once;
- ``jitter``: ``jittered(crontab(minute="*"), max_delay=J)`` per entry (offsets keyed by the
  entry's name), and the kickoff publishes with ``agent.fan_out(items, over=W)``.

Measured from records the tasks write to a Redis list (``before_task_publish``,
``task_prerun``, admitted slots, ``task_rescheduled``: ``benchmarks/harness/beat_agents.py``;
the wall clock of this one host) and from the provider's own log. Each agent belongs to the
tick of its kickoff (kickoffs in publish order, ``--entries`` per tick). Per tick and series
(agent publishes; their due times = publish + countdown; agent starts = the first
``task_prerun`` of each id):

- the mean rate = n / (last - first), the window taken as at least 1 s;
- the peak 1-s rate, over any 1-s window (sliding) and over 1-s bins of the wall clock,
  and the peak over 5 s (sliding) / 5; each as a ratio to the mean. Target for the jitter
  variant: agent starts' peak 1-s rate <= 1.5x the mean. At ~1.5 starts/s a second holds
  one or two starts, so even ideal stratified timing scores ~2.4x there; the 5-s column
  and the peak against plain's (same run) say more at this density.

A ratio is left out ("-") when the window is shorter than the peak's width. With several
ticks the table shows the highest peak and ratio over the ticks. Refusals: slots refused
at their first ask (then waited in place: ``slot.attempts > 1``; at ask time = admission -
``waited_s``) plus reschedules (a refusal that republished the task); peak refusals/s over
any 1 s. And the provider's requests and 429s, agents done, when the last one ended after
its tick.

Run: ``python benchmarks/beat.py [--ticks 1] [--jitter 20] [--over 30]`` or ``make bench-beat``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery  # noqa: E402

from benchmarks.harness.goodput import flush_db  # noqa: E402
from benchmarks.harness.herd import Herd, Scenario, close_app, stop_processes  # noqa: E402

DB = 8
AGENTS_MODULE = "benchmarks.harness.beat_agents"
TARGET_RATIO = 1.5
SERIES = ("publish", "due", "start")


@dataclass(frozen=True)
class Rate:
    """How bunched a series of event times is (one tick)."""

    n: int
    span_s: float
    mean: float  # per s, n / max(span, 1 s)
    peak_sliding: int  # most events in any [t, t + 1 s)
    peak_bin: int  # most events in one 1-s bin of the wall clock
    peak_5s: float  # most events in any [t, t + 5 s), / 5

    def ratio(self, peak: float, width_s: float = 1.0) -> float:
        """``peak`` / the mean; NaN when the window is shorter than ``width_s`` (a burst
        shorter than the peak's width would score <= 1x however bunched it is)."""
        return peak / self.mean if self.mean and self.span_s >= width_s else math.nan


def peak_in(times: Sequence[float], width_s: float) -> int:
    """The most of ``times`` in any half-open window ``[t, t + width_s)`` (two pointers)."""
    ordered, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(ordered):
        while ordered[lo] <= t - width_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def rate_of(times: Sequence[float]) -> Rate:
    if not times:
        return Rate(0, 0.0, 0.0, 0, 0, 0.0)
    span = max(times) - min(times)
    bins: dict[int, int] = {}
    for t in times:
        bins[math.floor(t)] = bins.get(math.floor(t), 0) + 1
    return Rate(
        n=len(times),
        span_s=span,
        mean=len(times) / max(span, 1.0),
        peak_sliding=peak_in(times, 1.0),
        peak_bin=max(bins.values()),
        peak_5s=peak_in(times, 5.0) / 5.0,
    )


@dataclass
class Outcome:
    """One variant: per-tick rates of each series, refusals, the provider's view."""

    variant: str
    rates: dict[str, list[Rate]]  # series -> one Rate per tick
    kickoff_offsets_s: list[list[float]]  # per tick: kickoff publishes after the minute
    expected: int
    done: int
    failed: int
    first_refusals: int
    refused_asks: int
    reschedules: int
    peak_refusals: int
    requests: int
    provider_429: int
    peak_in_flight: int
    last_done_s: float  # after the (last) tick's minute

    def worst(self, series: str, key: str) -> tuple[float, float]:
        """The highest ``key`` peak over the ticks, and the highest ratio to the mean."""
        width = 5.0 if key == "peak_5s" else 1.0
        rates = self.rates[series] or [rate_of([])]
        ratios = [r.ratio(getattr(r, key), width) for r in rates]
        peak = max(float(getattr(r, key)) for r in rates)
        return peak, max((x for x in ratios if not math.isnan(x)), default=math.nan)


def first_by_id(
    events: Iterable[dict[str, Any]], ev: str, task: str | None = None
) -> dict[str, dict[str, Any]]:
    """The earliest record of kind ``ev`` (of ``task``) per task id."""
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["ev"] == ev and (task is None or e.get("task") == task):
            if e["id"] not in out or e["t"] < out[e["id"]]["t"]:
                out[e["id"]] = e
    return out


def eta_of(record: dict[str, Any]) -> float:
    """When a published message becomes runnable: its ETA, else its publish time."""
    eta = record.get("eta")
    if not eta:
        return float(record["t"])
    when = dt.datetime.fromisoformat(eta)
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


def analyse(variant: str, events: list[dict[str, Any]], log: list[Any], entries: int) -> Outcome:
    """Per-tick rates and totals from the event records and the provider's log."""
    kickoffs = sorted(first_by_id(events, "publish", "kickoff").values(), key=lambda e: e["t"])
    tick_of = {k["id"]: i // entries for i, k in enumerate(kickoffs)}
    ticks = max(tick_of.values(), default=-1) + 1
    minute = [math.floor(kickoffs[i * entries]["t"] / 60) * 60 for i in range(ticks)]
    offsets = [round(k["t"] - minute[tick_of[k["id"]]], 2) for k in kickoffs]
    published = first_by_id(events, "publish", "agent")
    started = first_by_id(events, "start", "agent")
    series: dict[str, list[list[float]]] = {s: [[] for _ in range(ticks)] for s in SERIES}
    for agent_id, pub in published.items():
        tick = tick_of.get(pub.get("parent"))
        if tick is None:
            continue
        series["publish"][tick].append(pub["t"])
        series["due"][tick].append(eta_of(pub))
        if agent_id in started:
            series["start"][tick].append(started[agent_id]["t"])
    admits = [e for e in events if e["ev"] == "admit"]
    resched = [e for e in events if e["ev"] == "resched"]
    refusals = [e["t"] - e["waited_s"] for e in admits if e["attempts"] > 1]
    refusals += [e["t"] for e in resched]
    done = first_by_id(events, "done", "agent")
    return Outcome(
        variant=variant,
        rates={s: [rate_of(times) for times in per_tick] for s, per_tick in series.items()},
        kickoff_offsets_s=[offsets[i * entries : (i + 1) * entries] for i in range(ticks)],
        expected=len(published),
        done=len(done),
        failed=len(first_by_id(events, "failed", "agent")),
        first_refusals=sum(e["attempts"] > 1 for e in admits) + len(resched),
        refused_asks=sum(e["attempts"] - 1 for e in admits) + len(resched),
        reschedules=len(resched),
        peak_refusals=peak_in(refusals, 1.0) if refusals else 0,
        requests=len(log),
        provider_429=sum(r.outcome == "429" for r in log),
        peak_in_flight=max((r.in_flight + 1 for r in log if r.admitted), default=0),
        last_done_s=max((e["t"] for e in done.values()), default=math.nan)
        - (minute[-1] if minute else math.nan),
    )


class BeatHerd(Herd):
    """A ProviderSim, ``celery worker``s running the beat agents, and a ``celery beat``."""

    includes = (*Herd.includes, AGENTS_MODULE)

    def __init__(self, scenario: Scenario, redis_url: str, args: argparse.Namespace) -> None:
        super().__init__(scenario, redis_url, DB)
        self.args = args
        self.env: dict[str, str] = {}

    def __enter__(self) -> BeatHerd:
        super().__enter__()
        return self

    def worker_env(self, run: str) -> dict[str, str]:
        return {**super().worker_env(run), **self.env}

    def run_variant(self, variant: str, tmp: Path) -> Outcome:
        """Workers, then beat until every tick's kickoffs are out, then until agents end."""
        a = self.args
        run = f"beat-{variant}-{uuid.uuid4().hex[:8]}"
        self.env = {
            "BEAT_VARIANT": variant,
            "BEAT_ENTRIES": str(a.entries),
            "BEAT_AGENTS": str(a.agents),
            "BEAT_JITTER": str(a.jitter),
            "BEAT_OVER": str(a.over),
            "BEAT_EVENTS": f"{run}:events",
            "EXAMPLE_MAX_WAIT": str(a.max_wait),
        }
        flush_db(self.url, DB)
        app = Celery("beat-client", broker=self.url, backend=self.url)
        client = redis.Redis.from_url(self.url)
        with contextlib.ExitStack() as started:  # undone in reverse order, also on errors
            started.callback(flush_db, self.url, DB)
            started.callback(close_app, app)
            started.callback(client.close)
            workers = self._start_workers(variant, run)
            started.callback(stop_processes, *(p for _, p in workers), grace_s=10.0)
            self._wait_ready(app, [n for n, _ in workers])
            self.sim.reset_stats(refill=True)
            beat = self._start_beat(run, tmp)
            started.callback(stop_processes, beat, grace_s=10.0)
            kickoffs = a.entries * a.ticks
            wait_s = 60.0 * a.ticks + a.jitter + 30
            self._wait_for(client, run, "kickoff", ("publish",), kickoffs, wait_s)
            stop_processes(beat, grace_s=10.0)  # no further tick
            agents = kickoffs * a.agents
            self._wait_for(client, run, "agent", ("done", "failed"), agents, a.over + 120)
            events = [json.loads(raw) for raw in client.lrange(f"{run}:events", 0, -1)]
            log = self.sim.log
        return analyse(variant, events, log, a.entries)

    def _start_beat(self, run: str, tmp: Path) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "celery", "-A", AGENTS_MODULE, "beat"]
        command += ["-s", str(tmp / f"{run}-schedule"), "-l", "INFO"]
        with (tmp / f"{run}-beat.log").open("wb") as out:
            return subprocess.Popen(
                command, cwd=ROOT, env=self.worker_env(run), stdout=out, stderr=subprocess.STDOUT
            )

    @staticmethod
    def _wait_for(
        client: redis.Redis, run: str, task: str, evs: tuple[str, ...], count: int, timeout_s: float
    ) -> None:
        """Poll the event list until ``count`` distinct ``task`` ids have an ``evs`` record."""
        label = run.split("-")[1]
        seen: set[str] = set()
        read, deadline, said = 0, time.monotonic() + timeout_s, -1
        while len(seen) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: {len(seen)}/{count} {task} {'/'.join(evs)}")
            for raw in client.lrange(f"{run}:events", read, -1):
                read += 1
                e = json.loads(raw)
                if e["ev"] in evs and e.get("task") == task:
                    seen.add(e["id"])
            if len(seen) != said:
                said = len(seen)
                print(f"  {label}: {said}/{count} {task} {'/'.join(evs)}", file=sys.stderr)
            time.sleep(0.25)


# -- reporting ------------------------------------------------------------------------------


def _r(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def rates_table(outcomes: list[Outcome]) -> str:
    rows = [
        "| variant | agent series | n | window | mean /s | peak 1 s (sliding) | / mean "
        "| peak 1-s bin | / mean | peak 5 s / 5 | / mean |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        for s in SERIES:
            rates = o.rates[s] or [rate_of([])]
            n = sum(r.n for r in rates)
            span = max(r.span_s for r in rates)
            mean = sum(r.mean for r in rates) / len(rates)
            cells = [f"{o.variant}", s, str(n), f"{span:.1f} s", f"{mean:.2f}"]
            for key in ("peak_sliding", "peak_bin", "peak_5s"):
                peak, ratio = o.worst(s, key)
                cells += [f"{peak:g}", _r(ratio)]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def totals_table(outcomes: list[Outcome]) -> str:
    rows = [
        "| variant | kickoffs (s after the minute) | agents done | slots refused "
        "| refused asks | reschedules | peak refusals/s | requests | 429s | peak in flight "
        "| last agent done |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        kicks = "; ".join(", ".join(f"{x:.1f}" for x in tick) for tick in o.kickoff_offsets_s)
        rows.append(
            f"| {o.variant} | {kicks} | {o.done}/{o.expected} | {o.first_refusals} "
            f"| {o.refused_asks} | {o.reschedules} | {o.peak_refusals} | {o.requests} "
            f"| {o.provider_429} | {o.peak_in_flight} | {o.last_done_s:.1f} s |"
        )
    return "\n".join(rows)


def headline(outcomes: list[Outcome]) -> str:
    """Per variant: peak starts and their ratio to the mean (the jitter variant against its
    target); then jitter against plain, measured in the same run."""
    parts = []
    for o in outcomes:
        peak, ratio = o.worst("start", "peak_sliding")
        _, bin_ratio = o.worst("start", "peak_bin")
        verdict = ""
        if o.variant == "jitter":
            met = ratio <= TARGET_RATIO and bin_ratio <= TARGET_RATIO
            verdict = f" (target <= {TARGET_RATIO}x: {'met' if met else 'MISSED'})"
        parts.append(
            f"{o.variant}: peak {peak:g} agent starts in 1 s = {_r(ratio)} the mean "
            f"(1-s bins {_r(bin_ratio)}){verdict}, {o.peak_refusals} refusals/s at peak, "
            f"{o.provider_429} 429s"
        )
    by = {o.variant: o for o in outcomes}
    if "plain" in by and "jitter" in by:
        plain, jitter = (by[v].worst("start", "peak_sliding")[0] for v in ("plain", "jitter"))
        parts.append(
            f"jitter / plain: peak 1-s starts {jitter:g}/{plain:g} = {jitter / plain:.2f}x, "
            f"peak refusals/s {by['jitter'].peak_refusals}/{by['plain'].peak_refusals}"
        )
    return "; ".join(parts) + "."


def markdown(args: argparse.Namespace, outcomes: list[Outcome]) -> str:
    setup = (
        f'{args.entries} beat entries on `crontab(minute="*")` x {args.agents} agents (1 or 2 '
        f"calls each), {args.ticks} tick(s) per variant; jitter variant: "
        f"`jittered(..., max_delay={args.jitter:g})` + `fan_out(over={args.over:g})`. Provider "
        f"{args.rpm} rpm, {args.tpm} tpm, {args.max_in_flight} in flight, latency median "
        f"{args.latency} s (the fleet declares the same); `fleet_max_wait` {args.max_wait:g} s; "
        f"{args.workers} x {args.concurrency} {args.pool} worker slots; real `celery beat` "
        f"(PersistentScheduler) and `celery worker` processes."
    )
    parts = [setup, rates_table(outcomes), totals_table(outcomes), f"**{headline(outcomes)}**"]
    return "\n\n".join(parts) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--variants", default="plain,jitter", help="comma list: plain, jitter")
    p.add_argument("--ticks", type=int, default=1, help="beat ticks (minutes) per variant")
    p.add_argument("--jitter", type=float, default=20.0, help="J: jittered(max_delay=J), s")
    p.add_argument("--over", type=float, default=30.0, help="W: fan_out(over=W), s")
    p.add_argument("--entries", type=int, default=3, help="beat entries on the crontab")
    p.add_argument("--agents", type=int, default=20, help="agents per kickoff")
    p.add_argument("--rpm", type=int, default=600)
    p.add_argument("--tpm", type=int, default=90_000)
    p.add_argument("--max-in-flight", type=int, default=8)
    p.add_argument("--latency", type=float, default=0.3, help="median s per call")
    p.add_argument("--max-wait", type=float, default=30.0, help="fleet_max_wait, s")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--pool", default="threads", choices=["prefork", "threads"])
    p.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or set(args.variants) - {"plain", "jitter"}:
        p.error(f"--variants: a comma list of plain, jitter; got {args.variants}")
    if not 0 <= args.jitter < 60 or args.over < 0 or args.ticks < 1:
        p.error("need 0 <= --jitter < 60 (one tick per minute), --over >= 0, --ticks >= 1")
    if args.jitter + args.over > 55:
        print("warning: J + W > 55 s: a tick's agents overlap the next tick's", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fields = ("rpm", "tpm", "max_in_flight", "latency", "workers", "concurrency", "pool")
    scenario = Scenario(**{f: getattr(args, f) for f in fields})
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    outcomes = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-beat-") as tmp,
        BeatHerd(scenario, base, args) as herd,
    ):
        for variant in args.variants:
            print(f"{variant}: waiting for the next minute ...", file=sys.stderr)
            outcomes.append(herd.run_variant(variant, Path(tmp)))
    body = markdown(args, outcomes)
    print("\n" + body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from results import append_section

        client = redis.Redis.from_url(herd.url)
        try:
            append_section(client, body, "Beat: entries on one crontab, plain vs jitter")
        finally:
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
