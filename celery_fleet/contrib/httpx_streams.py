"""The streamed half of the httpx transports: a slot held until a response stream ends.

:class:`HeldSlot` ends a slot once (settle, then release) whoever gets there first: the
stream's last byte, the caller's close, a broken connection, or the garbage collector
when nobody closed it. :class:`MeteredStream` and :class:`AsyncMeteredStream` pass a
response's bytes through unchanged, feeding them to a
:class:`~celery_fleet.contrib.stream_usage.UsageMeter` on the way. They are mixins: the
public transports (:mod:`celery_fleet.httpx`, :mod:`celery_fleet.httpx2`) combine them
with their library's ``SyncByteStream`` / ``AsyncByteStream``, which the clients check for.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

from ..admission.aslot import AsyncSlot, _shielded
from ..admission.providers import OK, Signal
from ..admission.slot import Slot
from ..errors import FleetError
from .stream_usage import UsageMeter

__all__ = ["ABANDONED", "AsyncMeteredStream", "HeldSlot", "MeteredStream"]

log = logging.getLogger("celery_fleet")

#: What leaving a stream unfinished tells the fleet: nothing about the provider.
ABANDONED = Signal("other", detail="the response stream was closed before its end")


def warn(what: str, limit: str, error: Exception) -> None:
    log.warning("celery-fleet: %s for %r failed (%s)", what, limit, error)


class HeldSlot:
    """One slot's end, which happens once. Thread-safe: a close may race the last read."""

    def __init__(self, slot: Slot, settles: bool) -> None:
        self.slot = slot
        self.settles = settles  # the limit has a token budget to settle
        self._lock = threading.Lock()
        self._ended = False

    def claim(self) -> bool:
        """True once: the caller is the one that ends the slot."""
        with self._lock:
            ended, self._ended = self._ended, True
            return not ended

    def end(self, signal: Signal, tokens: int | None) -> None:
        """Settle to ``tokens`` (when known) and release with ``signal``, once."""
        if not self.claim():
            return
        if tokens is not None and self.settles:
            try:
                self.slot.settle(tokens)
            except FleetError as exc:
                warn("settling", self.slot.limit, exc)
        try:
            self.slot.release(signal)
        except FleetError as exc:
            warn("releasing", self.slot.limit, exc)

    async def aend(self, aslot: AsyncSlot, signal: Signal, tokens: int | None) -> None:
        """:meth:`end` through ``aslot`` (the async slot over :attr:`slot`): awaited, and
        run to its end even when the task is cancelled meanwhile."""
        if self.claim():
            await _shielded(self._aend(aslot, signal, tokens))

    async def _aend(self, aslot: AsyncSlot, signal: Signal, tokens: int | None) -> None:
        if tokens is not None and self.settles:
            try:
                await aslot.settle(tokens)
            except FleetError as exc:
                warn("settling", aslot.limit, exc)
        try:
            await aslot.release(signal)
        except FleetError as exc:
            warn("releasing", aslot.limit, exc)

    def collected(self) -> None:
        """The stream was collected: release the slot if nobody closed the stream."""
        if not self._ended:
            log.warning(
                "celery-fleet: a streamed response of %r was never closed; its slot is "
                "released now that it is collected (close streams: `with ...` or .close())",
                self.slot.limit,
            )
        self.end(ABANDONED, None)


def _closing_signal(meter: UsageMeter) -> tuple[Signal, int | None]:
    """What a close tells the fleet: a stream that said it was complete ([DONE],
    message_stop) settles to its usage; one left midway keeps its reservation."""
    if meter.ended:
        meter.finish()
        return meter.signal or OK, meter.tokens
    return ABANDONED, None


class MeteredStream:
    """A response stream passed through unchanged and metered; its end ends the slot."""

    def __init__(self, inner: Iterable[bytes], meter: UsageMeter, held: HeldSlot) -> None:
        self._inner, self._meter, self._held = inner, meter, held
        # Not at interpreter exit: the lease expires by itself then, no Redis call needed.
        weakref.finalize(self, held.collected).atexit = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._meter.feed(chunk)
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._held.end(self._held.slot.exit_signal(exc), None)
            raise
        self._meter.finish()
        self._held.end(self._meter.signal or OK, self._meter.tokens)

    def close(self) -> None:
        try:
            close: Any = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._held.end(*_closing_signal(self._meter))


class AsyncMeteredStream:
    """:class:`MeteredStream` for the async transports."""

    def __init__(
        self, inner: AsyncIterable[bytes], meter: UsageMeter, held: HeldSlot, aslot: AsyncSlot
    ) -> None:
        self._inner, self._meter, self._held, self._aslot = inner, meter, held, aslot
        # Not at interpreter exit: the lease expires by itself then, no Redis call needed.
        weakref.finalize(self, held.collected).atexit = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self._meter.feed(chunk)
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            await self._held.aend(self._aslot, self._held.slot.exit_signal(exc), None)
            raise
        self._meter.finish()
        await self._held.aend(self._aslot, self._meter.signal or OK, self._meter.tokens)

    async def aclose(self) -> None:
        try:
            aclose: Any = getattr(self._inner, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await self._held.aend(self._aslot, *_closing_signal(self._meter))
