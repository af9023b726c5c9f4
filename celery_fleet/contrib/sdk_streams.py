"""Streams of a wrapped client: the slot is held until the stream ends, then settled and released.

``create(..., stream=True)`` returns a :class:`SlotStream` (or :class:`AsyncSlotStream`)
over the SDK's stream: iterating it yields the SDK's own events, while it adds up the
usage they report (OpenAI's last chunk with ``stream_options={"include_usage": True}``,
a Responses ``response.completed`` event, Anthropic's ``message_start`` and
``message_delta``). The slot is settled and released exactly once: when the stream is
exhausted, closed, left (``with``), when reading it fails (classified like any call: a
mid-stream ``overloaded_error`` is an overload), or, as a last resort, when it is garbage
collected unread. Anthropic's ``messages.stream(...)`` manager is wrapped by
:class:`StreamManager`: the slot is taken on entering and given back on leaving, settled to
the message snapshot's usage.

On a limit with ``quality``, a stream that ended (its last event read, or a manager left
after its ``message_stop``) is judged on the answer its events add up to
(:class:`~celery_fleet.contrib.answers.StreamAnswer`; the manager's own message
snapshot), the verdict riding on the release. A stream closed, left or broken before its
end is not judged: what was read of it is not the answer.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .answers import StreamAnswer, ajudge_quietly, judge_quietly
from .sdk import Policy, aobserve, asettle, observe, settle
from .usage import CumulativeUsage, usage_tokens

if TYPE_CHECKING:
    from ..admission.aslot import AsyncSlot
    from ..admission.slot import Slot

__all__ = [
    "UsageTally",
    "SlotStream",
    "AsyncSlotStream",
    "StreamManager",
    "AsyncStreamManager",
    "exit_slot",
]

log = logging.getLogger("celery_fleet")

#: A stream's answer being assembled, and the call's body (what was asked).
Judged = tuple[StreamAnswer, dict[str, Any]]


def exit_slot(slot: Slot, exc: BaseException | None) -> None:
    """Leave ``slot`` as a ``with`` block would with ``exc``: release it, reporting how the
    call ended; raises ``Throttled`` (from ``exc``) on a 429 or an overload."""
    slot.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)


def _abandon(slot: Slot) -> None:
    """Release the slot of a stream dropped unread (from a finalizer: never raise)."""
    try:
        slot.release()
    except Exception:  # the lease expires by itself
        log.warning("celery-fleet: could not release an abandoned stream's slot", exc_info=True)


class UsageTally:
    """The tokens a stream's events report so far (``used``; None until one reports)."""

    def __init__(self) -> None:
        self.used: int | None = None
        self._message = CumulativeUsage()  # Anthropic's, merged across events

    @property
    def usage(self) -> dict[str, int] | None:
        """The tally as a usage mapping, for settling (None when nothing was reported)."""
        return None if self.used is None else {"total_tokens": self.used}

    def see(self, event: Any) -> None:
        """Read one event (an SDK object) for usage."""
        kind = getattr(event, "type", None)
        if kind == "message_start":  # Anthropic: the input, counted up front
            self.used = self._message.merge(getattr(getattr(event, "message", None), "usage", None))
        elif kind == "message_delta":  # Anthropic: output so far (cumulative)
            self.used = self._message.merge(getattr(event, "usage", None))
        elif isinstance(kind, str) and kind.startswith("response."):  # OpenAI Responses
            used = usage_tokens(getattr(getattr(event, "response", None), "usage", None))
            self.used = used if used is not None else self.used
        else:  # OpenAI chat / completions chunks: the last one carries usage
            used = usage_tokens(getattr(event, "usage", None))
            self.used = used if used is not None else self.used


