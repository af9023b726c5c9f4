"""Real `celery worker` processes on the Redis broker: affinity queues keep a customer's
tasks on one worker, a SIGKILLed worker's queues move with no task lost, an idle worker
steals from a deep queue in "steal" mode and never in "dedicated" mode, and a bad
distribution setting stops the worker at start. Tasks are in affinity_app.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pytest
from kombu import Connection

from celery_fleet.distribution.status import affinity_status
from celery_fleet.observability.cli import _status
from celery_fleet.observability.metrics import fleet_registry
from tests.integration.workers import ROOT, celery_workers, new_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUEUES = 8
LEASE_S = 1.5


@contextmanager
def _workers(
    redis_url: str,
    mode: str,
    workers: int,
    pool: tuple[str, str] = ("threads", "2"),
    lease_s: float = LEASE_S,
    amqp: str | None = None,
    threshold: int = 2,
) -> Iterator[tuple[ModuleType, list[subprocess.Popen[bytes]], str]]:
    """Workers of affinity_app.py on the Redis broker (DB 12), or on RabbitMQ (``amqp``:
    the fleet's Redis and the result backend stay on DB 12)."""
    broker = redis_url.rsplit("/", 1)[0] + "/12"
    name = f"aff-{new_run()}"
    settings = {
        "FLEET_AFF_BROKER": amqp or broker,
        "FLEET_AFF_BACKEND": broker,
        "FLEET_AFF_REDIS": broker,
        "FLEET_AFF_NS": name,
        "FLEET_AFF_QUEUE": f"fleet-{name}",
        "FLEET_AFF_MODE": mode,
        "FLEET_AFF_QUEUES": str(QUEUES),
        "FLEET_AFF_LEASE": str(lease_s),
        "FLEET_AFF_THRESHOLD": str(threshold),
    }
    with celery_workers(
        "tests.integration.affinity_app",
        settings,
        name=name,
        broker=broker,
        workers=workers,
        pool=pool,
    ) as (module, procs):
        try:
            yield module, procs, name
        finally:
            module._probe.close()
    if amqp is not None:
        _drop_rabbitmq_queues(amqp, name)


AMQP_URL = os.environ.get("FLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _rabbitmq_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=0.5).close()
        return True
    except OSError:
        return False


def _drop_rabbitmq_queues(url: str, name: str) -> None:
    """RabbitMQ keeps a run's durable queues and exchanges: delete them."""
    with Connection(url) as conn:
        channel = conn.channel()
        for queue in [f"fleet-{name}", *(f"{name}.affinity.{q}" for q in range(QUEUES))]:
            channel.queue_delete(queue)
            channel.exchange_delete(queue)
        channel.close()


def _homes(m: ModuleType) -> list[str]:
    """The worker name (nodename) of each queue's home now ("" none)."""
    keys = [f"{{{m.NAMESPACE}:affinity}}:home:{q}" for q in range(QUEUES)]
    return [(v or b"").decode().split("/")[0] for v in m._probe.mget(keys)]


def _wait_homes(m: ModuleType, workers: int, within_s: float = 30.0) -> list[str]:
    """Wait until every queue has a home and ``workers`` workers share them."""
    deadline = time.monotonic() + within_s
    while True:
        homes = _homes(m)
        if all(homes) and len(set(homes)) == workers:
            return homes
        assert time.monotonic() < deadline, f"homes never settled on {workers}: {homes}"
        time.sleep(0.1)


def _ran(m: ModuleType) -> list[list[str]]:
    return [x.decode().split() for x in m._probe.lrange(m.key("ran"), 0, -1)]


def test_a_customers_tasks_run_on_its_queues_home(redis_url: str) -> None:
    with _workers(redis_url, "dedicated", 2, ("prefork", "2")) as (m, _procs, _name):
        homes = _wait_homes(m, 2)
        config = m.fleet.distribution
        results = [m.handle.delay(f"c{c}", i, 0.01) for i in range(6) for c in range(10)]
        done = [r.get(timeout=60) for r in results]
        by_customer: dict[str, Counter[str]] = defaultdict(Counter)
        for (customer, *_), out in zip(
            [(f"c{c}", i) for i in range(6) for c in range(10)], done, strict=True
        ):
            queue = config.queue_for(f"customer:{customer}")
            assert out["queue"] == queue  # routed at publish by its affinity key
            by_customer[customer][out["worker"]] += 1
            assert out["worker"] == homes[config.index_of(queue)]
        for customer, workers in by_customer.items():
            assert workers.most_common(1)[0][1] / 6 >= 0.9, (customer, workers)
        assert m.by_callable.delay("x", 1).get(timeout=30) == config.queue_for("c:x")
        # a rescheduled task goes back to its affinity queue (published again by the pump)
        runs = m.throttled_once.delay("c3", new_run()).get(timeout=60)
        assert runs == [config.queue_for("customer:c3")] * 2


def test_with_balanced_load_steal_mode_keeps_each_customer_on_one_worker(
    redis_url: str,
) -> None:
    """Published at a pace the workers keep up with (a round of one task per customer, the
    next once it is done: never more than two tasks in a queue), no queue grows past the
    threshold: in "steal" mode too, at least 90% of each customer's tasks run on one worker.
    (Publishing at a fixed rate let a loaded CI machine fall behind, and the queue that
    then grew past the threshold was rightly stolen from.)"""
    with _workers(redis_url, "steal", 2, threshold=6) as (m, _procs, _name):
        homes = _wait_homes(m, 2)
        by_customer: dict[str, Counter[str]] = defaultdict(Counter)
        for i in range(6):
            round_ = [(f"c{c}", m.handle.delay(f"c{c}", i, 0.02)) for c in range(10)]
            for customer, r in round_:
                by_customer[customer][r.get(timeout=60)["worker"]] += 1
        assert _homes(m) == homes  # no queue changed home meanwhile
        for customer, workers in by_customer.items():
            assert workers.most_common(1)[0][1] / 6 >= 0.9, (customer, workers)


def test_with_max_in_flight_1_each_task_runs_on_its_queues_home_one_at_a_time(
    redis_url: str,
) -> None:
    """Affinity decides where, the limit when: with two workers of two threads each and a
    fleet-wide max_in_flight of 1, every task runs on its affinity queue's home (a task
    that waited for the slot, or was rescheduled, is still there), never two at once."""
    with _workers(redis_url, "dedicated", 2) as (m, _procs, _name):
        homes = _wait_homes(m, 2)
        config = m.fleet.distribution
        calls = [(f"c{c}", i) for i in range(3) for c in range(8)]
        results = [m.limited.delay(c, i) for c, i in calls]
        done = [r.get(timeout=90) for r in results]
        assert sorted(d["n"] for d in done) == sorted(i for _, i in calls)
        for (customer, _), out in zip(calls, done, strict=True):
            queue = config.queue_for(f"customer:{customer}")
            assert out["queue"] == queue
            assert out["worker"] == homes[config.index_of(queue)], (customer, out)
        assert len({d["worker"] for d in done}) == 2  # both workers ran some
        most = [int(x) for x in m._probe.lrange(m.key("limited:most"), 0, -1)]
        assert len(most) == len(calls) and max(most) == 1, most
        assert _homes(m) == homes


def test_a_killed_workers_queues_move_and_no_task_is_lost(redis_url: str) -> None:
    lease_s = 3.0  # rounds every second: one that waited for its round would lag by up to 1 s
    with _workers(redis_url, "dedicated", 2, lease_s=lease_s) as (m, procs, name):
        homes = _wait_homes(m, 2)
        victim = f"{name}-0@"
        assert any(h.startswith(victim) for h in homes)
        calls = [(f"c{c}", i) for i in range(8) for c in range(8)]
        results = [m.handle.delay(c, i, 0.1) for c, i in calls]
        deadline = time.monotonic() + 30
        while len(_ran(m)) < 8:  # both workers are busy
            assert time.monotonic() < deadline
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        keys = [
            f"{{{m.NAMESPACE}:affinity}}:home:{q}"
            for q, h in enumerate(homes)
            if h.startswith(victim)
        ]
        lapse_s = max(m._probe.pttl(k) for k in keys) / 1000.0  # its last lease, from the kill
        # Within one lease of the kill: the survivor looks again just after the victim's
        # last lease lapses (the homes script tells it when), not at its next round.
        homes = _wait_homes(m, 1, within_s=lease_s + 5)
        moved_s = time.monotonic() - killed_at
        assert moved_s <= lease_s + 0.5, f"moved {moved_s:.2f} s after the kill"
        assert moved_s <= lapse_s + 0.3, f"moved {moved_s - lapse_s:.2f} s after the lapse"
        assert not any(h.startswith(victim) for h in homes)
        done = [r.get(timeout=90) for r in results]  # every task ran: none lost
        assert sorted((d["n"]) for d in done) == sorted(i for _, i in calls)
        ran = {(c, int(n)) for c, n, *_ in _ran(m)}
        assert ran == set(calls)
        print(
            f"queues moved {moved_s:.2f} s after the SIGKILL, "
            f"{moved_s - lapse_s:.2f} s after the lapse (lease {lease_s} s)"
        )


def test_a_worker_that_stops_gives_its_queues_up_at_once(redis_url: str) -> None:
    """A warm shutdown cancels the worker's consumers and deletes its leases: the queues
    move at the peer's next round, long before the (30 s) lease would lapse."""
    with _workers(redis_url, "dedicated", 2, lease_s=30.0) as (m, procs, name):
        _wait_homes(m, 2)
        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(20)
        homes = _wait_homes(m, 1, within_s=15.0)
        assert all(h.startswith(f"{name}-1@") for h in homes)
        assert m.handle.delay("c1", 1).get(timeout=30)["worker"].startswith(f"{name}-1@")


def _hot_customer(m: ModuleType, homes: list[str], home: str) -> str:
    config = m.fleet.distribution
    for c in range(1000):
        if homes[config.index_of(config.queue_for(f"customer:hot{c}"))].startswith(home):
            return f"hot{c}"
    raise AssertionError("no customer maps to a queue of " + home)


@pytest.mark.parametrize(("mode", "broker"), [("steal", "redis"), ("dedicated", "redis"),
                                             ("steal", "amqp")])  # fmt: skip
def test_an_idle_worker_steals_from_a_deep_queue_only_in_steal_mode(
    redis_url: str, mode: str, broker: str
) -> None:
    if broker == "amqp" and not _rabbitmq_answers():
        if os.environ.get("CI"):
            pytest.fail(f"no RabbitMQ at {AMQP_URL}")
        pytest.skip(f"no RabbitMQ at {AMQP_URL}")
    amqp = AMQP_URL if broker == "amqp" else None
    with _workers(redis_url, mode, 2, ("threads", "1"), amqp=amqp) as (m, _procs, name):
        homes = _wait_homes(m, 2)
        home, peer = f"{name}-0@", f"{name}-1@"
        customer = _hot_customer(m, homes, home)
        queue = m.fleet.distribution.index_of(
            m.fleet.distribution.queue_for(f"customer:{customer}")
        )
        results = [m.handle.delay(customer, i, 0.25) for i in range(16)]
        # inspect fleet reads the depths of the home's queues on the call (dedicated
        # workers never sample; a busy steal worker's samples are old)
        inspect = m.app.control.inspect(destination=[homes[queue]], timeout=5, limit=1)
        answer = (inspect._request("fleet") or {})[homes[queue]]["distribution"]
        assert set(answer["depths"]) == {str(q) for q in answer["home_of"]}, answer
        assert answer["depths"][str(queue)] >= (8 if mode == "dedicated" else 4), answer
        workers = Counter(r.get(timeout=60)["worker"].split("@")[0] + "@" for r in results)
        if mode == "steal":
            assert workers[peer] >= 2, workers  # the idle peer took some of the hot queue
            assert workers[home] >= 2, workers  # and its home kept working on it
        else:
            assert workers == {home: 16}, workers  # dedicated never steals
        # counted: by the workers (inspect fleet) and fleet-wide (status, metrics)
        answers = m.app.control.inspect(timeout=5)._request("fleet") or {}
        counts = {w.split("@")[0] + "@": a["distribution"] for w, a in answers.items()}
        assert counts[peer]["stolen_tasks"] == workers[peer], counts
        assert counts[home]["local_hits"] >= workers[home], counts
        assert queue in counts[home]["home_of"]
        stats = m.app.control.inspect(timeout=5).stats() or {}
        line = next(s for w, s in stats.items() if w.startswith(peer))["fleet: distribution"]
        assert line.startswith(mode) and f"{workers[peer]} stolen" in line, line
        deadline = time.monotonic() + 10
        while True:  # each worker adds its counts every round (half a second)
            row = affinity_status(m.fleet.store, m.fleet.distribution)[queue]
            if (row.local, row.stolen) == (workers[home], workers[peer]):
                break
            assert time.monotonic() < deadline, (row, workers)
            time.sleep(0.1)
        text = _status(m.fleet, (), False)
        assert f"affinity queues ({mode}" in text and row.name in text, text
        # the metric celery_fleet_affinity_tasks_total has the status's counts, per queue
        scraped = _affinity_metric(m.fleet)
        for row in affinity_status(m.fleet.store, m.fleet.distribution):
            for kind, n in (("local", row.local), ("stolen", row.stolen)):
                assert scraped.get((str(row.queue), kind), 0.0) == n, (row, scraped)
        assert scraped[(str(queue), "local")] == workers[home] > 0, scraped


def _affinity_metric(fleet: Any) -> dict[tuple[str, str], float]:
    """``celery_fleet_affinity_tasks_total`` as a scrape sees it: (queue, kind) -> value."""
    found: dict[tuple[str, str], float] = {}
    for family in fleet_registry(fleet).collect():
        for sample in family.samples:
            if sample.name == "celery_fleet_affinity_tasks_total":
                assert sample.labels["fleet"] == fleet.namespace
                found[(sample.labels["queue"], sample.labels["kind"])] = sample.value
    return found


def test_a_shared_worker_drains_tasks_left_in_affinity_queues(redis_url: str) -> None:
    """Switching from "dedicated" to "shared" strands nothing: the tasks already waiting in
    affinity queues are consumed (here sent there directly, as the old mode did)."""
    with _workers(redis_url, "shared", 1) as (m, _procs, _name):
        config = m.fleet.distribution
        left = [
            m.app.send_task(m.handle.name, (f"c{q}", q), queue=config.queue_name(q))
            for q in range(QUEUES)
        ]
        assert sorted(r.get(timeout=60)["n"] for r in left) == list(range(QUEUES))
        assert m.handle.delay("c1", 99).get(timeout=30)["queue"] == f"fleet-{m.NAMESPACE}"


def test_a_bad_distribution_setting_stops_the_worker_at_start(redis_url: str) -> None:
    broker = redis_url.rsplit("/", 1)[0] + "/12"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FLEET_AFF_BROKER": broker,
        "FLEET_AFF_NS": f"aff-{new_run()}",
        "FLEET_AFF_MODE": "stealing",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.affinity_app", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode != 0
    assert "ConfigError" in out and "fleet_distribution must be one of" in out, out[-2000:]


def test_a_worker_with_another_number_of_affinity_queues_is_refused(redis_url: str) -> None:
    """A worker started with a different ``fleet_affinity_queues`` than the live workers
    computed other homes: the queues it should have been home of in the others' view had
    no home at all, and their tasks waited for ever, silently. It is refused at start (a
    ConfigError naming the setting), and every affinity queue keeps a home."""
    with _workers(redis_url, "dedicated", 2) as (m, procs, name):
        _wait_homes(m, 2)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FLEET_AFF_QUEUES": str(QUEUES - 3),
        }
        log = ROOT / f".pytest-worker-{name}-odd.log"
        with open(log, "w") as out:
            odd = subprocess.Popen(
                [
                    *(sys.executable, "-m", "celery", "-A", "tests.integration.affinity_app"),
                    *("worker", "-P", "threads", "-c", "1", "-n", f"{name}-odd@%h"),
                    *("--without-gossip", "--without-mingle", "--without-heartbeat"),
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            returncode = odd.wait(timeout=30)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if odd.poll() is None:
                odd.kill()
                odd.wait()
        text = log.read_text()
        log.unlink()
        assert returncode not in (None, 0), "the odd worker started: " + text[-1500:]
        assert "ConfigError" in text and "fleet_affinity_queues" in text, text[-1500:]
        # Every queue has a home among the two right workers, and its tasks run.
        assert {h.split("@")[0] for h in _wait_homes(m, 2)} == {f"{name}-0", f"{name}-1"}
        config = m.fleet.distribution
        keys: dict[int, str] = {}
        k = 0
        while len(keys) < QUEUES:
            keys.setdefault(config.index_of(config.queue_for(f"customer:c{k}")) or 0, f"c{k}")
            k += 1
        results = [m.handle.delay(customer, q) for q, customer in keys.items()]
        assert sorted(r.get(timeout=60)["n"] for r in results) == sorted(keys)
