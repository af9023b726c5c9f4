"""Real `celery worker` processes (prefork) running fleet tasks against real Redis."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_fleet.testing.redis_server import free_port
from tests.integration.workers import ROOT, celery_workers, new_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Any]:
    """Start a 4-process prefork worker on a queue of its own; stop it by pid afterwards."""
    with start_worker(redis_url, redis_url.rsplit("/", 1)[0] + "/10") as fleet_app:
        yield fleet_app


@contextlib.contextmanager
def start_worker(
    redis_url: str,
    broker: str,
    probe_url: str = "",
    workers: int = 1,
    pool: tuple[str, str] = ("prefork", "4"),
    extra_env: dict[str, str] | None = None,
    module: str = "tests.integration.fleet_app",
) -> Iterator[Any]:
    """``workers`` workers (each a 4-process prefork pool by default) whose fleet state is
    in ``redis_url``, their broker and results in ``broker``, what tasks record in
    ``probe_url`` (default: ``redis_url``). Yields the app ``module`` (fleet_app) as
    imported here, with the worker processes as ``worker_procs``; stops them by pid and
    drops their keys."""
    name = f"it-{new_run()}"
    settings = {
        "FLEET_IT_BROKER": broker,
        "FLEET_IT_REDIS": redis_url,
        "FLEET_IT_PROBE": probe_url,
        "FLEET_IT_NS": name,
        "FLEET_IT_QUEUE": f"fleet-{name}",
        "FLEET_IT_METRICS_PORT": str(free_port()),
    }
    with celery_workers(
        module,
        settings,
        name=name,
        broker=broker,
        redis_urls=(redis_url, probe_url or redis_url),
        workers=workers,
        pool=pool,
        extra_env=extra_env,
    ) as (fleet_app, procs):
        fleet_app.worker_procs = procs
        #: what this run's worker hostnames start with (another run may share the broker)
        fleet_app.worker_prefix = f"{name}-"
        yield fleet_app


def _probe(app_module: Any) -> redis.Redis:
    return app_module._probe


def test_fifty_tasks_never_exceed_max_in_flight(worker: Any) -> None:
    results = [worker.guarded.delay(0.15) for _ in range(50)]
    values = [r.get(timeout=120) for r in results]
    assert len(values) == 50
    observed = [int(x) for x in _probe(worker).lrange(worker.key("observed"), 0, -1)]
    assert len(observed) == 50
    assert max(observed) == 3, f"observed concurrency {max(observed)} with max_in_flight=3"


def test_throttled_tasks_are_rescheduled_not_failed(worker: Any) -> None:
    probe = _probe(worker)
    before = int(probe.get(worker.key("reschedules")) or 0)
    results = [worker.throttled_whole.delay(i) for i in range(8)]
    values = [r.get(timeout=120) for r in results]
    assert sorted(v["n"] for v in values) == list(range(8))
    # Same task id, retries not counted (max_retries=0 would have failed them otherwise).
    assert [v["id"] for v in values] == [r.id for r in results]
    assert all(v["retries"] == 0 for v in values)
    # A copy is the task itself, not its child: published from outside any task, it keeps
    # no parent and is its own root (Flower links Parent and Root by these).
    assert all(v["parent"] is None and v["root"] == v["id"] for v in values)
    assert int(probe.get(worker.key("reschedules")) or 0) - before >= 4


def test_throttled_in_the_body_reschedules_even_with_autoretry(worker: Any) -> None:
    probe = _probe(worker)
    before = int(probe.get(worker.key("reschedules")) or 0)
    results = [worker.throttled_body.delay(i) for i in range(6)]
    values = [r.get(timeout=120) for r in results]
    assert all(r.status == "SUCCESS" for r in results)
    assert all(v["retries"] == 0 for v in values)
    assert int(probe.get(worker.key("body_calls")) or 0) == 6
    assert int(probe.get(worker.key("reschedules")) or 0) - before >= 3


def test_at_least_once_a_killed_child_s_task_runs_again(worker: Any) -> None:
    """With acks_late + reject_on_worker_lost (the example's choice) a task whose process is
    SIGKILLed is redelivered and completes; its slot came back by lease expiry or release."""
    tag = uuid.uuid4().hex[:6]
    result = worker.dies_once.delay(tag)
    assert result.get(timeout=120) == 2
    assert int(_probe(worker).get(worker.key(f"dies_once:{tag}"))) == 2


def test_the_example_project_chooses_at_least_once_with_a_consistent_timeout() -> None:
    from example_project import celeryconfig as conf

    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert conf.fleet_max_countdown < visibility
    # its 02:00 entry is jittered (forward, under 10 min) and fans out over a minute
    from celery_fleet import Jittered

    nightly = conf.beat_schedule["nightly-research-batch"]["schedule"]
    assert isinstance(nightly, Jittered) and 0 < nightly.max_delay < visibility
    import inspect

    from example_project import tasks

    assert "fan_out(topics, over=60.0)" in inspect.getsource(tasks.nightly_batch)


def test_a_staggered_fan_out_runs_each_task_at_its_countdown(worker: Any) -> None:
    import datetime as dt
    import time

    published = time.time()
    group = worker.stamped.fan_out(range(8), over=4.0, seed=7)
    values = sorted(group.get(timeout=60), key=lambda v: v["i"])
    assert [v["i"] for v in values] == list(range(8))
    etas = [dt.datetime.fromisoformat(v["eta"]).timestamp() for v in values]
    # stratified: task i owns [i, i+1) * 0.5 s of the window, in order
    for i, eta in enumerate(etas):
        assert published + i * 0.5 - 0.05 <= eta <= published + (i + 1) * 0.5 + 0.5, (i, etas)
    # honoured: no task ran before its ETA, and the batch ran spread out over the window
    assert all(v["ran"] >= eta - 0.01 for v, eta in zip(values, etas, strict=True)), values
    assert values[-1]["ran"] - values[0]["ran"] > 2.5


# -- idempotency (the ledger) -------------------------------------------------------------


def _publish_keys(env: dict[str, str], tag: str, docs: list[int]) -> None:
    """A spawned publisher: the integration app, imported afresh with the test's env."""
    os.environ.update(env)
    from tests.integration import fleet_app

    for doc in docs:
        fleet_app.keyed_count.delay(tag, doc)


def test_a_thousand_publishes_of_a_hundred_keys_run_a_hundred_times(worker: Any) -> None:
    import multiprocessing as mp
    import random

    tag = uuid.uuid4().hex[:6]
    env = {k: v for k, v in os.environ.items() if k.startswith("FLEET_IT_")}
    rng = random.Random(1)
    docs = [rng.randrange(100) for _ in range(1000 - 100)] + list(range(100))
    rng.shuffle(docs)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_publish_keys, args=(env, tag, docs[i::4])) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [worker.keyed_count.AsyncResult(worker.fleet.key_record(f"count:{tag}:{d}")["run_id"])
               for d in range(100)]  # fmt: skip
    assert sorted(r.get(timeout=120) for r in results) == list(range(100))
    assert int(_probe(worker).get(worker.key(f"keyed_count:{tag}"))) == 100
    record = worker.fleet.key_record(f"count:{tag}:7")
    assert record["state"] == "succeeded" and record["attempts"] == "1"


