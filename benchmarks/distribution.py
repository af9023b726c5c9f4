"""Who runs where (issue 24): shared vs dedicated vs steal, on real workers, in one run.

Three ``celery worker`` processes (``--workers``; ``-P threads -c 2`` by default) run one
task, ``work(customer_id, cost_s)`` (``benchmarks/harness/distribution_app.py``). 24
customers (``--customers``) have 8 tasks each (``--tasks``); every 6th customer is 10x
heavier (``--heavy``: 0.8 s against 0.08 s), and the first task of a customer in a worker
process also pays a warm-up (``--warmup``, 0.1 s: a cache that must be loaded; a per-process
cache, so with the threads pool a worker is one cache). All tasks are published at once,
round-robin over the customers. Each mode runs on fresh workers (empty caches) over the
same plan, on Redis DB 13 (flushed before and after each run: broker, records and the
fleet's state):

- ``shared``: plain Celery, one queue, every worker takes the next task;
- ``dedicated``: ``fleet_distribution = "dedicated"``: each customer's tasks go to its
  affinity queue, consumed only by that queue's home worker;
- ``steal``: as dedicated, and an idle worker consumes from a peer queue deeper than
  ``fleet_steal_threshold`` (``--threshold``);
- ``routed`` (only with ``--modes``): plain Celery with hand-written routing, a queue per
  worker and customers hashed onto them, no stealing: what users write today.

Measured from the records the tasks push (start and end on the host's monotonic clock,
worker, warm or cold): the makespan (first publish to last end), locality (the share of
tasks that ran warm), affinity (per customer, the share of its tasks on its most used
worker, averaged), utilisation per worker (its tasks' time over slots x makespan). Targets
(issue 24): steal's makespan within 10% of shared's, steal's locality at least 90% of
dedicated's. The modes run ``--repeat`` times (3), alternating (shared, dedicated, steal,
shared, ...), and the medians are reported: which queues a worker is home of changes from
run to run (the homes hash the workers' ids), and with it how the heavy customers fall.
"stolen": tasks run by a worker other than their queue's home when the run began (from the
records), and the fleet's own count after a slash when it differs (in the SIGKILL runs,
where the dead worker's queues change home, only the fleet's: "/n").

``--kill``: afterwards, one more run per mode in which one worker is SIGKILLed (its whole
process group) once 40% of the tasks are done; every task must then complete exactly once
(counted by task id). A task the kill cut short starts again on another worker (acks_late,
``task_reject_on_worker_lost``; the broker's visibility timeout is 5 s here, longer for
longer tasks (:func:`visibility_s`), so its message comes back within the run): "runs"
counts those extra starts.

Modes the installed celery_fleet does not have yet (no ``fleet_distribution`` setting) are
reported as not available. A run appends a section to ``benchmarks/RESULTS.md``;
``--quick`` (a smaller plan, shared + whatever is available, no append) is a smoke run.

``--broker amqp://127.0.0.1:5672//``: the same on RabbitMQ (records and the fleet's state
stay in Redis DB 13; the run's queues are deleted before and after).

Run: ``python benchmarks/distribution.py [--kill] [--quick]`` or ``make bench-distribution``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from benchmarks.harness.distribution import (  # noqa: E402
    MODES,
    ModeStats,
    Record,
    Workload,
    kill_lines,
    median_stats,
    ratios,
    stolen_text,
    summarise,
    table,
)
from benchmarks.harness.distribution_app import FEATURE, make_app  # noqa: E402
from benchmarks.harness.distribution_workers import (  # noqa: E402
    RECORDS,
    ROUTED,
    Setup,
    drop_queues,
    fleet_stolen,
    routed_queue,
    visibility_s,
    wait_ready,
    worker_names,
    workers,
)
from benchmarks.harness.herd import close_app  # noqa: E402
from benchmarks.results import append_section, on_db  # noqa: E402

DB = 13
TITLE = "Distribution: shared vs dedicated vs steal (issue 24)"


def run_mode(
    setup: Setup, load: Workload, mode: str, kill: bool = False, dump: str | None = None
) -> ModeStats:
    """One run of ``mode`` on fresh workers and a flushed DB 13; its records appended to
    the file ``dump`` (one JSON line: mode, kill, t0, records) when given."""
    client = redis.Redis.from_url(setup.url)
    client.flushdb()  # DB 13 is this benchmark's (see the module docstring)
    app, task = make_app(
        "shared" if mode == ROUTED else mode,
        setup.url,
        records=RECORDS,
        warmup_s=load.warmup_s,
        queues=setup.queues,
        threshold=setup.threshold,
        visibility_timeout_s=visibility_s(load),
        broker=setup.broker,
    )
    plan = load.plan()
    victim, kill_at = "", float("nan")
    try:
        drop_queues(app, setup)
        with workers(setup, load, mode) as procs:
            homes = wait_ready(app, setup, mode, procs)
            t0 = time.monotonic()
            ids = [
                task.apply_async(
                    (t.customer, t.cost_s),
                    **(
                        {"queue": routed_queue(t.customer, setup.workers)} if mode == ROUTED else {}
                    ),
                ).id
                for t in plan
            ]
            expected = set(ids)
            deadline = t0 + setup.timeout_s
            while True:
                done = {
                    Record.from_json(r).id for r in client.lrange(RECORDS, 0, -1) if b'"done"' in r
                }
                if kill and not victim and len(done) >= 0.4 * len(ids):
                    victim, kill_at = worker_names(setup)[1], time.monotonic() - t0
                    os.killpg(procs[1].pid, signal.SIGKILL)
                if expected <= done or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            time.sleep(0.5)  # a duplicate completion would land now, not later
            records = [Record.from_json(r) for r in client.lrange(RECORDS, 0, -1)]
        counted = fleet_stolen(client) if homes is not None else None  # workers stopped
    finally:
        try:
            drop_queues(app, setup)
        finally:
            close_app(app)
        client.flushdb()
        client.close()
    stats = summarise(
        mode,
        records,
        t0=t0,
        slots=setup.concurrency,
        expected=ids,
        workers=worker_names(setup),
        homes=None if kill else homes,  # a kill moves homes: the fleet's count only
    )
    if dump:
        with open(dump, "a", encoding="utf-8") as fh:
            rows = [dataclasses.asdict(r) for r in records]
            fh.write(json.dumps({"mode": mode, "kill": kill, "t0": t0, "records": rows}) + "\n")
    return replace(stats, killed=victim, kill_at_s=kill_at, fleet_stolen=counted)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="shared vs dedicated vs steal (issue 24) on real celery workers",
        epilog="--quick: 12 customers x 4 tasks, one round, no RESULTS.md section (~40 s).",
    )
    p.add_argument(
        "--url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
        help=f"the Redis (its DB {DB} is used and flushed)",
    )
    p.add_argument(
        "--broker",
        help="another broker, e.g. amqp://127.0.0.1:5672// (kombu: user guest) (default: "
        "the Redis); records and the fleet's state stay in the Redis",
    )
    p.add_argument("--modes", nargs="+", choices=[*MODES, ROUTED], default=list(MODES))
    p.add_argument("--repeat", type=int, default=3, help="rounds of all modes, alternating")
    p.add_argument("--kill", action="store_true", help="also a SIGKILL run per mode")
    p.add_argument("--quick", action="store_true", help="a smoke run; appends nothing")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--pool", default="threads", choices=("threads", "prefork"))
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--customers", type=int, default=24)
    p.add_argument("--tasks", type=int, default=8, help="tasks per customer")
    p.add_argument("--light", type=float, default=0.08, help="a light task's seconds")
    p.add_argument("--heavy", type=float, default=10.0, help="heavy / light task time")
    p.add_argument("--heavy-every", type=int, default=6, help="every Nth customer is heavy")
    p.add_argument("--warmup", type=float, default=0.1, help="seconds of a cold customer")
    p.add_argument("--queues", type=int, default=32, help="fleet_affinity_queues")
    p.add_argument("--threshold", type=int, default=4, help="fleet_steal_threshold")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    p.add_argument("--logs", help="a directory for the workers' logs (default: none)")
    p.add_argument("--dump", help="append every run's task records to this file (JSON lines)")
    p.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.customers, args.tasks, args.repeat = 12, 4, 1
    return args


def describe(setup: Setup, load: Workload) -> str:
    """The run's parameters, one paragraph."""
    return (
        f"{setup.workers} workers x {setup.pool} -c {setup.concurrency}; {load.customers} "
        f"customers x {load.tasks_per_customer} tasks, light {load.light_s:g} s, every "
        f"{load.heavy_every}th customer {load.heavy:g}x; warm-up {load.warmup_s:g} s per "
        f"customer per process; {len(load.plan())} tasks, {load.work_s():.1f} s of work "
        f"without warm-up; fleet_affinity_queues {setup.queues}, fleet_steal_threshold "
        f"{setup.threshold}; Redis DB {DB}; broker "
        f"{'the same Redis' if setup.broker is None else setup.broker.split('://')[0]}"
    )


