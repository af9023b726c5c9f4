"""Deferred messages in Redis: due order, one taker per item, claims that lapse, and the
encoding the pump publishes from (real Redis; several processes take at once)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from celery_fleet import ConfigError, Fleet
from celery_fleet.celery.reschedule import decode, encode
from celery_fleet.durability.deferred import Deferred
from celery_fleet.store.sync import RedisStore

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


def _pump_app(redis_url: str, namespace: str) -> Celery:
    app = Celery("forge", broker=redis_url, set_as_current=False)
    app.conf.update(
        fleet_namespace=namespace,
        fleet_limits={"llm": {"rpm": 60}},
        task_default_queue=f"{namespace}-q",
        fleet_defer_signing_key="k" * 32,
    )
    return app


def _forge(fleet: Fleet, item: str, message: bytes) -> None:
    """What anyone who can write to the fleet's Redis can do: add an item by hand."""
    d = fleet.deferred
    fleet.store.call("HSET", d.items_key, item, message)
    fleet.store.call("ZADD", d.due_key, 0, item)


def test_a_forged_item_is_never_published_and_dropped_at_once(
    redis_url: str, namespace: str, rclient: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who could write to the fleet's Redis made the pump publish any task with any
    arguments; now an item without the fleet's signature is dropped with an error."""
    from celery_fleet.celery.pump import Pump

    app = _pump_app(redis_url, namespace)
    fleet = Fleet(app)
    queue = f"{namespace}-q"
    evil = encode(app, app.signature("proj.delete_everything", args=("/",), queue=queue))
    _forge(fleet, "forged:0", evil)
    _forge(fleet, "resigned:0", fleet.deferred.sign("other-id", evil))  # another item's MAC
    other = Deferred(fleet.store, namespace, b"another key entirely")
    other.add("wrong-key:0", 0.0, evil)
    fleet.deferred.add("genuine:0", 0.0, encode(app, app.signature("proj.ok", queue=queue)))
    time.sleep(0.01)
    pump = Pump(app, fleet)
    with caplog.at_level(logging.ERROR, logger="celery_fleet"):
        assert pump.pump_once() == 1
    published = [json.loads(m)["headers"]["task"] for m in rclient.lrange(queue, 0, -1)]
    assert published == ["proj.ok"]
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert "dropped 3 deferred item(s)" in errors and "forged:0" in errors
    for item in ("forged:0", "resigned:0", "wrong-key:0"):
        assert fleet.deferred.fate(item) == "unknown"  # gone, not claimed for a retry
    assert rclient.hlen(fleet.deferred.items_key) == 0
    assert rclient.zcard(fleet.deferred.taken_key) == 0
    rclient.delete(queue)
    app.close()


def test_an_item_the_broker_refuses_is_dropped_after_one_try(
    redis_url: str, namespace: str, rclient: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused item came back every claim period (30 s) forever."""
    from celery_fleet.celery.pump import Pump

    app = _pump_app(redis_url, namespace)
    fleet = Fleet(app)
    fleet.deferred.add("garbled:0", 0.0, b"not an encoded signature")
    time.sleep(0.01)
    pump = Pump(app, fleet)
    with caplog.at_level(logging.ERROR, logger="celery_fleet"):
        assert pump.pump_once() == 0
    assert "could not publish deferred task garbled:0; dropped it" in caplog.text
    assert fleet.deferred.fate("garbled:0") == "unknown"
    assert rclient.zcard(fleet.deferred.taken_key) == 0  # no claim left to lapse
    assert fleet.deferred.take(10, claim_s=0.05) == []
    app.close()


def test_the_signing_key_setting_is_checked_and_censored() -> None:
    from celery.app.utils import filter_hidden_settings

    app = Celery("key", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.fleet_defer_signing_key = "short"
    with pytest.raises(ConfigError, match="fleet_defer_signing_key"):
        Fleet(app, limits={})
    assert filter_hidden_settings({"fleet_defer_signing_key": "x" * 32}) == {
        "fleet_defer_signing_key": "********"
    }


def test_a_guessable_signing_key_on_a_separate_fleet_redis_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Celery("weak", broker="redis://broker-host:6379/0", set_as_current=False)
    app.conf.fleet_redis_url = "redis://fleet-host:6379/0"
    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        Fleet(app, limits={})
    assert "Set fleet_defer_signing_key" in caplog.text
    caplog.clear()
    app.conf.fleet_defer_signing_key = "s" * 32
    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        Fleet(app, limits={})
    assert "fleet_defer_signing_key" not in caplog.text
    app.close()
