"""The Celery app the integration tests run in real `celery worker` processes.

Configured from environment variables set by the test (broker, namespace, queue) so
that concurrent runs never share keys or queues.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import redis
from celery import Celery

from celery_fleet import Fleet, FleetTask, Throttled, fleet_task
from celery_fleet.celery.signals import task_rescheduled

BROKER = os.environ.get("FLEET_IT_BROKER", "redis://127.0.0.1:6379/10")
NAMESPACE = os.environ.get("FLEET_IT_NS", "it")

app = Celery("fleet_it", broker=BROKER, backend=BROKER)
app.conf.update(
    fleet_redis_url=os.environ.get("FLEET_IT_REDIS", BROKER),
    fleet_namespace=NAMESPACE,
    fleet_limits={
        "model": {"max_in_flight": 3},
        "slow": {"requests": "5/second", "burst": 0.2},  # 1 request, then one per 200 ms
        # test_progress.py: each test has limits of its own.
        "one": {"max_in_flight": 1},  # held by one task while others line up
        "gate": {"max_in_flight": 1},  # held shut by the test process (try_acquire)
        "gate2": {"max_in_flight": 1},
        "broken": {"max_in_flight": 10, "breaker": {"reset_timeout": 0.3}},  # forced open
        "sparse": {"requests": "1/4 seconds"},  # one call, then one per 4 s
    },
    task_default_queue=os.environ.get("FLEET_IT_QUEUE", "fleet-it"),
    worker_prefetch_multiplier=1,
    fleet_claim_lease=3,  # test_idempotency: a dead attempt's key is taken over within 3 s
    # test_worker: the worker serves Prometheus /metrics (MetricsStep) when a port is given
    fleet_metrics_port=int(os.environ["FLEET_IT_METRICS_PORT"])
    if os.environ.get("FLEET_IT_METRICS_PORT")
    else None,
    # test_pump.py: a killed pump leader is replaced within this many seconds
    fleet_pump_lease=float(os.environ.get("FLEET_IT_PUMP_LEASE", "15")),
    broker_connection_retry_on_startup=True,
    result_expires=600,
    # test_worker.py: a prefork child that leaves after one task
    worker_max_tasks_per_child=int(os.environ.get("FLEET_IT_MAX_TASKS_PER_CHILD") or 0) or None,
)
fleet = Fleet(app)
# What the tasks record for the tests; test_outage.py keeps it off the fleet's Redis.
_probe = redis.Redis.from_url(
    os.environ.get("FLEET_IT_PROBE") or os.environ.get("FLEET_IT_REDIS", BROKER)
)


def key(name: str) -> str:
    return f"{NAMESPACE}:probe:{name}"


class CountingTask(FleetTask):
    """Counts reschedules (celery-fleet's task_rescheduled signal, below)."""


@task_rescheduled.connect
def _count_reschedule(sender: Any = None, **_: Any) -> None:
    if isinstance(sender, CountingTask):
        _probe.incr(key("reschedules"))


@task_rescheduled.connect
def _count_reschedule_by_id(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Every reschedule of any task, per task id (test_progress.py)."""
    if request is not None and request.id:
        _probe.incr(key(f"rescheduled:{request.id}"))


@fleet_task(app=app, shared=False, limit="model", base=CountingTask)
def guarded(hold_s: float) -> int:
    """Records how many bodies run at once, as seen by an atomic counter."""
    now = _probe.incr(key("inside"))
    _probe.rpush(key("observed"), now)
    time.sleep(hold_s)
    _probe.decr(key("inside"))
    return int(now)


@fleet_task(
    app=app, shared=False, limit="slow", max_wait=0, max_retries=0, base=CountingTask, bind=True
)
def throttled_whole(self: FleetTask, n: int) -> dict[str, Any]:
    r = self.request
    return {"n": n, "retries": r.retries, "id": r.id, "parent": r.parent_id, "root": r.root_id}


@fleet_task(
    app=app,
    shared=False,
    bind=True,
    max_retries=0,
    base=CountingTask,
    autoretry_for=(Exception,),
    retry_backoff=True,
)
def throttled_body(self: FleetTask, n: int) -> dict[str, Any]:
    with self.fleet.slot("slow", max_wait=0):
        _probe.incr(key("body_calls"))
    return {"n": n, "retries": self.request.retries}


@fleet_task(
    app=app, shared=False, limit="model", acks_late=True, reject_on_worker_lost=True, bind=True
)
def dies_once(self: FleetTask, tag: str) -> int:
    """At-least-once, as the example project configures it: the first run SIGKILLs its own
    pool process while holding a slot; the task is delivered again and completes."""
    runs = _probe.incr(key(f"dies_once:{tag}"))
    if runs == 1:
        os.kill(os.getpid(), 9)
    return int(runs)


# -- test_progress.py: a rescheduled task keeps its place and its paid work -----------------


def redis_ms() -> int:
    """The Redis clock (the one admission orders by), in ms."""
    sec, usec = fleet.store.call("TIME")
    return int(sec) * 1000 + int(usec) // 1000


@fleet_task(app=app, shared=False, bind=True)
def release_held_at_exit(self: FleetTask) -> int:
    """Leaves a slot of 'one' whose release only the process's exit writes (the flusher
    waits an hour); returns the child's pid."""
    self.fleet.store.combiner.flush_s = 3600.0
    for _ in range(10):  # (a background call of the fleet's may carry it: again)
        with self.fleet.slot("one", max_wait=30):
            pass
        if self.fleet.store.combiner._held:
            break
    return os.getpid()


@fleet_task(app=app, shared=False, bind=True)
def hold_one(self: FleetTask, tag: str) -> int:
    """Holds the only slot of 'one' until the test pushes ``release:<tag>`` (60 s at most)."""
    with self.fleet.slot("one", max_wait=30) as slot:
        _probe.set(key(f"held:{tag}"), 1)
        _probe.blpop([key(f"release:{tag}")], timeout=60)
        assert slot.decision is not None
        return int(slot.decision.at_ms)


@fleet_task(app=app, shared=False, bind=True)
def in_line(self: FleetTask, tag: str, first_max_wait: float) -> dict[str, Any]:
    """Asks for a slot of 'one', waiting ``first_max_wait`` s on its first run. A rescheduled
    copy first waits for the test's ``go:<tag>`` (so the test orders the asks), then waits
    as long as it takes. Returns its Redis-clock ask and admission times and its age."""
    past = self.throttling
    if past.reschedules:
        _probe.blpop([key(f"go:{tag}")], timeout=60)
    asked_ms = redis_ms()
    max_wait = 60.0 if past.reschedules else first_max_wait
    with self.fleet.slot("one", max_wait=max_wait) as slot:
        assert slot.decision is not None
        return {
            "asked_ms": asked_ms,
            "admitted_ms": slot.decision.at_ms,
            "since_ms": slot.run.since_ms,
            "header_since_ms": past.since_ms,
            "reschedules": past.reschedules,
        }


def paid_plan(tag: str) -> dict[str, Any]:
    """A paid call (it holds a slot of 'model'), counted per tag: the work a step keeps."""
    with fleet.slot("model"):
        _probe.incr(key(f"plan_calls:{tag}"))
    return {"plan": f"plan-{tag}", "steps": [1, 2, 3]}


@fleet_task(app=app, shared=False, bind=True, max_wait=0, wait_after_call=False)
def step_then_gate(self: FleetTask, tag: str) -> dict[str, Any]:
    """A step, then a slot of 'gate' (held shut by the test): refused, it reschedules."""
    plan = self.step("plan", paid_plan, tag)
    with self.fleet.slot("gate"):
        pass
    return {"plan": plan, "reschedules": self.throttling.reschedules}


@fleet_task(app=app, shared=False, bind=True, max_retries=3)
def step_then_retry(self: FleetTask, tag: str) -> dict[str, Any]:
    """A step, then Celery's own retry on the first attempt."""
    plan = self.step("plan", paid_plan, tag)
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)
    return {"plan": plan, "retries": self.request.retries, "id": self.request.id}


