"""Deferred messages in Redis: due order, one taker per item, claims that lapse, and the
encoding the pump publishes from (real Redis; several processes take at once)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from celery_fleet import ConfigError, Fleet
from celery_fleet.deferred import Deferred
from celery_fleet.reschedule import decode, encode
from celery_fleet.store import RedisStore

MakeFleet = Callable[..., Fleet]


def test_only_due_items_are_taken_oldest_first(make_fleet: MakeFleet) -> None:
    d = make_fleet({"llm": {"rpm": 60}}).deferred
    d.add("late", 5.0, b"L")
    d.add("b", 0.0, b"B")
    d.add("a", 0.0, b"A")
    time.sleep(0.01)
    taken = d.take(10)
    assert sorted(taken) == [("a", b"A"), ("b", b"B")]
    assert d.pending() == 1 and d.take(10) == []
    assert d.ack([i for i, _ in taken]) == 2
    assert d.due_in_ms("late") is not None and d.due_in_ms("a") is None


def test_an_unacknowledged_claim_lapses_and_the_item_is_due_again(make_fleet: MakeFleet) -> None:
    d = make_fleet({"llm": {"rpm": 60}}).deferred
    d.add("x", 0.0, b"X")
    assert d.take(10, claim_s=0.2) == [("x", b"X")]
    assert d.take(10) == []  # claimed
    time.sleep(0.3)  # the publisher died: its claim lapses
    assert d.take(10) == [("x", b"X")]
    assert d.ack(["x"]) == 1 and d.take(10) == [] and d.pending() == 0


def _take_all(url: str, namespace: str, out: Any, ready: Any, go: Any) -> None:
    d = Deferred(RedisStore(url), namespace)
    d.pending()  # connected
    ready.put(1)
    go.wait(30)
    got: list[str] = []
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 1.0:
        batch = d.take(7)
        if batch:
            idle_since = time.monotonic()
            got += [i for i, _ in batch]
            d.ack([i for i, _ in batch])
    out.put(got)


def test_four_processes_taking_at_once_get_each_item_exactly_once(
    redis_url: str, namespace: str
) -> None:
    d = Deferred(RedisStore(redis_url), namespace)
    ctx = multiprocessing.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    args = (redis_url, namespace, out, ready, go)
    procs = [ctx.Process(target=_take_all, args=args) for _ in range(4)]
    for i in range(1000):
        d.add(f"item-{i}", 0.0, b"m")
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    go.set()
    taken = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    flat = [i for got in taken for i in got]
    assert sorted(flat) == sorted(f"item-{i}" for i in range(1000))  # each exactly once
    assert sum(1 for got in taken if got) >= 2  # they really competed


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_a_signature_survives_the_encoding_with_the_app_s_serializer(serializer: str) -> None:
    app = Celery("enc", set_as_current=False)
    app.conf.task_serializer = serializer
    app.conf.accept_content = ["json", "pickle"]
    sig = app.signature(
        "proj.agent",
        args=(1, "two", [3.0]),
        kwargs={"k": {"nested": True}},
        task_id="abc",
        headers={"fleet": {"reschedules": 2}},
        queue="agents",
    )
    back = decode(app, encode(app, sig))
    assert list(back.args) == list(sig.args)  # json makes the tuple a list, as a broker does
    assert {**dict(back), "args": None} == {**dict(sig), "args": None}


@pytest.mark.parametrize("setting, value", [("fleet_defer", "later"), ("fleet_pump_period", 0),
                                            ("fleet_pump_period", 10**15), ("fleet_pump_lease", -1),
                                            ("fleet_pump_lease", "5"),
                                            ("fleet_pump_lease", float("nan"))])  # fmt: skip
def test_bad_defer_settings_are_config_errors(setting: str, value: object) -> None:
    app = Celery("enc", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf[setting] = value
    with pytest.raises(ConfigError, match=setting):
        Fleet(app, limits={"llm": {"rpm": 60}})