def test_a_redelivered_agent_resumes_and_completes_exactly_once(worker: Any) -> None:
    """acks_late + reject_on_worker_lost + SIGKILL mid-body: redelivered, the dead attempt's
    claim taken over after its lease, paid steps not repeated, the body completed once."""
    tag = uuid.uuid4().hex[:6]
    result = worker.keyed_die.delay(tag)
    value = result.get(timeout=120)
    probe = _probe(worker)
    assert value["steps"] == [1, 1, 1] and value["id"] == result.id
    assert int(probe.get(worker.key(f"completed:{tag}"))) == 1
    record = worker.fleet.key_record(f"die:{tag}")
    assert record["state"] == "succeeded" and record["attempts"] == "2", record
    events = [e["event"] for e in worker.fleet.history(f"die:{tag}")]
    assert events[0] == "queued" and events[-1] == "succeeded" and "taken_over" in events
    # a duplicate message for the done key does not run the body: it returns the result
    again = worker.keyed_die.apply_async((tag,), task_id=result.id, retries=0,
                                         headers={"fleet_key": f"die:{tag}"})  # fmt: skip
    assert again.get(timeout=60) == value
    assert int(probe.get(worker.key(f"completed:{tag}"))) == 1


def test_a_retry_keeps_the_key_and_children_carry_it(worker: Any) -> None:
    tag = uuid.uuid4().hex[:6]
    value = worker.keyed_retry.delay(tag).get(timeout=60)
    assert value["retries"] == 1 and value["key"] == f"retry:{tag}"
    assert value["id"] == worker.fleet.key_record(f"retry:{tag}")["run_id"]
    events = [e["event"] for e in worker.fleet.history(f"retry:{tag}")]
    assert events == ["queued", "running", "queued", "running", "succeeded"], events
    child_id = worker.keyed_parent.delay(tag).get(timeout=60)
    assert worker.keyed_child.AsyncResult(child_id).get(timeout=60) == f"parent:{tag}"