@fleet_task(app=app, shared=False, bind=True, acks_late=True, reject_on_worker_lost=True)
def step_then_die(self: FleetTask, tag: str) -> dict[str, Any]:
    """A step, then (first run only) SIGKILL of its own pool process: redelivered."""
    _probe.rpush(key(f"starts:{tag}"), redis_ms())
    plan = self.step("plan", paid_plan, tag)
    if _probe.incr(key(f"die:{tag}")) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"plan": plan, "runs": int(_probe.get(key(f"die:{tag}")) or 0), "id": self.request.id}


@fleet_task(app=app, shared=False, limit="broken", max_wait=0, max_reschedules=2)
def never_admitted(tag: str) -> str:
    """Its limit's breaker is forced open: the body must never run."""
    _probe.incr(key(f"never_admitted:{tag}"))
    return "admitted"


@fleet_task(app=app, shared=False, bind=True, limit="sparse", max_wait=0)
def sparse_call(self: FleetTask, tag: str) -> dict[str, Any]:
    """What the body sees of its reschedules: the ``fleet`` header."""
    header = getattr(self.request, "fleet", None)
    return {
        "reschedules": self.throttling.reschedules,
        "header": dict(header) if isinstance(header, dict) else header,
    }


def _two_calls(task: FleetTask, tag: str) -> dict[str, Any]:
    """A paid call (a slot of 'model', counted), then a slot of 'gate2' with no max_wait
    of its own: how it waits is the run's choice (wait_after_call)."""
    with task.fleet.slot("model"):
        _probe.incr(key(f"calls:{tag}"))
    with task.fleet.slot("gate2"):
        pass
    return {"reschedules": task.throttling.reschedules}


