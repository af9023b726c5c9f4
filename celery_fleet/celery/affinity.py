"""Affinity queues in Celery: routing at publish, and the worker bootstep that consumes them.

Example::

    app.conf.fleet_distribution = "steal"          # "shared" (default) | "dedicated" | "steal"
    app.conf.fleet_affinity_queues = 32
    app.conf.fleet_steal_threshold = 4

    @fleet_task(affinity="customer:{customer_id}")  # or a callable taking the arguments
    def handle(customer_id, ticket): ...

**Publish.** ``FleetTask.apply_async`` binds the ``affinity`` template (or calls the
callable) on the call's arguments, as ``idempotency_key`` and ``key`` are bound: a bad
template or a callable that raises is a :class:`~celery_fleet.ConfigError` at publish. In
``"dedicated"`` and ``"steal"`` mode the task is routed to its affinity queue
(``<namespace>.affinity.<n>``, :func:`~celery_fleet.distribution.queue_of` of the key).
An explicit ``apply_async(queue=...)`` naming another queue wins. A rescheduled or retried
copy (published from the request's routing) is routed again the same way, so it goes back
to its affinity queue; in ``"shared"`` mode it goes to the task's ordinary queue.

**Workers.** :class:`DistributionStep`, a consumer bootstep added to every app with a
fleet task, runs the worker's :class:`~celery_fleet.celery.distributor.Distributor`. The
worker is started as usual (``celery -A proj worker -Q default``): the step adds the
affinity queues it is home of, and removes the ones it loses, itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals

from ..distribution import DistributionConfig
from ..durability.ledger import check_key
from ..fleet import Fleet
from .distributor import BrokerDepths, Distributor
from .idempotency import KeySpec, check_key_spec, key_of

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["DistributionStep", "check_affinity_spec", "affinity_of", "route", "install", "running"]

log = logging.getLogger("celery_fleet")

#: Publish options that route a message; recomputed when they point at an affinity queue.
_ROUTING = ("queue", "exchange", "routing_key")


def check_affinity_spec(spec: object) -> KeySpec:
    """At decoration: a template over the task's arguments or a callable, or None."""
    return check_key_spec(spec, "affinity")


def affinity_of(spec: KeySpec, fun: Any, args: Any, kwargs: Any) -> str | None:
    """The affinity key of one call (None: the task has none)."""
    return key_of(spec, fun, args, kwargs, "affinity", lambda k: check_key(k, "affinity key"))


def _names_affinity_queue(config: DistributionConfig, value: Any) -> bool:
    name = value if isinstance(value, str) else getattr(value, "name", None)
    return isinstance(name, str) and config.index_of(name) is not None


def route(config: DistributionConfig, key: str | None, options: dict[str, Any]) -> None:
    """Route one publish (``options`` of ``apply_async``, changed in place) by its key.

    With a key and a routing mode: to the key's affinity queue, unless ``queue`` names
    another queue. Routing that points at an affinity queue (a rescheduled copy's) is
    dropped first, so it is recomputed, or, in ``"shared"`` mode, left to Celery.
    """
    ours = any(_names_affinity_queue(config, options.get(o)) for o in _ROUTING)
    if ours:
        for option in _ROUTING:
            options.pop(option, None)
    elif options.get("queue") is not None:
        return  # the caller chose a queue
    if key is not None and config.routes:
        options["queue"] = config.queue_for(key)


class DistributionStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: run the worker's distribution loop in the main process."""

    label = "celery-fleet distribution"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.distributor: Distributor | None = None

    def start(self, c: Any) -> None:
        if self.distributor is not None:
            self.distributor.consumer = c  # the consumer restarted (broker reconnect)
            return
        fleet = Fleet.for_app(c.app)
        config = fleet.distribution
        concurrency = int(getattr(getattr(c, "controller", None), "concurrency", 1) or 1)
        # Here, not at the top: the package (celery.worker) is the worker's, and a process
        # that only publishes tasks would import it for nothing.
        from celery.worker import state as worker_state

        def free_slots() -> int:
            return concurrency - len(worker_state.reserved_requests)

        self.distributor = Distributor(
            c,
            fleet.store,
            config,
            str(c.hostname),
            BrokerDepths(c.app),
            free_slots,
            open_depths=lambda: BrokerDepths(c.app),
        ).start()
        _running[id(c.app)] = self.distributor
        log.info(
            "celery-fleet: distribution %r over %d affinity queues (worker id %s)",
            config.mode,
            config.queues,
            self.distributor.homes.worker_id,
        )

    def stop(self, c: Any) -> None:
        # A restart (the broker connection dropped) keeps the loop and its queues; the
        # worker stopping ends them.
        if c.blueprint.state in (bootsteps.CLOSE, bootsteps.TERMINATE):
            self.shutdown(c)

    def shutdown(self, c: Any) -> None:
        distributor, self.distributor = self.distributor, None
        if distributor is not None:
            _running.pop(id(c.app), None)
            distributor.stop()

    def info(self, c: Any) -> dict[str, Any]:
        """Merged into ``celery inspect stats``: one line, as the limits' are, which
        Flower's worker page shows ("Other"). ``celery inspect fleet`` has the details."""
        if self.distributor is None:
            return {}
        return {"fleet: distribution": self.distributor.summary()}


#: The distribution loop of each app running in this process (by ``id(app)``).
_running: dict[int, Distributor] = {}


def running(app: Celery) -> Distributor | None:
    """The distribution loop of ``app`` in this worker process, if it runs here."""
    return _running.get(id(app))


@signals.task_received.connect(weak=False)  # type: ignore[untyped-decorator]
def _count_received(request: Any = None, **_: Any) -> None:
    """In the worker's main process: count a task from an affinity queue as a locality
    hit (this worker is its queue's home) or as stolen."""
    if request is None or not _running:
        return
    routing_key = (getattr(request, "delivery_info", None) or {}).get("routing_key")
    if not routing_key:
        return
    distributor = _running.get(id(getattr(request, "app", None)))
    if distributor is None and len(_running) == 1:
        distributor = next(iter(_running.values()))
    if distributor is not None:
        distributor.received(str(routing_key))


def install(app: Celery) -> None:
    """Add :class:`DistributionStep` to ``app``'s consumer blueprint (idempotent)."""
    app.steps["consumer"].add(DistributionStep)