def test_a_singleton_key_runs_one_at_a_time_and_every_publish_runs(worker: Any) -> None:
    tag = uuid.uuid4().hex[:6]
    results = [worker.keyed_single.delay(tag, n) for n in range(3)]
    assert len({r.id for r in results}) == 3  # a lock, not a dedupe: own ids
    assert sorted(r.get(timeout=120) for r in results) == [0, 1, 2]
    seen = [int(x) for x in _probe(worker).lrange(worker.key(f"single_seen:{tag}"), 0, -1)]
    assert seen == [1, 1, 1], seen


def test_a_keyed_task_rescheduled_by_backpressure_runs_its_body_once(worker: Any) -> None:
    tag = uuid.uuid4().hex[:6]
    held = worker.fleet.try_acquire("gate")  # shut: the task is refused and rescheduled
    assert held
    try:
        result = worker.keyed_gated.delay(tag)
        deadline = time.time() + 30
        while time.time() < deadline:
            events = [e["event"] for e in worker.fleet.history(f"gated:{tag}")]
            if events.count("running") >= 2:
                break
            time.sleep(0.1)
    finally:
        worker.fleet.release(held)
    assert result.get(timeout=60) == 1  # the body ran once, after the gate opened
    events = [e["event"] for e in worker.fleet.history(f"gated:{tag}")]
    # each reschedule gave the claim back before its copy was published: no copy was busy
    assert events[0] == "queued" and events[-1] == "succeeded" and "taken_over" not in events
    assert events.count("running") >= 2 and events.count("queued") >= 2, events


def test_the_worker_serves_prometheus_metrics_from_redis(worker: Any) -> None:
    import urllib.request

    port = int(os.environ["FLEET_IT_METRICS_PORT"])
    held = worker.fleet.try_acquire("gate2")  # a lease held by this process, not the worker
    assert held
    try:
        deadline, text = time.time() + 30, ""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
                break
            except OSError:
                time.sleep(0.2)  # the worker is still starting
    finally:
        worker.fleet.release(held)
    lines = set(text.splitlines())
    fleet = f'fleet="{worker.fleet.namespace}"'
    assert f"celery_fleet_up{{{fleet}}} 1.0" in lines
    # the fleet-wide state, not local
    assert f'celery_fleet_in_flight{{{fleet},limit="gate2"}} 1.0' in lines
    assert f'celery_fleet_in_flight_cap{{{fleet},limit="model"}} 3.0' in lines
    assert f'celery_fleet_breaker_state{{{fleet},limit="broken",state="closed"}} 1.0' in lines

    # counters: the pool's children count, flush to Redis every 2 s; the scrape sums them
    def admitted() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f'celery_fleet_admitted_total{{{fleet},limit="model"}}'):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    start = admitted()
    assert [r.get(timeout=60) for r in [worker.guarded.delay(0.01) for _ in range(6)]]
    deadline = time.time() + 15
    while admitted() < start + 6 and time.time() < deadline:
        time.sleep(0.5)
    assert admitted() >= start + 6


def test_the_worker_stats_carry_each_limit_s_state(worker: Any) -> None:
    """`celery inspect stats` (and Flower's worker page, "Other") show a line per limit;
    `celery inspect fleet` the structured state."""
    deadline, mine = time.time() + 60, []
    while not mine and time.time() < deadline:  # the worker may still be starting
        stats = worker.app.control.inspect(timeout=2).stats() or {}
        mine = [s for host, s in stats.items() if host.startswith(worker.worker_prefix)]
    assert mine
    assert all(isinstance(v, str) for k, v in mine[0].items() if k.startswith("fleet"))
    replies = worker.app.control.inspect(timeout=5)._request("fleet") or {}
    ours = [r for host, r in replies.items() if host.startswith(worker.worker_prefix)]
    fleet = ours[0]["limits"]
    assert fleet["model"]["cap"] == 3 and fleet["broken"]["breaker"] == "closed"
    assert fleet["slow"]["windows"][0]["window"] == "5 requests/1s"
    assert mine[0]["fleet: model"].startswith("in flight ")
    assert "breaker closed" in mine[0]["fleet: broken"]