@fleet_task(app=app, shared=False, bind=True, max_wait=0)
def two_calls(self: FleetTask, tag: str) -> dict[str, Any]:
    """wait_after_call left at its default (True)."""
    return _two_calls(self, tag)


@fleet_task(app=app, shared=False, bind=True, max_wait=0, wait_after_call=False)
def two_calls_restart(self: FleetTask, tag: str) -> dict[str, Any]:
    return _two_calls(self, tag)


@fleet_task(app=app, shared=False, bind=True)
def stamped(self: FleetTask, i: int) -> dict[str, Any]:
    """When it ran, and the ETA its message carried (a staggered fan-out's countdown)."""
    eta = self.request.eta  # an ISO string, or a datetime in some Celery versions
    return {"i": i, "ran": time.time(), "eta": eta if isinstance(eta, str) else eta.isoformat()}


# -- test_idempotency.py ------------------------------------------------------------------


@fleet_task(app=app, shared=False, idempotency_key="count:{tag}:{doc}")
def keyed_count(tag: str, doc: int) -> int:
    """Counts its executions per tag (the body must run once per key)."""
    _probe.incr(key(f"keyed_count:{tag}"))
    time.sleep(0.01)
    return doc


@fleet_task(app=app, shared=False, bind=True, acks_late=True, reject_on_worker_lost=True,
            idempotency_key="die:{tag}")  # fmt: skip
def keyed_die(self: FleetTask, tag: str) -> dict[str, Any]:
    """Two paid steps, then (first run only) SIGKILL of its own process, then a third."""
    one = self.step("one", lambda: int(_probe.incr(key(f"paid:{tag}:one"))))
    two = self.step("two", lambda: int(_probe.incr(key(f"paid:{tag}:two"))))
    if _probe.incr(key(f"keyed_die:{tag}")) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    three = self.step("three", lambda: int(_probe.incr(key(f"paid:{tag}:three"))))
    _probe.incr(key(f"completed:{tag}"))
    return {"steps": [one, two, three], "id": self.request.id}