def rounds(
    setup: Setup, load: Workload, modes: list[str], repeat: int, dump: str | None
) -> tuple[dict[str, ModeStats], list[str]]:
    """``repeat`` rounds of every mode, alternating: the medians by mode, and a line per run."""
    runs: dict[str, list[ModeStats]] = {m: [] for m in modes}
    lines = []
    for k in range(repeat):
        for mode in modes:
            s = run_mode(setup, load, mode, dump=dump)
            runs[mode].append(s)
            lines.append(
                f"round {k + 1} {mode:<9}: makespan {s.makespan_s:5.2f} s, locality "
                f"{s.locality:.3f}, stolen {stolen_text(s)}, {s.tasks} tasks"
            )
            print(f"  {lines[-1]}", flush=True)
    return {m: median_stats(rs) for m, rs in runs.items()}, lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = Setup(
        url=on_db(args.url, DB),
        workers=args.workers,
        pool=args.pool,
        concurrency=args.concurrency,
        queues=args.queues,
        threshold=args.threshold,
        timeout_s=args.timeout,
        logs=args.logs,
        broker=args.broker,
    )
    load = Workload(
        customers=args.customers,
        tasks_per_customer=args.tasks,
        light_s=args.light,
        heavy=args.heavy,
        heavy_every=args.heavy_every,
        warmup_s=args.warmup,
    )
    modes = [m for m in args.modes if FEATURE or m in ("shared", ROUTED)]
    missing = [m for m in args.modes if m not in modes]
    if setup.logs:
        Path(setup.logs).mkdir(parents=True, exist_ok=True)
    print(describe(setup, load))
    if missing:
        print(f"not available in this celery_fleet (no fleet_distribution): {', '.join(missing)}")
    by_mode, lines = rounds(setup, load, modes, args.repeat, args.dump)
    killed: list[ModeStats] = []
    if args.kill:  # not routed: its dead worker's queue has no other consumer (by design)
        killed = [run_mode(setup, load, m, True, args.dump) for m in modes if m != ROUTED]
    text = [*lines, "", f"medians of {args.repeat} round(s):", table(list(by_mode.values()))]
    text += ["", *ratios(by_mode)]
    if args.quick:
        text.append("(--quick: a smoke run; 4 tasks a customer is too few for the targets)")
    if killed:
        text += ["", "SIGKILL one worker at 40% of tasks:", table(killed), *kill_lines(killed)]
    out = "\n".join(text)
    print(out)
    if not (args.quick or args.no_append):
        body = (
            f"{describe(setup, load)}. Modes not available: {', '.join(missing) or 'none'}."
            f"\n\n```text\n{out}\n```\n"
        )
        client = redis.Redis.from_url(setup.url)
        try:
            where = "" if setup.broker is None else f", {setup.broker.split(':')[0]} broker"
            append_section(client, body, title=f"{TITLE}{where}")
        finally:
            client.close()
    return 0 if all(s.exactly_once for s in [*killed, *by_mode.values()]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
