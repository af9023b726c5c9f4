"""Local time for waits and leases, injectable so that tests of them are deterministic.

Every part that waits or dates a lease in Python (the slots and their lease keeper, locks,
leader election) takes a :class:`Clock`; the real one is :class:`SystemClock`. A test
passes a fake clock whose ``monotonic()`` it moves by hand. Ordering across processes never
uses this clock: the scripts read Redis ``TIME``.

Example::

    class FakeClock:
        now = 0.0
        def monotonic(self) -> float: return self.now
        def sleep(self, seconds: float) -> None: self.now += seconds

    lock = Lock(store, "ns", "job", ttl_s=5, clock=FakeClock())
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """Local time for waits: monotonic seconds and sleep."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``time.monotonic`` and ``time.sleep`` themselves (no method of ours
    around them: a slot reads the clock five times)."""

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)
