"""``fleet.aslot``: coroutines share the limits without ever blocking the event loop.

Real Redis; each test runs its own loop with ``asyncio.run``. The cap is checked by a
counter of the test's own, the loop's freedom by a heartbeat coroutine that measures how
late its 5 ms sleeps wake.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
import redis

from celery_fleet import ConfigError, Fleet, Throttled
from celery_fleet.testing import ProviderSim

MakeFleet = Callable[..., Fleet]


def run(fleet: Fleet, coro: Any) -> Any:
    """``asyncio.run`` that closes the fleet's connections of that loop before it ends."""

    async def main() -> Any:
        try:
            return await coro
        finally:
            await fleet.aclose()

    return asyncio.run(main())


class Heartbeat:
    """Sleeps 5 ms at a time and records how late each wake-up was: a blocked loop shows."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            self.lags.append(time.perf_counter() - before - 0.005)

    @property
    def beats(self) -> int:
        return len(self.lags)

    @property
    def worst_s(self) -> float:
        return max(self.lags)

    @property
    def p99_s(self) -> float:
        return sorted(self.lags)[int(len(self.lags) * 0.99)]


def test_two_hundred_coroutines_hold_the_cap_and_the_rate_and_the_loop_stays_free(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet(
        {"llm": {"max_in_flight": 5, "requests": "50/second", "burst": 0.1}}, max_wait=60
    )
    inside, most, starts = [0], [0], []

    async def agent() -> None:
        async with fleet.aslot("llm") as slot:
            assert slot.lease_id
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            starts.append(time.monotonic())
            await asyncio.sleep(0.01)
            inside[0] -= 1

    async def main() -> Heartbeat:
        async with fleet.aslot("llm"):  # first use: the loop's client, wire, threads
            pass
        await asyncio.sleep(0.2)
        starts.clear()
        beat = Heartbeat()
        ticking = asyncio.create_task(beat.run())
        await asyncio.gather(*(agent() for _ in range(200)))
        beat.stop = True
        await ticking
        return beat

    t0 = time.monotonic()
    beat = run(fleet, main())
    took = time.monotonic() - t0
    assert most[0] == 5  # the cap, never more (and reached)
    assert len(starts) == 200
    # 50/s with a burst of 5: 200 calls cannot take less than (200 - 5) / 50 s
    assert took >= (200 - 5) / 50 - 0.2, took
    rate = (len(starts) - 5) / (max(starts) - min(starts))
    assert rate <= 50 * 1.1, rate
    # Never blocked by a wait: a coroutine that waited in line by blocking the thread
    # (a sync ask, a BLPOP for its wake-up) would stall every other one for up to its
    # whole wait, seconds here. The bounds only tell a stalled loop from a busy one: a
    # loaded 2-core box delays 5 ms sleeps by tens of ms (an idle one by well under 10).
    # How late the loop runs is a figure of benchmarks/aio.py, not asserted here.
    assert beat.beats > 100, beat.beats
    assert beat.p99_s < 0.25 and beat.worst_s < 1.0, (beat.p99_s, beat.worst_s)


def test_cancelling_a_waiting_or_holding_coroutine_gives_everything_back(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 1}}, max_wait=60)
    held = asyncio.Event()

    async def holder() -> None:
        async with fleet.aslot("tool"):
            held.set()
            await asyncio.sleep(60)

    async def waiter() -> None:
        async with fleet.aslot("tool", max_wait=math.inf):
            raise AssertionError("admitted while the holder holds")

    async def main() -> None:
        holding = asyncio.create_task(holder())
        await held.wait()
        waiting = [asyncio.create_task(waiter()) for _ in range(3)]
        for _ in range(100):  # all three in line
            await asyncio.sleep(0.02)
            if len(fleet.line("tool")) == 3:
                break
        assert len(fleet.line("tool")) == 3
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert fleet.line("tool") == []  # the waiters left the line
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)
        assert fleet.admission.in_flight("tool") == 0  # the holder released
        async with fleet.aslot("tool", max_wait=0):  # and the slot is free at once
            pass

    run(fleet, main())


def test_an_ask_cancelled_in_flight_does_not_keep_a_slot(make_fleet: MakeFleet) -> None:
    """The cancel lands while the admitting reply is on its way: the lease it granted is
    found by its id and released."""
    fleet = make_fleet({"tool": {"max_in_flight": 1}}, max_wait=60)

    async def main() -> None:
        for _ in range(30):
            task = asyncio.create_task(fleet.aslot("tool").acquire())
            await asyncio.sleep(0)  # the ask is sent, its reply not yet read
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if task.cancelled():
                assert fleet.admission.in_flight("tool") == 0
            else:
                await task.result().release()
        async with fleet.aslot("tool", max_wait=0):
            pass

    run(fleet, main())


def test_a_thousand_waiters_hold_a_bounded_number_of_connections(
    make_fleet: MakeFleet, rclient: redis.Redis
) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 1}}, max_wait=60)

    def connected() -> int:
        return int(rclient.info("clients")["connected_clients"])

    async def main() -> int:
        gate = await fleet.atry_acquire("tool")  # held: everybody waits
        assert gate
        before = connected()
        waiting = [asyncio.create_task(_hold(fleet)) for _ in range(1000)]
        for _ in range(200):
            await asyncio.sleep(0.05)
            if len(fleet.line("tool")) == 1000:
                break
        assert len(fleet.line("tool")) == 1000
        during = connected()
        await fleet.arelease(gate)
        await asyncio.gather(*waiting)
        return during - before

    added = run(fleet, main())
    assert added <= 10, added  # the listener's one, not one per waiter


async def _hold(fleet: Fleet) -> None:
    async with fleet.aslot("tool", max_wait=math.inf):
        await asyncio.sleep(0)


def test_the_real_async_openai_client_against_the_simulator(make_fleet: MakeFleet) -> None:
    sim = ProviderSim(rpm=600, tpm=None, max_in_flight=4, latency=0.05, burst_s=1.0).start()
    try:
        fleet = make_fleet({"sim": {"max_in_flight": 4, "rpm": 600, "burst": 5 / 600}}, max_wait=60)

        async def main() -> list[int]:
            async with openai.AsyncOpenAI(
                base_url=sim.base_url, api_key="x", max_retries=0
            ) as client:

                async def agent(i: int) -> int:
                    async with fleet.aslot("sim"):
                        resp = await client.chat.completions.create(
                            model="sim", messages=[{"role": "user", "content": f"q{i}"}]
                        )
                        assert resp.usage is not None
                        return resp.usage.total_tokens

                return await asyncio.gather(*(agent(i) for i in range(60)))

        tokens = run(fleet, main())
        stats = sim.stats()
        assert len(tokens) == 60 and all(t > 0 for t in tokens)
        assert stats["ok"] == 60 and sum(stats["rate_limited"].values()) == 0, stats
        assert stats["max_in_flight_observed"] <= 4
    finally:
        sim.stop()


def test_a_provider_429_inside_aslot_is_throttled_and_pauses_the_limit(
    make_fleet: MakeFleet,
) -> None:
    sim = ProviderSim(rpm=6, tpm=None, burst_s=10, latency=0.0).start()  # capacity 1
    try:
        fleet = make_fleet({"sim": {"rpm": 600}}, max_wait=0)

        async def call(client: openai.AsyncOpenAI) -> None:
            async with fleet.aslot("sim"):
                await client.chat.completions.create(
                    model="sim", messages=[{"role": "user", "content": "x"}]
                )

        async def main() -> None:
            async with openai.AsyncOpenAI(
                base_url=sim.base_url, api_key="x", max_retries=0
            ) as client:
                await call(client)
                with pytest.raises(Throttled) as info:
                    await call(client)
                assert "429" in info.value.reason
                with pytest.raises(Throttled) as paused:  # paused fleet-wide, not asked
                    await call(client)
                assert paused.value.reason == "paused"

        run(fleet, main())
        assert sim.stats()["requests"] == 2
    finally:
        sim.stop()


def test_aguarded_settle_validate_and_the_checks(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"llm": {"tpm": 60_000, "max_in_flight": 2}})

    @fleet.aguarded("llm", tokens=lambda n: n, usage=lambda r: r["used"])
    async def complete(n: int) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"used": n // 2}

    assert complete.__name__ == "complete"
    assert run(fleet, complete(1000)) == {"used": 500}
    store = fleet.admission.store
    tat = float(store.call("HGET", fleet.admission.keys("llm").ctl, "t:60"))
    now_s, now_us = store.call("TIME")
    ahead_ms = tat - (int(now_s) * 1000 + int(now_us) / 1000)
    # 60,000 tokens/min is 1 ms a token: 1,000 reserved then settled to 500 leaves the
    # window 500 ms ahead of a full bucket's now (1,000 ms had it not been settled)
    assert 400 < ahead_ms <= 500, ahead_ms
    with pytest.raises(ConfigError, match="coroutine"):
        fleet.aguarded("llm")(lambda: None)
    with pytest.raises(ConfigError, match="unknown limit"):
        fleet.aguarded("nope")


def test_atry_acquire_and_arelease(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"tool": {"max_in_flight": 1}})

    async def main() -> None:
        first = await fleet.atry_acquire("tool")
        second = await fleet.atry_acquire("tool")
        assert first and not second and second.reason == "in_flight"
        released = await fleet.arelease(first)
        assert released.released
        assert await fleet.atry_acquire("tool")

    run(fleet, main())


def test_run_async_keeps_one_loop_per_thread_and_refuses_a_running_loop() -> None:
    from celery_fleet import FleetError
    from celery_fleet.celery.loops import run_async

    async def loop_id() -> int:
        return id(asyncio.get_running_loop())

    assert run_async(loop_id()) == run_async(loop_id())  # one loop, kept
    other: list[int] = []
    import threading

    t = threading.Thread(target=lambda: other.append(run_async(loop_id())))
    t.start()
    t.join()
    assert other and other[0] != run_async(loop_id())  # each thread its own

    async def nested() -> None:
        run_async(loop_id())

    with pytest.raises(FleetError, match="await"):
        asyncio.run(nested())


def test_an_async_fleet_task_body_is_awaited_on_the_thread_loop(make_fleet: MakeFleet) -> None:
    from celery import Celery

    from celery_fleet import fleet_task

    app = Celery("async_unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    fleet = make_fleet({"tool": {"max_in_flight": 1}})
    app.conf.fleet_redis_url = fleet.redis_url
    app.conf.fleet_namespace = fleet.namespace
    app.conf.fleet_limits = {"tool": {"max_in_flight": 1}}

    @fleet_task(app=app, shared=False)
    async def agent(x: int) -> int:
        async with Fleet.for_app(app).aslot("tool"):
            await asyncio.sleep(0)
        return x * 2

    assert agent.__name__ == "agent"
    assert agent(21) == 42  # called directly
    assert agent.apply(args=(5,)).get() == 10  # run as a task (eager)


def test_an_async_body_interrupted_from_outside_does_not_stay_on_the_loop() -> None:
    from celery_fleet.celery.loops import run_async, thread_loop

    cleaned: list[str] = []

    async def agent() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append("released")

    def interrupt() -> None:
        raise KeyboardInterrupt  # as a soft time limit's signal handler would

    thread_loop().call_later(0.05, interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_async(agent())
    assert cleaned == ["released"]  # cancelled and finished, not left pending
    assert not asyncio.all_tasks(thread_loop())


def test_aslot_on_a_cluster_url_says_to_use_the_blocking_api() -> None:
    fleet = Fleet(redis_url="redis+cluster://127.0.0.1:1", limits={"llm": {"rpm": 60}})
    with pytest.raises(ConfigError, match="asyncio.to_thread"):
        fleet.aslot("llm")