@fleet_task(app=app, shared=False, bind=True, max_retries=3, idempotency_key="retry:{tag}")
def keyed_retry(self: FleetTask, tag: str) -> dict[str, Any]:
    """Retries once; the second attempt reports what it carries."""
    if self.request.retries == 0:
        raise self.retry(countdown=0.2)
    return {"retries": self.request.retries, "id": self.request.id,
            "key": getattr(self.request, "fleet_key", None)}  # fmt: skip


@fleet_task(app=app, shared=False, bind=True)
def keyed_child(self: FleetTask, tag: str) -> str | None:
    """The key its parent's body ran under, as its message carries it."""
    return getattr(self.request, "fleet_parent_key", None)


@fleet_task(app=app, shared=False, idempotency_key="parent:{tag}")
def keyed_parent(tag: str) -> str:
    """Publishes a child from a keyed body and returns the child's id."""
    return str(keyed_child.delay(tag).id)


@fleet_task(app=app, shared=False, idempotency_key="single:{tag}", singleton=True)
def keyed_single(tag: str, n: int) -> int:
    """Holds its key 0.5 s, counting how many run at once (must never exceed 1)."""
    now = int(_probe.incr(key(f"single_now:{tag}")))
    _probe.rpush(key(f"single_seen:{tag}"), now)
    time.sleep(0.5)
    _probe.decr(key(f"single_now:{tag}"))
    return n


@fleet_task(app=app, shared=False, limit="gate", max_wait=0, idempotency_key="gated:{tag}")
def keyed_gated(tag: str) -> int:
    """Rescheduled while the test holds 'gate' shut; its body runs once it is let in."""
    return int(_probe.incr(key(f"gated:{tag}")))


# -- test_idempotency_faults.py ----------------------------------------------------------


@fleet_task(app=app, shared=False, idempotency_key="lost:{tag}")
def keyed_lost(tag: str) -> int:
    """Early ack (Celery's default): the first run SIGKILLs its own pool process, so its
    message is gone; returns how many times the body started."""
    runs = int(_probe.incr(key(f"keyed_lost:{tag}")))
    if runs == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return runs


@fleet_task(app=app, shared=False, acks_late=True, reject_on_worker_lost=True,
            idempotency_key="rerun:{tag}")  # fmt: skip
def keyed_rerun(tag: str) -> int:
    """Returns how many times the body started; its second run SIGKILLs its own pool
    process (redelivered: acks_late + reject_on_worker_lost)."""
    runs = int(_probe.incr(key(f"keyed_rerun:{tag}")))
    if runs == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return runs


# -- test_outage.py: the fleet's Redis stops mid-burst -----------------------------------


@fleet_task(app=app, shared=False, bind=True)
def through_outage(self: FleetTask, tag: str, hold_s: float) -> dict[str, Any]:
    """Holds a slot of 'model' for ``hold_s`` and records when, where, and whether the
    slot was the store-down policy's (local) or Redis's."""
    with self.fleet.slot("model", max_wait=60) as slot:
        start = time.time()
        time.sleep(hold_s)
        record = {
            "pid": os.getpid(),
            "local": bool(slot.lease_id and slot.lease_id.startswith("local.")),
            "start": start,
            "end": time.time(),
            "share": self.fleet.store_down.local.share,
            # this process's local in-flight cap, and whether it is an allotment of the
            # fleet's count (else a plain share of the cap)
            "cap": self.fleet.store_down.local.cap(self.fleet.limits["model"]),
            "allotted": "model" in self.fleet.store_down.local.allotted,
        }
    _probe.rpush(key(f"outage:{tag}"), json.dumps(record))
    return record


# -- test_pump.py: deferred reschedules survive the pump leader's death --------------------


