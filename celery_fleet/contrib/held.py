"""Slots held by calls another library starts and ends through callbacks.

An SDK adapter built on callbacks (LiteLLM's ``CustomLogger``, a LangChain callback handler)
takes a slot in one callback and releases it in another, keyed by the library's id of the
call. If the second callback never comes (a cancelled task, a ``BaseException`` raised
past the library's ``except Exception``, a stream never read to its end), the slot would
stay held for as long as the process lives: the fleet's lease keeper renews every held
slot. :class:`HeldCalls` is that map, with a daemon thread that releases what was held
longer than ``max_hold`` seconds, or whose owner said it ended (:meth:`HeldCalls.orphan`).

Example::

    calls = HeldCalls(max_hold_s=900)
    calls.hold(call_id, fleet.slot("openai").acquire())
    ...
    held = calls.take(call_id)
    if held is not None:
        held.blocking.release()
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from ..admission.aslot import AsyncSlot
from ..admission.providers import Signal
from ..admission.slot import Slot
from ..errors import FleetError

__all__ = ["Held", "HeldCalls"]

log = logging.getLogger("celery_fleet")


@dataclass
class Held:
    """One call's slot, from its admission to its release."""

    slot: Slot | AsyncSlot
    since: float  # time.monotonic() at admission
    stream: bool = False
    orphaned: bool = False  # its owner ended without a release

    @property
    def blocking(self) -> Slot:
        """The blocking slot (an :class:`AsyncSlot`'s own), releasable from any thread."""
        return self.slot.slot if isinstance(self.slot, AsyncSlot) else self.slot

    @property
    def limit(self) -> str:
        return self.slot.limit


class HeldCalls:
    """The slots of calls in progress, by call id, released after ``max_hold_s`` at the
    latest (see the module docstring). Thread-safe; the sweeper starts with the first
    :meth:`hold`."""

    def __init__(self, max_hold_s: float, name: str = "celery-fleet-held") -> None:
        self.max_hold_s = max_hold_s
        self.name = name
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()
        self._sweeper: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self._pid = os.getpid()

    def _forked(self) -> None:
        """In a child forked from the process that made this (a prefork worker): the
        parent's calls and sweeper are not this process's; start empty."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._held, self._lock, self._sweeper = {}, threading.Lock(), None
            self._wake = threading.Event()

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    def ids(self) -> list[str]:
        """The ids of the calls holding a slot now."""
        with self._lock:
            return list(self._held)

    def get(self, call_id: str | None) -> Held | None:
        return self._held.get(call_id) if call_id else None

    def hold(self, call_id: str, slot: Slot | AsyncSlot, stream: bool = False) -> None:
        """Remember ``slot`` (held) as the call's; its release is the caller's to make."""
        self._forked()
        with self._lock:
            self._held[call_id] = Held(slot, time.monotonic(), stream)
            if self._sweeper is None and not self._closed:
                self._sweeper = threading.Thread(
                    target=self._sweep_forever, name=self.name, daemon=True
                )
                self._sweeper.start()

    def take(self, call_id: str | None, asyncio_slot: bool) -> Held | None:
        """Forget the call and return its entry, to be released by the caller: only an
        :class:`AsyncSlot` when ``asyncio_slot`` (its release is awaited on its loop),
        only a blocking one otherwise. None when there is nothing to release."""
        if call_id is None:
            return None
        with self._lock:
            held = self._held.get(call_id)
            if held is None or isinstance(held.slot, AsyncSlot) != asyncio_slot:
                return None
            return self._held.pop(call_id)

    def hand_back(self, call_id: str, held: Held) -> None:
        """A taken call whose release did not finish (its task was cancelled, its loop
        ended): the sweeper thread releases it now, without a loop."""
        with self._lock:
            held.orphaned = True
            self._held[call_id] = held
        self._wake.set()

    def orphan(self, call_id: str) -> None:
        """The call's owner ended (its task is done): release its slot now if still held,
        from the sweeper thread (this may run on an event loop, which must not wait)."""
        with self._lock:
            held = self._held.get(call_id)
            if held is None:
                return
            held.orphaned = True
        self._wake.set()

    def sweep(self) -> int:
        """Release the slots held longer than ``max_hold_s`` and those of ended owners;
        returns how many. Run every ``max_hold_s / 4`` (at most 30 s) by the sweeper."""
        deadline = time.monotonic() - self.max_hold_s
        with self._lock:
            stale = [c for c, held in self._held.items() if held.orphaned or held.since <= deadline]
            taken = [self._held.pop(c) for c in stale]
        for call_id, held in zip(stale, taken, strict=True):
            log.warning(
                "celery-fleet: call %s %s without reporting its end: its %r slot is released",
                call_id,
                "ended (cancelled, or its stream let go)"
                if held.orphaned
                else f"was held over {self.max_hold_s:.0f} s",
                held.limit,
            )
            try:
                held.blocking.release(Signal("other"))
            except FleetError as exc:
                log.warning("celery-fleet: releasing %r failed (%s)", held.limit, exc)
        return len(taken)

    def _sweep_forever(self) -> None:
        every = min(max(self.max_hold_s / 4, 0.01), 30.0)
        while not self._closed:
            self._wake.wait(every)
            self._wake.clear()
            try:
                self.sweep()
            except Exception:  # never let the sweeper die: the next round tries again
                log.exception("celery-fleet: sweeping held slots failed")

    def close(self) -> None:
        """Stop the sweeper thread (the slots still held stay held)."""
        self._closed = True
        self._wake.set()
