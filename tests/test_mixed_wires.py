"""A release a blocking slot holds for the process's next call comes before a call of the
same process on an asyncio loop's wire (the LiteLLM router test met it: a freed slot of a
cap of 1 refused to the next async ask, within the flusher's 1 ms)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from celery_fleet import Fleet

MakeFleet = Callable[..., Fleet]


def test_an_async_ask_comes_after_a_release_held_by_a_blocking_slot(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({"sim": {"max_in_flight": 1}}, max_wait=0)
    with fleet.slot("sim"):
        pass  # the first release of a process is written at once (scripts not yet seen)
    fleet.store.combiner.flush_s = 60.0  # only a later call writes a held release
    holder = fleet.slot("sim").acquire()
    holder.release()  # held for the next call of this process

    async def main() -> bool:
        try:
            async with fleet.aslot("sim") as slot:
                return slot.lease_id is not None
        finally:
            await fleet.aclose()

    assert asyncio.run(main())
    assert fleet.admission.in_flight("sim") == 0