@fleet_task(app=app, shared=False, bind=True)
def deferred_once(self: FleetTask, tag: str, i: int) -> dict[str, Any]:
    """Refused on its first run (rescheduled ~3 s later, deferred in Redis); the second run
    records itself, with how late it ran after it was due."""
    past = self.throttling
    if not past.reschedules:
        _probe.set(key(f"first:{tag}:{i}"), time.time())
        raise Throttled("model", 3000, "in_flight")
    first = float(_probe.get(key(f"first:{tag}:{i}")) or 0)
    late = time.time() - (first + past.countdown_s)
    _probe.rpush(key(f"ran:{tag}"), json.dumps({"i": i, "late_s": late, "pid": os.getpid()}))
    return {"i": i, "late_s": late}


# -- test_worker.py: an async agent body in a prefork worker -------------------------------


@fleet_task(app=app, shared=False, bind=True)
async def async_agent(self: FleetTask, n: int) -> dict[str, Any]:
    """``n`` coroutines share the 'model' cap (3) through fleet.aslot on the worker
    process's own loop; returns that loop's id, to show it is kept across tasks."""
    import asyncio

    async def one() -> None:
        async with self.fleet.aslot("model", max_wait=60):
            now = _probe.incr(key("inside"))
            _probe.rpush(key("observed"), now)
            await asyncio.sleep(0.05)
            _probe.decr(key("inside"))

    await asyncio.gather(*(one() for _ in range(n)))
    return {"pid": os.getpid(), "loop": id(asyncio.get_running_loop())}


# -- test_inspect_worker.py: `celery inspect fleet` names the task holding each slot -------


def _hold_until_released(tag: str, how: str) -> None:
    _probe.rpush(key(f"holding:{tag}"), how)  # the test waits for all three
    deadline = time.monotonic() + 60
    # short BLPOPs: the client's socket timeout (redis-py's default 5 s) is shorter than
    # the hold
    while time.monotonic() < deadline:
        if _probe.blpop([key(f"release:{tag}:{how}")], timeout=1):
            return


@fleet_task(app=app, shared=False)
def holds_model(tag: str) -> str:
    """Holds a slot of 'model' in the task's own thread until the test releases it."""
    with fleet.slot("model", max_wait=30):
        _hold_until_released(tag, "sync")
    return "sync"


@fleet_task(app=app, shared=False)
async def holds_model_async(tag: str) -> str:
    """The same through ``fleet.aslot`` in an async body (on the worker thread's loop)."""
    import asyncio

    async with fleet.aslot("model", max_wait=30):
        await asyncio.to_thread(_hold_until_released, tag, "async")
    return "async"


@fleet_task(app=app, shared=False)
def holds_model_in_a_thread(tag: str) -> str:
    """A slot taken by a thread the task starts: no task of Celery's runs there."""
    import threading

    def hold() -> None:
        with fleet.slot("model", max_wait=30):
            _hold_until_released(tag, "thread")

    thread = threading.Thread(target=hold)
    thread.start()
    thread.join()
    return "thread"


# -- test_httpx_worker.py: the openai SDK over FleetTransport, no slot code in the task ------


@fleet_task(app=app, shared=False, bind=True, max_retries=0)
def sdk_call(self: FleetTask, base_url: str, n: int) -> dict[str, Any]:
    """One chat completion through ``celery_fleet.httpx.FleetTransport`` on the 'model'
    limit (cap 3): a provider 429 reschedules the task (max_retries=0 would fail it)."""
    import httpx
    import openai

    from celery_fleet.httpx import FleetTransport

    transport = FleetTransport(fleet, "model")
    with openai.OpenAI(
        base_url=base_url, api_key="x", max_retries=0, http_client=httpx.Client(transport=transport)
    ) as client:
        reply = client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": f"question {n}"}], max_tokens=25
        )
    assert reply.usage is not None
    return {"n": n, "id": self.request.id, "retries": self.request.retries}