class SlotStream:
    """An SDK stream holding its slot until it ends (see the module docstring); every
    other attribute (``response``, ...) is the SDK stream's."""

    def __init__(
        self, inner: Any, slot: Slot, policy: Policy, judged: Judged | None = None
    ) -> None:
        self._inner = inner
        self._events = iter(inner)
        self._slot = slot
        self._policy = policy
        self._tally = UsageTally()
        self._judged = judged
        self._done = False
        self._finalizer = weakref.finalize(self, _abandon, slot)

    def __iter__(self) -> SlotStream:
        return self

    def __next__(self) -> Any:
        try:
            event = next(self._events)
        except StopIteration:
            self._finish(None)
            raise
        except BaseException as exc:
            self._finish(exc)
            raise
        self._tally.see(event)
        if self._judged is not None:
            self._judged[0].see(event)
        return event

    def _finish(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self._finalizer.detach()
        try:
            settle(self._slot, self._policy, self._tally.usage)
            if exc is None and self._judged is not None and self._judged[0].ended:
                judge_quietly(self._slot, self._judged[0].answer(), self._judged[1])
        finally:
            exit_slot(self._slot, exc)

    def close(self) -> None:
        """Close the SDK stream (the connection) and give the slot back."""
        try:
            self._inner.close()
        finally:
            self._finish(None)

    def __enter__(self) -> SlotStream:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            self._inner.close()
        finally:
            self._finish(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class AsyncSlotStream:
    """:class:`SlotStream` for an async SDK stream (``async for``, ``await close()``)."""

    def __init__(
        self, inner: Any, slot: AsyncSlot, policy: Policy, judged: Judged | None = None
    ) -> None:
        self._inner = inner
        self._events = inner.__aiter__()
        self._slot = slot
        self._policy = policy
        self._tally = UsageTally()
        self._judged = judged
        self._done = False
        self._finalizer = weakref.finalize(self, _abandon, slot.slot)

    def __aiter__(self) -> AsyncSlotStream:
        return self

    async def __anext__(self) -> Any:
        try:
            event = await self._events.__anext__()
        except StopAsyncIteration:
            await self._finish(None)
            raise
        except BaseException as exc:
            await self._finish(exc)
            raise
        self._tally.see(event)
        if self._judged is not None:
            self._judged[0].see(event)
        return event

    async def _finish(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self._finalizer.detach()
        try:
            await asettle(self._slot, self._policy, self._tally.usage)
            if exc is None and self._judged is not None and self._judged[0].ended:
                await ajudge_quietly(self._slot, self._judged[0].answer(), self._judged[1])
        finally:
            await self._slot.__aexit__(type(exc) if exc else None, exc, None)

    async def close(self) -> None:
        """Close the SDK stream (the connection) and give the slot back."""
        try:
            await self._inner.close()
        finally:
            await self._finish(None)

    async def __aenter__(self) -> AsyncSlotStream:
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            await self._inner.close()
        finally:
            await self._finish(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _snapshot_usage(stream: Any) -> Any:
    """The usage of an Anthropic ``MessageStream``'s message so far (None before its start)."""
    try:
        return stream.current_message_snapshot.usage
    except Exception:  # no message_start read yet: nothing reported
        return None


def _ended_message(stream: Any) -> Any:
    """An Anthropic ``MessageStream``'s message once it has ended (a stop reason), or None."""
    try:
        message = stream.current_message_snapshot
    except Exception:
        return None
    return message if getattr(message, "stop_reason", None) is not None else None


class StreamManager:
    """Anthropic's ``client.messages.stream(...)`` manager, holding a slot while entered."""

    def __init__(
        self,
        policy: Policy,
        reserve: int,
        open_manager: Callable[[], Any],
        request: dict[str, Any] | None = None,
    ) -> None:
        self._policy = policy
        self._reserve = reserve
        self._open = open_manager
        self._request = request  # the call's body, when its answer is judged
        self._slot: Slot | None = None
        self._manager: Any = None
        self._stream: Any = None

    def __enter__(self) -> Any:
        slot = self._slot = self._policy.slot(self._reserve).acquire()
        try:
            self._manager = self._open()
            self._stream = self._manager.__enter__()
            observe(slot, self._stream.response.headers)
        except BaseException as exc:
            exit_slot(slot, exc)
            raise
        return self._stream

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._slot is not None
        try:
            settle(self._slot, self._policy, _snapshot_usage(self._stream))
            message = _ended_message(self._stream) if self._request is not None else None
            if exc is None and message is not None:
                judge_quietly(self._slot, message, self._request)
            self._manager.__exit__(exc_type, exc, tb)
        finally:
            exit_slot(self._slot, exc)


class AsyncStreamManager:
    """:class:`StreamManager` for ``AsyncAnthropic`` (``async with``)."""

    def __init__(
        self,
        policy: Policy,
        reserve: int,
        open_manager: Callable[[], Any],
        request: dict[str, Any] | None = None,
    ) -> None:
        self._policy = policy
        self._reserve = reserve
        self._open = open_manager
        self._request = request
        self._slot: AsyncSlot | None = None
        self._manager: Any = None
        self._stream: Any = None

    async def __aenter__(self) -> Any:
        slot = self._slot = await self._policy.aslot(self._reserve).acquire()
        try:
            self._manager = self._open()
            self._stream = await self._manager.__aenter__()
            await aobserve(slot, self._stream.response.headers)
        except BaseException as exc:
            await slot.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self._stream

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._slot is not None
        try:
            await asettle(self._slot, self._policy, _snapshot_usage(self._stream))
            message = _ended_message(self._stream) if self._request is not None else None
            if exc is None and message is not None:
                await ajudge_quietly(self._slot, message, self._request)
            await self._manager.__aexit__(exc_type, exc, tb)
        finally:
            await self._slot.__aexit__(exc_type, exc, tb)
