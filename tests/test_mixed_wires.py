"""A release a blocking slot holds for the process's next call comes before a call of the
same process on an asyncio loop's wire (the LiteLLM router test met it: a freed slot of a
cap of 1 refused to the next async ask, within the flusher's 1 ms)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from celery_fleet import Fleet

MakeFleet = Callable[..., Fleet]


async def _admitted_async(fleet: Fleet, limit: str) -> bool:
    """Whether an ``aslot`` of ``limit`` (max_wait 0) is admitted, in a loop of its own."""
    try:
        async with fleet.aslot(limit) as slot:
            return slot.lease_id is not None
    finally:
        await fleet.aclose()


def test_an_async_ask_comes_after_a_release_held_by_a_blocking_slot(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"sim": {"max_in_flight": 1}}, max_wait=0)
    with fleet.slot("sim"):
        pass  # the first release of a process is written at once (scripts not yet seen)
    fleet.store.combiner.flush_s = 60.0  # only a later call writes a held release
    holder = fleet.slot("sim").acquire()
    holder.release()  # held for the next call of this process

    assert asyncio.run(_admitted_async(fleet, "sim"))
    assert fleet.admission.in_flight("sim") == 0


def test_an_async_ask_waits_for_a_release_another_thread_holds_the_wire_over(
    make_fleet: MakeFleet,
) -> None:
    """Writing the held release is not enough when another thread is on the blocking wire
    (it carries the release later, after the async ask ran): the async call drains first."""
    fleet = make_fleet({"sim": {"max_in_flight": 1}}, max_wait=0)
    with fleet.slot("sim"):
        pass
    fleet.release(fleet.try_acquire("sim"))  # release.lua seen too: any release may be held
    combiner = fleet.store.combiner
    combiner.flush_s = 60.0
    holder = fleet.slot("sim").acquire()
    real = combiner._round_trip
    on_wire = threading.Event()

    def slow(batch: list[Any], answered: list[Any]) -> Any:
        on_wire.set()
        time.sleep(0.3)  # another thread's round trip, on the wire a while
        return real(batch, answered)

    combiner._round_trip = slow  # type: ignore[method-assign]
    other = threading.Thread(target=fleet.admission.in_flight, args=("sim",))
    other.start()
    assert on_wire.wait(5)
    combiner._round_trip = real  # type: ignore[method-assign]
    holder.release()  # held: the wire is busy, its carrier took its batch already

    assert asyncio.run(_admitted_async(fleet, "sim"))
    other.join(5)
    assert fleet.admission.in_flight("sim") == 0
