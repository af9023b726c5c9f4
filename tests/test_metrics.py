"""Prometheus metrics read from Redis at scrape time (a real worker serving them is in
``tests/integration/test_worker.py``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery
from prometheus_client import generate_latest

from celery_fleet import ConfigError, Fleet, Throttled
from celery_fleet.observability.metrics import MetricsStep, fleet_registry

MakeFleet = Callable[..., Fleet]
DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"
#: A limit with keys and lanes: the dashboard's lane and key panels read its series.
TENANTS = {
    "max_in_flight": 4,
    "keys": {"max_in_flight": 3},
    "lanes": {"interactive": {"priority": 0, "reserve": 0.25}, "batch": {"priority": 1}},
}


def scrape(fleet: Fleet) -> dict[str, float]:
    """``{'name{labels}': value}`` of one scrape, as Prometheus would read it, without the
    ``celery_fleet_`` prefix and the ``fleet`` label that every sample carries."""
    text = generate_latest(fleet_registry(fleet)).decode()
    label = f'fleet="{fleet.namespace}"'
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.startswith("celery_fleet_") and label in name, name
            name = name.removeprefix("celery_").replace(f"{label},", "").replace(label, "")
            out[name.replace("{}", "")] = float(value)
    return out


def test_gauges_follow_the_shared_state(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({
        "llm": {"requests": "60/minute", "burst": 10 / 60, "max_in_flight": 5},
        "tool": {"max_in_flight": 4, "breaker": True, "adaptive": True},
    })  # fmt: skip
    held = [fleet.try_acquire("llm") for _ in range(3)]
    fleet.breaker("tool").force_open()
    got = scrape(fleet)
    assert got["fleet_up"] == 1
    assert got['fleet_in_flight{limit="llm"}'] == 3 and got['fleet_in_flight_cap{limit="llm"}'] == 5
    window = 'dimension="requests",limit="llm",period_seconds="60"'
    assert got[f"fleet_budget_left{{{window}}}"] == 7
    assert got[f"fleet_budget_full{{{window}}}"] == 10
    assert got['fleet_breaker_state{limit="tool",state="open"}'] == 1
    assert got['fleet_breaker_state{limit="tool",state="closed"}'] == 0
    assert got['fleet_breaker_forced{limit="tool"}'] == 1
    assert got['fleet_adaptive_cap{limit="tool"}'] >= 1 and got['fleet_waiting{limit="llm"}'] == 0
    for d in held:
        fleet.release(d)
    assert scrape(fleet)['fleet_in_flight{limit="llm"}'] == 0


def test_a_scrape_without_redis_says_so_and_does_not_fail() -> None:
    fleet = Fleet(redis_url="redis://127.0.0.1:1/0", limits={"llm": {"max_in_flight": 2}})
    got = scrape(fleet)
    assert got == {"fleet_up": 0.0}


@pytest.mark.parametrize("port", [0, 70000, "9808", True, -1])
def test_a_bad_metrics_port_fails_at_start_up(port: object) -> None:
    app = Celery("m", broker="redis://127.0.0.1:6379/9", set_as_current=False)
    app.conf.fleet_metrics_port = port
    with pytest.raises(ConfigError, match="fleet_metrics_port"):
        Fleet(app)


def test_the_bootstep_serves_only_when_a_port_is_set() -> None:
    class Worker:
        def __init__(self, port: object) -> None:
            self.app = Celery("m", set_as_current=False)
            self.app.conf.fleet_metrics_port = port

    assert not MetricsStep(Worker(None)).include_if(Worker(None))
    step = MetricsStep(Worker(9808))
    assert step.include_if(Worker(9808)) and step.port == 9808


def test_a_port_in_use_does_not_stop_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    class Worker:
        def __init__(self, port: int) -> None:
            self.app = Celery("m", broker="redis://127.0.0.1:6379/9", set_as_current=False)
            self.app.conf.update(fleet_metrics_port=port, fleet_limits={})

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        worker = Worker(taken.getsockname()[1])
        step = MetricsStep(worker)
        step.start(worker)  # logs, does not raise
        assert step.server is None and "cannot serve metrics" in caplog.text
    finally:
        taken.close()


def test_counters_reach_redis_in_batches_and_the_scrape(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"max_in_flight": 1}})
    for _ in range(5):
        with fleet.slot("llm"):
            pass
    with fleet.slot("llm"):
        with pytest.raises(Throttled):
            with fleet.slot("llm", max_wait=0):
                pass
    assert fleet.counters.flush() > 0  # (or the background thread, within 2 s)
    # the hash expires a week after its last flush (one PEXPIRE per hash, not per field)
    from celery_fleet.observability.counters import TTL_MS, counters_key

    ttl = fleet.store.client.pttl(counters_key(fleet.namespace, "llm"))
    assert TTL_MS - 60_000 < ttl <= TTL_MS
    got = scrape(fleet)
    assert got['fleet_admitted_total{limit="llm"}'] == 6
    assert got['fleet_refused_total{limit="llm",reason="in_flight"}'] == 1
    assert got['fleet_wait_seconds_count{limit="llm"}'] == 6
    assert got['fleet_wait_seconds_bucket{le="+Inf",limit="llm"}'] == 6
    bounds = ["0.01", "0.1", "0.5", "1", "5", "30", "120", "+Inf"]
    cumulative = [got[f'fleet_wait_seconds_bucket{{le="{b}",limit="llm"}}'] for b in bounds]
    assert cumulative == sorted(cumulative) and cumulative[2] >= 5  # uncontended: < 0.5 s
    assert 0 <= got['fleet_wait_seconds_sum{limit="llm"}'] < 6
    # a second process's counts add up (every process flushes its own deltas)
    other = make_fleet({"llm": {"max_in_flight": 1}})
    with other.slot("llm"):
        pass
    other.counters.flush()
    assert scrape(fleet)['fleet_admitted_total{limit="llm"}'] == 7


def test_counts_survive_a_failed_flush(make_fleet: MakeFleet) -> None:
    from celery_fleet.observability.counters import Counters

    down = Counters(Fleet(redis_url="redis://127.0.0.1:1/0", limits={}).store, "x")
    down.add("llm", "admitted|", 3)
    down.flush()  # Redis away: kept for the next flush
    assert down._counts == {("llm", "admitted|"): 3}


def test_held_slots_are_this_process_s(make_fleet: MakeFleet) -> None:
    from celery_fleet.observability.metrics import held_slots

    fleet = make_fleet({"llm": {"max_in_flight": 3, "tpm": 10_000}})
    assert held_slots(fleet) == []
    with fleet.slot("llm", tokens=7) as slot:
        held = held_slots(fleet)
        assert [(h["limit"], h["lease"], h["tokens"]) for h in held] == [("llm", slot.lease_id, 7)]
    assert held_slots(fleet) == []


def test_the_grafana_dashboard_queries_only_metrics_a_scrape_exposes(
    make_fleet: MakeFleet,
) -> None:
    """docs/grafana-dashboard.json: every fleet_* series it names is in a real scrape (a
    renamed metric would leave a panel silently empty)."""
    import json
    import re
    from pathlib import Path

    fleet = make_fleet({
        "llm": {"rpm": 600, "max_in_flight": 2, "adaptive": True, "breaker": True},
        "tenants": TENANTS,
    })  # fmt: skip
    with fleet.slot("llm"):
        with pytest.raises(Throttled):
            with fleet.slot("llm", max_wait=0):
                pass
    fleet.counters.add("llm", "pushback|429")
    fleet.counters.add("llm", "rescheduled|in_flight")
    fleet.counters.add("_keys", "dedupe|publish")
    fleet.counters.flush()
    with fleet.slot("llm"), fleet.slot("tenants", key="acme", lane="batch"):
        # leases held: fleet_oldest_lease_seconds, a lane's and a key's series have values
        exposed = {"celery_" + re.sub(r"\{.*", "", name) for name in scrape(fleet)}
    dashboard = json.loads(
        (Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {m for e in exprs for m in re.findall(r"\bcelery_fleet_[a-z_]+", e)}
    assert len(dashboard["panels"]) >= 10 and named
    assert named <= exposed, sorted(named - exposed)


#: The dashboard's series without a ``limit`` label (the rest all have one).
UNLIMITED_SERIES = {"celery_fleet_up", "celery_fleet_dedupe_hits_total"}


@pytest.mark.fast
def test_the_grafana_dashboard_filters_every_panel_by_fleet_limit_and_instance() -> None:
    """docs/grafana-dashboard.json has the ``$fleet``, ``$limit`` and ``$instance``
    template variables (multi-valued, with All), ``$limit`` and ``$instance`` offered for
    the chosen fleets, and every series selector of every panel filters by them: a
    variable the panels ignore would show every limit whatever is picked."""
    import json
    import re

    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"fleet", "limit", "instance"} <= set(variables)
    for name in ("fleet", "limit", "instance"):
        var = variables[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"], var
        assert var["allValue"] == ".*", var  # All matches every value, as =~ reads it
    assert 'fleet=~"$fleet"' in variables["limit"]["definition"]
    assert 'fleet=~"$fleet"' in variables["instance"]["definition"]
    selectors = [
        (panel["title"], metric, labels)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for metric, labels in re.findall(r"\b(celery_fleet_[a-z_]+)\{([^}]*)\}", target["expr"])
    ]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    bare = [e for e in exprs if re.search(r"\bcelery_fleet_[a-z_]+(?![a-z_{])", e)]
    assert not bare, bare  # every series has a selector
    assert len(selectors) >= len(dashboard["panels"])
    for title, metric, labels in selectors:
        assert 'fleet=~"$fleet"' in labels, (title, metric)
        assert 'instance=~"$instance"' in labels, (title, metric)
        if metric not in UNLIMITED_SERIES:
            assert 'limit=~"$limit"' in labels, (title, metric)


def samples(fleet: Fleet, **target: str) -> list[tuple[str, dict[str, str], float]]:
    """One scrape as Prometheus stores it: (name, labels, value), with the labels the
    scrape target adds (``instance``...)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(fleet_registry(fleet)).decode()
    return [
        (s.name, {**s.labels, **target}, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


AGGREGATION = re.compile(
    r"^(?:histogram_quantile\([0-9.]+, )?(?P<op>max|min|sum) (?:by \((?P<by>[a-z_, ]+)\) )?"
    r"\((?P<rate>rate\()?(?P<name>[a-z_]+)\{(?P<match>[^}]*)\}(?:\[\w+\]\))?\)\)?$"
)


def evaluate(expr: str, before: list, after: list) -> dict[tuple[str, ...], float]:
    """The dashboard's ``expr`` over stored samples, as Prometheus would evaluate it with
    every template variable at "All": the aggregation, with ``rate`` as the increase from
    ``before`` to ``after`` (histogram_quantile's input: its per-``le`` series)."""
    m = AGGREGATION.match(expr)
    assert m, f"the dashboard has an expression this test cannot read: {expr}"
    by = [b.strip() for b in (m["by"] or "").split(",") if b.strip()]
    fixed = dict(re.findall(r'(\w+)="([^"$]*)"', m["match"]))

    def series(scrape: list) -> dict[tuple, float]:
        return {
            tuple(sorted(labels.items())): value
            for name, labels, value in scrape
            if name == m["name"] and all(labels.get(k) == v for k, v in fixed.items())
        }

    now = series(after)
    if m["rate"]:
        then = series(before)
        now = {k: v - then.get(k, 0.0) for k, v in now.items()}
    groups: dict[tuple[str, ...], list[float]] = {}
    for key, value in now.items():
        labels = dict(key)
        groups.setdefault(tuple(labels.get(b, "") for b in by), []).append(value)
    op = {"max": max, "min": min, "sum": sum}[m["op"]]
    return {k: op(v) for k, v in groups.items()}


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def test_the_dashboard_shows_the_fleet_once_whatever_the_number_of_workers(
    make_fleet: MakeFleet,
) -> None:
    """Two workers export the same fleet-wide series: every panel reads as with one (a
    ``sum`` over instances showed 6 in flight against a cap of 3)."""
    limits = {
        "llm": {"rpm": 600, "max_in_flight": 5},
        "tool": {"tpm": 10_000, "max_in_flight": 4, "breaker": True, "adaptive": True},
        "tenants": TENANTS,
    }
    workers = [make_fleet(limits), make_fleet(limits)]  # two processes, one fleet

    def scrape_all(n: int) -> list:
        return [s for i, w in enumerate(workers[:n]) for s in samples(w, instance=f"w{i}:9808")]

    held = [workers[0].try_acquire("llm") for _ in range(3)]
    held += [workers[0].try_acquire("tenants", key="acme", lane="batch") for _ in range(2)]
    assert all(held)
    before = {n: scrape_all(n) for n in (1, 2)}
    for _ in range(4):
        with workers[1].slot("llm"):
            pass
    workers[1].store.drain()  # its last release rides with its next call (or within ~1 ms)
    for field in ("refused|in_flight", "pushback|429", "rescheduled|in_flight"):
        workers[1].counters.add("llm", field)
    workers[1].counters.add("_keys", "dedupe|publish")
    workers[1].counters.flush()
    after = {n: scrape_all(n) for n in (1, 2)}
    for d in held:
        workers[0].release(d)
    exprs = dashboard_exprs()
    in_flight = next(e for e in exprs if "celery_fleet_in_flight{" in e)
    assert evaluate(in_flight, before[2], after[2])[(workers[0].namespace, "llm")] == 3.0
    for expr in exprs:
        one = evaluate(expr, before[1], after[1])
        assert one, f"no series for {expr}"
        # (approx: a lease ages and a budget refills, 10 a second here, between two
        # workers' scrapes; a sum would double every value, far outside 10%)
        assert evaluate(expr, before[2], after[2]) == pytest.approx(one, rel=0.1, abs=0.5), expr


def test_window_labels_do_not_change_with_the_budget(make_fleet: MakeFleet) -> None:
    """A window is labelled by what it is (dimension, period), not its budget: a changed
    limit keeps its series (and the alerts on them)."""

    def windows(fleet: Fleet) -> dict[tuple, float]:
        return {
            tuple(sorted(labels.items())): value
            for name, labels, value in samples(fleet)
            if name == "celery_fleet_budget_full"
        }

    before = windows(make_fleet({"llm": {"rpm": 30, "tpm": 10_000}}))
    after = windows(make_fleet({"llm": {"rpm": 60, "tpm": 20_000}}))
    assert before.keys() == after.keys() and before != after
    assert {(dict(k)["dimension"], dict(k)["period_seconds"]) for k in before} == {
        ("requests", "60"),
        ("tokens", "60"),
    }


def test_the_worker_stats_give_each_limit_a_readable_row(redis_url: str, namespace: str) -> None:
    """Flower's "Other" tab prints each stats key as a row (a dict as its repr): a row per
    limit that reads as a sentence, and the structured state beside it for programs."""
    from types import SimpleNamespace

    from celery_fleet.observability.metrics import InfoStep

    app = Celery("stats", broker="memory://", set_as_current=False)
    app.conf.fleet_redis_url = redis_url
    app.conf.fleet_namespace = namespace
    app.conf.fleet_limits = {
        "openai": {"requests": "30/minute", "burst": 1.0, "max_in_flight": 3, "breaker": True},
    }
    fleet = Fleet(app)
    held = [fleet.try_acquire("openai") for _ in range(2)]
    worker = SimpleNamespace(app=app)
    info = InfoStep(worker).info(worker)
    assert info["fleet: openai"] == (
        "in flight 2/3, 28 left of 30 requests/60s, breaker closed, 0 waiting"
    )
    # only lines: a dict would be a Python-repr row in Flower again
    assert list(info) == ["fleet: openai"] and all(isinstance(v, str) for v in info.values())
    assert all(held)  # the namespace's keys, these leases with them, go after the test


def test_each_lane_and_the_busiest_keys_have_their_series(make_fleet: MakeFleet) -> None:
    """Per lane: in flight, waiting, what it may hold and is owed; per key: only the
    busiest (``METRIC_KEYS``), so a million keys never make a million series."""
    from celery_fleet.observability.metrics import METRIC_KEYS

    lanes = {"interactive": {"priority": 0, "reserve": 0.25}, "batch": {"priority": 1}}
    fleet = make_fleet({"m": {"max_in_flight": 16, "weights": {}, "lanes": lanes}})
    held = [fleet.try_acquire("m", key=f"t{i:02}", lane="batch") for i in range(12)]
    held += [fleet.try_acquire("m", key="t00", lane="interactive") for _ in range(3)]
    assert all(held)
    waiter = fleet.admission.new_ticket("m", "t01", "batch")
    refused = fleet.admission.try_acquire("m", lease_id=waiter, join=True)
    assert not refused  # batch holds its share, floor(16 x 0.75) = 12: it waits
    got = scrape(fleet)
    lane = 'lane="{}",limit="m"'
    assert got[f"fleet_lane_in_flight{{{lane.format('interactive')}}}"] == 3
    assert got[f"fleet_lane_in_flight{{{lane.format('batch')}}}"] == 12
    assert got[f"fleet_lane_waiting{{{lane.format('batch')}}}"] == 1
    assert got[f"fleet_lane_waiting{{{lane.format('interactive')}}}"] == 0
    assert got[f"fleet_lane_in_flight_cap{{{lane.format('interactive')}}}"] == 16
    assert got[f"fleet_lane_in_flight_cap{{{lane.format('batch')}}}"] == 12
    assert got[f"fleet_lane_owed{{{lane.format('batch')}}}"] == 12  # what the reserve leaves
    assert got[f"fleet_lane_owed{{{lane.format('interactive')}}}"] == 0
    assert got[f"fleet_lane_share{{{lane.format('batch')}}}"] == 0.75
    assert got[f"fleet_lane_guarantee{{{lane.format('batch')}}}"] == 0.75
    keys = {k: v for k, v in got.items() if k.startswith("fleet_key_in_flight{")}
    assert len(keys) == METRIC_KEYS < 12  # 12 keys hold slots: only the busiest exported
    assert keys['fleet_key_in_flight{key="t00",limit="m"}'] == 4  # the busiest
    assert got['fleet_key_in_flight{key="t01",limit="m"}'] == 1
    assert got['fleet_key_waiting{key="t01",limit="m"}'] == 1
    assert len([k for k in got if k.startswith("fleet_key_waiting{")]) == METRIC_KEYS
