"""Prometheus metrics of the fleet, read from Redis at scrape time (``[prometheus]`` extra).

:class:`FleetCollector` turns each limit's
:func:`~celery_fleet.observability.status.limit_status` into
gauges when Prometheus scrapes. It reads the fleet's shared state, so the numbers are the
same whichever worker answers, it is correct under prefork (no per-child counters to
merge), and the hot path pays nothing for it: admission stays one round trip.

Every name starts ``celery_fleet_`` and every series carries ``fleet`` (the namespace).
The figures are fleet-wide, so N workers export N copies of each: aggregate over
instances with ``max by (fleet, limit, ...)`` (``sum`` would count the fleet N times).

Gauges (labels ``fleet``, ``limit``; windows also ``dimension`` and ``period_seconds``,
which name the window and not its budget, so a changed budget keeps its series):

- ``celery_fleet_up``: 1 when the fleet's Redis answered this scrape, else 0 (the scrape
  itself never fails);
- ``celery_fleet_in_flight``, ``celery_fleet_in_flight_cap`` (the cap in force: the
  adaptive one when the limit is adaptive), ``celery_fleet_oldest_lease_seconds``;
- ``celery_fleet_budget_left`` and ``celery_fleet_budget_full``: units each window admits
  now, and holds;
- ``celery_fleet_adaptive_cap``, ``celery_fleet_rate_factor``;
- ``celery_fleet_discovered_factor`` (a limit with ``"discover"``: the rate factor in
  force over the declared rate; above 1, capacity found above it) and
  ``celery_fleet_discovered_rate`` (``dimension``, ``period_seconds``: the window's
  effective budget per period, to set beside the declared one);
- ``celery_fleet_paused_seconds`` (a provider's Retry-After still running);
- ``celery_fleet_breaker_state`` (label ``state``: 1 for the current one of closed, open,
  half_open), ``celery_fleet_breaker_forced`` (1 when an operator forced it);
- ``celery_fleet_waiting``: callers in line;
- ``celery_fleet_quality_state`` (label ``state``, as the breaker's),
  ``celery_fleet_quality_garbage_rate`` and ``celery_fleet_quality_baseline``: a limit's
  quality breaker (docs/quality.md), with the counter ``celery_fleet_judged_total``
  (``verdict``: ok, garbage);
- ``celery_fleet_limit_config_version``: the version of the runtime change in force
  (``fleet.set_limit``; 0: the configured values, never changed). The cap and budget
  gauges show the values in force.

A limit with priority lanes, per lane (label ``lane``):
``celery_fleet_lane_in_flight``, ``celery_fleet_lane_waiting``,
``celery_fleet_lane_in_flight_cap`` (what the lane and those below may hold: its usable
share of the cap in force), ``celery_fleet_lane_owed`` (the slots it is owed while it
waits), ``celery_fleet_lane_share`` and ``celery_fleet_lane_guarantee`` (those two as
parts of every budget). A limit with keys, its busiest :data:`METRIC_KEYS` keys only
(label ``key``, as callers wrote it; ``""`` for callers without one): so the series stay
bounded however many keys there are, and a key leaves them when others are busier:
``celery_fleet_key_in_flight``, ``celery_fleet_key_waiting``.

Counters (:mod:`celery_fleet.observability.counters`: counted in each process, added to
Redis every 2 s, so fleet totals too):
``celery_fleet_admitted_total``, ``celery_fleet_refused_total`` (``reason``),
``celery_fleet_provider_pushback_total`` (``status``), ``celery_fleet_reschedules_total``
(``reason``), the histogram ``celery_fleet_wait_seconds`` (admitted slots' time in line),
``celery_fleet_dedupe_hits_total`` (``kind``: ``publish``, ``replay``) and
``celery_fleet_affinity_tasks_total`` (``queue``, ``kind``: ``local`` for tasks run by
their affinity queue's home, ``stolen`` for the others; docs/distribution.md).

Serve them from a worker: set ``app.conf.fleet_metrics_port = 9808`` and the
:class:`MetricsStep` bootstep (added to every app that has a FleetTask; otherwise
``app.steps["worker"].add(MetricsStep)``) starts an HTTP server in the worker's main
process, ``/metrics``. Elsewhere: ``prometheus_client.start_http_server(port,
registry=fleet_registry(fleet))``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from celery import bootsteps

from .. import checks
from ..distribution.status import read_stats
from ..errors import ConfigError, FleetError
from ..fleet import Fleet
from .cli import register_inspect
from .counters import KEYS_LIMIT, WAIT_BUCKETS_S, read_counters
from .status import BUSIEST_KEYS, LimitStatus, StatusSource, fleet_status

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "FleetCollector",
    "InfoStep",
    "MetricsSource",
    "MetricsStep",
    "fleet_registry",
    "check_port",
    "install",
    "inspect_fleet",
]

log = logging.getLogger("celery_fleet")
BREAKER_STATES = ("closed", "open", "half_open")


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:  # the extra is not installed
        raise ConfigError(
            "fleet_metrics_port needs prometheus-client: pip install 'celery-fleet[prometheus]'"
        ) from None
    return prometheus_client


def check_port(value: object) -> int | None:
    """``fleet_metrics_port``: None (off) or a TCP port."""
    return checks.check_port(value, "fleet_metrics_port")


class MetricsSource(StatusSource, Protocol):
    """What :class:`FleetCollector` reads of a :class:`~celery_fleet.Fleet`: each limit's
    status, and the event counters kept under its namespace in the same store."""

    @property
    def namespace(self) -> str: ...


class _Keeper(Protocol):
    def describe(self) -> list[dict[str, object]]: ...


class _Holding(Protocol):
    """A fleet whose lease keeper knows the slots this process holds."""

    @property
    def keeper(self) -> _Keeper: ...


#: The prefix of every metric name the collector exports.
PREFIX = "celery_fleet_"
#: Keys exported per limit with keys (the busiest): the series a scrape holds stay bounded.
METRIC_KEYS = BUSIEST_KEYS


class FleetCollector:
    """A Prometheus collector of one Fleet's limits (see the module docstring).

    Every series carries ``fleet`` (the fleet's namespace): the figures are the fleet's,
    read from its Redis, so every worker exports the same ones. Aggregate them over
    workers with ``max by (fleet, limit, ...)``, never ``sum`` (which counts the fleet
    once per worker)."""

    def __init__(self, fleet: MetricsSource) -> None:
        self.fleet = fleet

    def describe(self) -> list[Any]:
        return []  # unchecked collector: the families depend on the limits configured

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily as Gauge

        fleet = [self.fleet.namespace]

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Gauge(f"{PREFIX}{name}", doc, labels=["fleet", "limit", *labels])

        up = Gauge(f"{PREFIX}up", "1 when the fleet's Redis answered this scrape", labels=["fleet"])
        try:
            rows = fleet_status(self.fleet)
        except FleetError as exc:
            log.warning("celery-fleet: metrics scrape without Redis: %s", exc)
            up.add_metric(fleet, 0.0)
            yield up
            return
        up.add_metric(fleet, 1.0)
        yield up
        window = ("dimension", "period_seconds")
        g = {
            "in_flight": gauge("in_flight", "Leases held now"),
            "cap": gauge("in_flight_cap", "The in-flight cap in force (adaptive when learned)"),
            "oldest": gauge("oldest_lease_seconds", "Age of the oldest lease held"),
            "left": gauge("budget_left", "Units a window admits now", window),
            "full": gauge("budget_full", "Units a window holds when full", window),
            "acap": gauge("adaptive_cap", "The adaptive (AIMD) in-flight cap"),
            "factor": gauge("rate_factor", "The adaptive rate factor (1: the full rate)"),
            "disc": gauge("discovered_factor", "Rate factor in force over the declared rate"),
            "disc_rate": gauge("discovered_rate", "A window's effective budget per period", window),
            "paused": gauge("paused_seconds", "Seconds left of a provider's Retry-After pause"),
            "breaker": gauge("breaker_state", "1 for the breaker's state", ("state",)),
            "forced": gauge("breaker_forced", "1 when an operator forced the breaker"),
            "waiting": gauge("waiting", "Callers waiting in line"),
            "quality": gauge("quality_state", "1 for the quality breaker's state", ("state",)),
            "garbage": gauge(
                "quality_garbage_rate", "Garbage rate of judged calls over the quality window"
            ),
            "baseline": gauge("quality_baseline", "The quality breaker's rolling garbage rate"),
            "version": gauge(
                "limit_config_version",
                "Version of the runtime change in force (fleet.set_limit; 0: none)",
            ),
            **_lane_and_key_gauges(gauge),
        }
        for s in rows:
            lim = [*fleet, s.limit]
            g["in_flight"].add_metric(lim, s.in_flight)
            if s.cap is not None:
                g["cap"].add_metric(lim, s.cap)
            if s.oldest_lease_s is not None:
                g["oldest"].add_metric(lim, s.oldest_lease_s)
            # Labelled by what the window is, not its budget (status lists the windows in
            # the config's order).
            for cfg, w in zip(self.fleet.limits[s.limit].windows, s.windows, strict=True):
                labels = [*lim, cfg.dimension, str(cfg.period_s)]
                g["left"].add_metric(labels, w.left)
                g["full"].add_metric(labels, w.full)
            if s.adaptive_cap is not None:
                g["acap"].add_metric(lim, s.adaptive_cap)
                g["factor"].add_metric(lim, s.rate_factor or 1.0)
            if s.discovered is not None:
                g["disc"].add_metric(lim, s.discovered)
                for cfg in self.fleet.limits[s.limit].windows:
                    labels = [*lim, cfg.dimension, str(cfg.period_s)]
                    g["disc_rate"].add_metric(labels, cfg.budget * s.discovered)
            g["paused"].add_metric(lim, s.paused_s)
            if s.breaker is not None:
                for state in BREAKER_STATES:
                    g["breaker"].add_metric([*lim, state], 1.0 if s.breaker == state else 0.0)
                g["forced"].add_metric(lim, 1.0 if s.breaker_forced else 0.0)
            g["waiting"].add_metric(lim, s.waiting)
            if s.quality is not None:
                for state in BREAKER_STATES:
                    g["quality"].add_metric([*lim, state], float(s.quality["state"] == state))
                g["garbage"].add_metric(lim, s.quality["garbage_rate"])
                g["baseline"].add_metric(lim, s.quality["baseline"])
            g["version"].add_metric(lim, s.config_version)
            _add_lanes_and_keys(g, lim, s)
        yield from g.values()
        try:
            yield from self._counters([s.limit for s in rows])
        except FleetError as exc:
            log.warning("celery-fleet: metrics scrape could not read the counters: %s", exc)

    def _counters(self, limits: list[str]) -> Iterator[Any]:
        """The fleet's event counters and wait histogram, from Redis (counters.py): fleet
        totals (every process adds its counts there), so also the same on every worker."""
        from prometheus_client.core import CounterMetricFamily as C
        from prometheus_client.core import HistogramMetricFamily as H

        def counter(name: str, doc: str, *labels: str) -> Any:
            return C(f"{PREFIX}{name}", doc, labels=["fleet", *labels])

        c = {
            "admitted": counter("admitted", "Slots admitted", "limit"),
            "refused": counter("refused", "Slots that gave up", "limit", "reason"),
            "pushback": counter(
                "provider_pushback", "Provider 429s/overloads on admitted calls", "limit", "status"
            ),
            "rescheduled": counter(
                "reschedules", "Task reschedules by backpressure", "limit", "reason"
            ),
            "judged": counter("judged", "Calls judged by slot.judge", "limit", "verdict"),
        }
        waits = H(f"{PREFIX}wait_seconds", "Time admitted slots waited in line",
                  labels=["fleet", "limit"])  # fmt: skip
        dedupe = counter("dedupe_hits", "Duplicate publishes dropped, done keys replayed", "kind")
        fleet = self.fleet
        ns = fleet.namespace
        for limit in limits:
            got = read_counters(fleet.store, ns, limit)
            for field, value in got.items():
                name, _, label = field.partition("|")
                if name == "admitted":
                    c[name].add_metric([ns, limit], value)
                elif name in c:
                    c[name].add_metric([ns, limit, label], value)
            if "admitted|" in got:
                buckets, total = [], 0.0
                for bound in (*(f"{b:g}" for b in WAIT_BUCKETS_S), "+Inf"):
                    total += got.get(f"wait_in|{bound}", 0.0)
                    buckets.append((bound, total))
                waits.add_metric([ns, limit], buckets, sum_value=got.get("wait_sum|", 0.0))
        for field, value in read_counters(fleet.store, ns, KEYS_LIMIT).items():
            dedupe.add_metric([ns, field.partition("|")[2]], value)
        affinity = counter(
            "affinity_tasks", "Tasks from affinity queues: run by the home or stolen",
            "queue", "kind",
        )  # fmt: skip
        for field, n in read_stats(fleet.store, ns).items():
            kind, _, queue = field.partition("|")
            affinity.add_metric([ns, queue, kind], float(n))
        yield from c.values()
        yield waits
        yield dedupe
        yield affinity


def _lane_and_key_gauges(gauge: Any) -> dict[str, Any]:
    """The gauges of each lane (label ``lane``) and of the busiest keys (label ``key``)."""
    lane, key = ("lane",), ("key",)
    return {
        "lane_in_flight": gauge("lane_in_flight", "Leases held by the lane", lane),
        "lane_waiting": gauge("lane_waiting", "The lane's callers waiting in line", lane),
        "lane_cap": gauge(
            "lane_in_flight_cap", "Leases the lane and those below may hold (its share)", lane
        ),
        "lane_owed": gauge("lane_owed", "Slots the lane is owed while it waits", lane),
        "lane_share": gauge("lane_share", "Part of every budget the lane may use", lane),
        "lane_guarantee": gauge(
            "lane_guarantee", "Part of every budget the lane is owed while it waits", lane
        ),
        "key_in_flight": gauge(
            "key_in_flight", f"Leases held by a key (the {METRIC_KEYS} busiest)", key
        ),
        "key_waiting": gauge(
            "key_waiting", f"A key's callers in line (the {METRIC_KEYS} busiest)", key
        ),
    }


def _add_lanes_and_keys(g: dict[str, Any], lim: list[str], s: LimitStatus) -> None:
    for x in s.lanes:
        labels = [*lim, x.lane]
        g["lane_in_flight"].add_metric(labels, x.in_flight)
        g["lane_waiting"].add_metric(labels, x.waiting)
        g["lane_share"].add_metric(labels, x.share)
        g["lane_guarantee"].add_metric(labels, x.guarantee)
        if x.cap is not None:
            g["lane_cap"].add_metric(labels, x.cap)
        if x.owed is not None:
            g["lane_owed"].add_metric(labels, x.owed)
    for k in (s.keys or [])[:METRIC_KEYS]:
        g["key_in_flight"].add_metric([*lim, k.key], k.in_flight)
        g["key_waiting"].add_metric([*lim, k.key], k.waiting)


def fleet_registry(fleet: MetricsSource) -> Any:
    """A Prometheus registry holding only the fleet's collector."""
    prometheus = _prometheus()
    registry = prometheus.CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    return registry


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: serve ``/metrics`` on ``fleet_metrics_port`` from the main process."""

    label = "celery-fleet metrics"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.port = check_port(worker.app.conf.get("fleet_metrics_port"))
        self.server: Any = None

    def include_if(self, worker: Any) -> bool:
        return self.port is not None

    def start(self, worker: Any) -> None:
        prometheus = _prometheus()
        registry = fleet_registry(Fleet.for_app(worker.app))
        try:
            self.server, _ = prometheus.start_http_server(self.port, registry=registry)
        except OSError as exc:  # a port in use must not stop the worker: it runs unwatched
            log.error("celery-fleet: cannot serve metrics on port %d: %s", self.port, exc)
            return
        log.info("celery-fleet: metrics on :%d/metrics", self.port)

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


class InfoStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep whose ``info()`` adds each limit's state now to the worker's stats,
    where ``celery inspect stats`` and Flower's worker page ("Other") show it.

    Flower prints each stats key as one row, a dict as its Python repr: so each limit is a
    row of its own, ``"fleet: <limit>"``, with a line a person reads
    (:meth:`LimitStatus.summary`), and nothing else (a dict would be a repr row again).
    Programs read the structured state from ``celery inspect fleet`` (``limits``), from
    ``celery fleet status --json`` or from the Prometheus metrics."""

    label = "celery-fleet info"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        register_inspect()  # the worker answers `celery inspect fleet`

    # A StartStopStep with nothing to start: only those are asked for info().
    def start(self, worker: Any) -> None:
        pass

    def stop(self, worker: Any) -> None:
        pass

    def info(self, worker: Any) -> dict[str, Any]:
        try:
            rows = fleet_status(Fleet.for_app(worker.app))
        except FleetError as exc:
            return {"fleet": f"unavailable: {exc}"}
        return {f"fleet: {s.limit}": s.summary() for s in rows}


def install(app: Celery) -> None:
    """Add :class:`InfoStep` and :class:`MetricsStep` to ``app``'s worker blueprint
    (idempotent; metrics are served only when ``fleet_metrics_port`` is set). Called when a
    FleetTask meets the app, before a worker builds its blueprint."""
    app.steps["worker"].add(InfoStep)
    app.steps["worker"].add(MetricsStep)


def held_slots(fleet: _Holding) -> list[dict[str, Any]]:
    """The slots this process holds: limit, lease, tokens, seconds since the last renewal."""
    return fleet.keeper.describe()


def pool_pids(pool: Any) -> list[int]:
    """The pids of a prefork pool's processes (none for other pools)."""
    try:
        return [int(p.pid) for p in pool._pool._pool]
    except AttributeError:
        return []


def inspect_fleet(state: Any) -> dict[str, Any]:
    """``celery inspect fleet``: the slots the answering process holds, each with the task
    that holds it (``task_id``, ``task``, ``held_s``; "no task" for a slot taken outside
    one), and each limit. Under prefork, ``held_in_children``: the same, as each pool
    process recorded it (``recorded_s_ago``: up to 2 s old)."""
    app = state.consumer.app
    fleet = Fleet.for_app(app)
    pool = type(state.consumer.pool).__module__.rsplit(".", 1)[-1]  # prefork, thread...
    try:
        limits = {s.limit: s.as_dict() for s in fleet_status(fleet)}
    except FleetError as exc:
        limits = {"error": str(exc)}  # type: ignore[dict-item]
    answer: dict[str, Any] = {"pool": pool, "held": held_slots(fleet), "limits": limits}
    for step in getattr(state.consumer, "steps", None) or []:
        distributor = getattr(step, "distributor", None)
        if distributor is not None:  # the affinity queues this worker consumes, its counts
            answer["distribution"] = distributor.inspect()  # and their depths, read now
    if pool == "prefork":
        # The pool's processes hold the slots, and control commands never reach them: what
        # each recorded in Redis at its last presence renewal (every 2 s while it admits).
        try:
            by_pid = fleet.presence.held_by(pool_pids(state.consumer.pool))
        except FleetError as exc:
            by_pid = {"error": str(exc)}  # type: ignore[dict-item]
        answer["held_in_children"] = {str(pid): slots for pid, slots in by_pid.items()}
    return answer