def test_flower_shows_the_fleet_on_the_worker_page(worker: Any) -> None:
    """A real Flower process: its worker API and page ("Other") carry each limit's state."""
    import json as _json
    import urllib.request

    port = free_port()
    # Flower 2 serves its API without authentication only when told to
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.integration.fleet_app", "flower",
         f"--port={port}", "--address=127.0.0.1", "--inspect_timeout=5000"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline, workers = time.time() + 60, {}
        prefix = worker.worker_prefix
        while time.time() < deadline and not any(k.startswith(prefix) for k in workers):
            try:
                url = f"http://127.0.0.1:{port}/api/workers?refresh=1"
                with urllib.request.urlopen(url, timeout=10) as r:
                    workers = _json.loads(r.read())
            except OSError:
                time.sleep(0.5)  # Flower is still starting
        name = next(k for k in workers if k.startswith(worker.worker_prefix))
        assert workers[name]["stats"]["fleet: model"].startswith("in flight ")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/worker/{name}", timeout=30) as r:
            page = r.read().decode()
        other = page[page.index('id="tab-other"') :]
        assert "Other statistics" in other
        # a row per limit, a sentence rather than a dict's repr
        row = re.search(r"<td>fleet: model</td>\s*<td[^>]*>([^<]*)</td>", other)
        assert row is not None and row.group(1).startswith("in flight "), other[:2000]
        # and no row of the fleet's is a dict's repr (escaped in the page)
        fleet_rows = re.findall(r"<td>(fleet[^<]*)</td>\s*<td[^>]*>([^<]*)</td>", other)
        assert fleet_rows and not [r for r in fleet_rows if r[1].lstrip().startswith("{")]
    finally:
        flower.terminate()  # by its pid: the one we started
        flower.wait(timeout=30)


def test_celery_inspect_fleet_answers_from_each_worker(worker: Any) -> None:
    holding = worker.guarded.delay(6.0)  # a pool process holds a slot of "model" for 6 s
    deadline, seen = time.time() + 60, None
    while seen is None and time.time() < deadline:
        replies = worker.app.control.inspect(timeout=2)._request("fleet") or {}
        mine = [r for host, r in replies.items() if host.startswith(worker.worker_prefix)]
        children = mine[0]["held_in_children"] if mine else {}
        slots = [s for held in children.values() for s in held if s["limit"] == "model"]
        if slots:
            seen = mine[0]
    assert seen is not None, "no pool process reported its slot"
    assert seen["pool"] == "prefork" and seen["held"] == []  # the main process holds none
    assert seen["limits"]["model"]["cap"] == 3
    holding.get(timeout=60)
    # and as an operator types it: Celery's own `inspect`, our command among its choices
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.fleet_app", "inspect",
         "fleet", "--json", "--timeout", "10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"held_in_children"' in done.stdout and '"model"' in done.stdout


def test_an_async_task_body_runs_on_one_loop_per_process_within_the_cap(worker: Any) -> None:
    probe = _probe(worker)
    probe.delete(worker.key("observed"), worker.key("inside"))
    results = [worker.async_agent.delay(8) for _ in range(6)]
    done = [r.get(timeout=120) for r in results]
    observed = [int(x) for x in probe.lrange(worker.key("observed"), 0, -1)]
    assert len(observed) == 48 and max(observed) <= 3  # the cap held across processes
    loops: dict[int, set[int]] = {}
    for d in done:
        loops.setdefault(d["pid"], set()).add(d["loop"])
    assert all(len(ids) == 1 for ids in loops.values()), loops  # one loop per process


def test_a_prefork_child_that_exits_writes_its_held_release_first(redis_url: str) -> None:
    """A prefork child leaves with os._exit (no atexit): the release its last slot left
    for the next call is written from worker_process_shutdown, not lost to the lease TTL."""
    env = {"FLEET_IT_MAX_TASKS_PER_CHILD": "1"}
    with start_worker(redis_url, redis_url, pool=("prefork", "1"), extra_env=env) as fleet_app:
        pid = fleet_app.release_held_at_exit.delay().get(timeout=60)
        deadline = time.monotonic() + 30  # the child exits after its one task
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        assert fleet_app.fleet.admission.in_flight("one") == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
