"""LangChain on a fleet limit: a rate limiter, and a wrapper that holds a slot per model call.

Two pieces, for two strengths:

- :func:`with_fleet` (the full strength): ``with_fleet(ChatOpenAI(...), fleet, "openai")``
  is a Runnable that holds one fleet slot around each call of the model it wraps
  (``invoke``, ``ainvoke``, ``batch``, ``abatch``, ``stream``, ``astream``, and so
  ``astream_events`` and the chains it is part of). The in-flight cap holds fleet-wide; the
  slot reserves the tokens the call may cost (the prompt's characters / 4 plus the model's
  ``max_tokens``, :func:`celery_fleet.contrib.usage.estimate_tokens`) and settles them to
  the usage the provider reported (``AIMessage.usage_metadata``); the SDK's 429 or overload
  raised inside becomes :class:`~celery_fleet.Throttled` and pauses the limit fleet-wide,
  as with ``fleet.slot``. On a limit with ``quality``, the model's message (a stream's,
  once read to its end) is judged, with the model's ``max_tokens`` and bound
  ``response_format``; a Runnable whose output is not a model's message (a chain that
  parses it) is not judged: wrap the model itself.
- :class:`FleetRateLimiter` (the drop-in): ``ChatOpenAI(rate_limiter=FleetRateLimiter(fleet,
  "openai"))`` takes one request of the limit's budget, fleet-wide, before each call. The
  ``BaseRateLimiter`` interface has ``acquire`` and no release, so it can keep rates only:
  it cannot hold a place under ``max_in_flight`` for the length of the call, nor settle
  tokens to real usage.

Why a wrapper and not a callback handler: a handler's ``on_chat_model_start`` could wait
for admission, but LangChain catches and logs a handler's exceptions unless it sets
``raise_error`` (an async handler's on a sync call even then), runs a sync handler of an
async call in the default thread pool (a handful of threads: 40 waiting coroutines would
queue behind them), and gives it no way to turn the SDK's 429 into a fleet-wide pause
before the exception is raised. The wrapper is plain code around the call: the wait, the
release and the classification of what went wrong all happen where the call does, in
threads and in asyncio alike.

Example::

    from langchain_openai import ChatOpenAI
    from celery_fleet.contrib.langchain import FleetRateLimiter, with_fleet

    model = with_fleet(ChatOpenAI(model="gpt-4o-mini", max_tokens=500, max_retries=0),
                       fleet, "openai")
    reply = model.invoke("Summarise the fleet's design")        # waits its turn

    cheap = ChatOpenAI(model="gpt-4o-mini", rate_limiter=FleetRateLimiter(fleet, "openai"))

LangChain is an optional dependency: ``pip install 'celery-fleet[langchain]'``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Protocol, TypeVar

try:
    from langchain_core.rate_limiters import BaseRateLimiter
    from langchain_core.runnables import Runnable, RunnableConfig
except ImportError as exc:  # the [langchain] extra is not installed
    raise ImportError(
        "celery_fleet.contrib.langchain needs langchain-core: "
        "pip install 'celery-fleet[langchain]' (or pip install langchain-core)"
    ) from exc

from ..admission.aslot import AsyncSlot
from ..admission.guarded import ASlotSource, SlotSource
from ..admission.providers import Signal
from ..admission.slot import Slot
from ..checks import check_max_wait
from ..errors import ConfigError, LeaseLost
from .answers import ajudge_quietly, judge_quietly, judges
from .langchain_usage import (
    StreamUsage,
    answer_of,
    estimate_input_tokens,
    reported_usage,
    request_of,
)

__all__ = ["FleetRateLimiter", "FleetRunnable", "with_fleet", "estimate_input_tokens"]

log = logging.getLogger("celery_fleet")

Input = TypeVar("Input")
Output = TypeVar("Output")

#: A release that teaches the breaker and the adaptive cap nothing: no call was made.
_NO_CALL = Signal("other")


class FleetSource(SlotSource, ASlotSource, Protocol):
    """What the adapters need of a :class:`~celery_fleet.Fleet`: its limits, blocking and
    asyncio slots, and ``try_acquire`` / ``release`` (and their awaited forms)."""

    def try_acquire(self, name: str, tokens: int = 0) -> Any: ...

    def release(self, decision: Any, outcome: str = "ok") -> Any: ...

    async def atry_acquire(self, name: str, tokens: int = 0) -> Any: ...

    async def arelease(self, decision: Any, outcome: str = "ok") -> Any: ...


def _check(fleet: FleetSource, limit: str, tokens: int, max_wait: float | None) -> int:
    """Check the adapters' arguments now, naming the bad one; returns ``tokens``."""
    if not hasattr(fleet, "admission") or not callable(getattr(fleet, "slot", None)):
        raise ConfigError(f"expected a celery_fleet.Fleet, got {type(fleet).__name__}")
    tokens = fleet.admission.limit(limit).check_tokens(tokens)  # unknown limit: ConfigError
    if max_wait is not None:
        check_max_wait(max_wait)
    return tokens


class FleetRateLimiter(BaseRateLimiter):
    """LangChain's ``BaseRateLimiter`` on a fleet limit: each ``acquire`` takes one request
    (and ``tokens``, if given) of the limit's budget fleet-wide, across every process.

    ``acquire(blocking=True)`` waits its turn in the limit's line, like ``fleet.slot``,
    then gives the slot back at once: the request stays counted in the rate windows, the
    in-flight count is back where it was. Past ``max_wait`` (default: the fleet's
    ``fleet_max_wait``; :data:`~celery_fleet.FOREVER` to wait without end) it raises
    :class:`~celery_fleet.Throttled`, which a fleet task turns into a reschedule.
    ``acquire(blocking=False)`` asks once and answers ``False`` when refused.

    What it cannot do, because the interface has no release: hold a place under
    ``max_in_flight`` while the call runs (it only waits while the cap is full), settle
    the reservation to the tokens really used, or hear of the provider's 429s. Use
    :func:`with_fleet` for those.

    Example::

        model = ChatOpenAI(model="gpt-4o-mini", rate_limiter=FleetRateLimiter(fleet, "openai"))
    """

    def __init__(
        self,
        fleet: FleetSource,
        limit: str,
        *,
        tokens: int = 0,
        max_wait: float | None = None,
    ) -> None:
        self.tokens = _check(fleet, limit, tokens, max_wait)
        self.fleet = fleet
        self.limit = limit
        self.max_wait = max_wait

    def acquire(self, *, blocking: bool = True) -> bool:
        """Take one request of the limit's budget; see the class docstring."""
        if not blocking:
            decision = self.fleet.try_acquire(self.limit, self.tokens)
            if not decision.allowed:
                return False
            self.fleet.release(decision, _NO_CALL.outcome)
            return True
        slot = self.fleet.slot(self.limit, tokens=self.tokens, max_wait=self.max_wait)
        slot.acquire()
        slot.release(_NO_CALL)
        return True

    async def aacquire(self, *, blocking: bool = True) -> bool:
        """:meth:`acquire` for coroutines: the wait never blocks the event loop."""
        if not blocking:
            decision = await self.fleet.atry_acquire(self.limit, self.tokens)
            if not decision.allowed:
                return False
            await self.fleet.arelease(decision, _NO_CALL.outcome)
            return True
        slot = self.fleet.aslot(self.limit, tokens=self.tokens, max_wait=self.max_wait)
        await slot.acquire()
        await slot.release(_NO_CALL)
        return True

    def __repr__(self) -> str:
        return f"<FleetRateLimiter {self.limit!r} tokens={self.tokens}>"


# -- the wrapper -------------------------------------------------------------------------


class FleetRunnable(Runnable[Input, Output]):
    """A Runnable (a chat model, usually) whose every call holds a slot of a fleet limit;
    made by :func:`with_fleet`, which says what it does.

    Methods it does not define reach the wrapped Runnable; those that return a new
    Runnable (``bind_tools``, ``with_structured_output``) come back wrapped, on the same
    limit: ``with_fleet(model, fleet, "openai").bind_tools([search])`` still holds slots.
    """

    def __init__(
        self,
        runnable: Runnable[Input, Output],
        fleet: FleetSource,
        limit: str,
        *,
        tokens: int | Callable[[Any], int] | None = None,
        max_wait: float | None = None,
    ) -> None:
        if not isinstance(runnable, Runnable):
            raise ConfigError(
                f"with_fleet() wraps a LangChain Runnable (a chat model), got "
                f"{type(runnable).__name__}"
            )
        if tokens is not None and not callable(tokens):
            _check(fleet, limit, tokens, max_wait)
        else:
            _check(fleet, limit, 0, max_wait)
        self.runnable = runnable
        self.fleet = fleet
        self.limit = limit
        self.tokens = tokens
        self.max_wait = max_wait

    # -- what a call reserves and reports --------------------------------------------------

    def reserve(self, value: Any, kwargs: Mapping[str, Any]) -> int:
        """The tokens a call with input ``value`` reserves (``tokens`` if given, else
        :func:`estimate_input_tokens`), checked against the limit."""
        cfg = self.fleet.admission.limit(self.limit)
        if self.tokens is None:
            # A limit without a token budget counts none; an estimate above a full bucket
            # (a long prompt on a small budget) is the most that can ever pass.
            ceiling = cfg.max_tokens_per_call
            if ceiling is None:
                return 0
            return min(estimate_input_tokens(self.runnable, value, kwargs), ceiling)
        tokens = self.tokens(value) if callable(self.tokens) else self.tokens
        return cfg.check_tokens(tokens)

    def _slot(self, value: Any, kwargs: Mapping[str, Any]) -> Slot:
        return self.fleet.slot(
            self.limit, tokens=self.reserve(value, kwargs), max_wait=self.max_wait
        )

    def _aslot(self, value: Any, kwargs: Mapping[str, Any]) -> AsyncSlot:
        return self.fleet.aslot(
            self.limit, tokens=self.reserve(value, kwargs), max_wait=self.max_wait
        )

    def _report(self, slot: Slot, used: int | None, headers: Any) -> None:
        """Settle to the reported usage and read the provider's headers: never losing the
        call's answer to a lease that expired meanwhile (it is logged)."""
        try:
            if headers:
                slot.observe(headers)
            if used is not None:
                slot.settle(used)
        except LeaseLost as exc:
            log.warning("celery-fleet: the call's answer is kept, but %s", exc)

    async def _areport(self, slot: AsyncSlot, used: int | None, headers: Any) -> None:
        try:
            if headers:
                await slot.observe(headers)
            if used is not None:
                await slot.settle(used)
        except LeaseLost as exc:
            log.warning("celery-fleet: the call's answer is kept, but %s", exc)

    def _judge(self, slot: Slot, output: Any, kwargs: Mapping[str, Any]) -> None:
        """Judge a model's message on a limit with ``quality`` (never raises)."""
        answer = answer_of(output) if judges(self.fleet.admission, slot.limit) else None
        if answer is not None:
            judge_quietly(slot, answer, request_of(self.runnable, kwargs))

    async def _ajudge(self, slot: AsyncSlot, output: Any, kwargs: Mapping[str, Any]) -> None:
        answer = answer_of(output) if judges(self.fleet.admission, slot.limit) else None
        if answer is not None:
            await ajudge_quietly(slot, answer, request_of(self.runnable, kwargs))

    # -- the calls -------------------------------------------------------------------------

    def invoke(self, input: Input, config: RunnableConfig | None = None, **kwargs: Any) -> Output:
        """Call the wrapped Runnable inside a slot (waits its turn; settles the usage;
        judges the model's message on a limit with ``quality``)."""
        with self._slot(input, kwargs) as slot:
            output = self.runnable.invoke(input, config, **kwargs)
            self._report(slot, *reported_usage(output))
            self._judge(slot, output, kwargs)
        return output

    async def ainvoke(
        self, input: Input, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Output:
        """:meth:`invoke` for coroutines: the wait never blocks the event loop."""
        async with self._aslot(input, kwargs) as slot:
            output = await self.runnable.ainvoke(input, config, **kwargs)
            await self._areport(slot, *reported_usage(output))
            await self._ajudge(slot, output, kwargs)
        return output

    def stream(
        self, input: Input, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Output]:
        """Stream inside one slot, held from the first chunk asked for to the last (or
        until the consumer stops reading); settles to the usage the chunks report. On a
        limit with ``quality``, a stream read to its end is judged on the message its
        chunks add up to (one left early is not: what was read is not the answer)."""
        with self._slot(input, kwargs) as slot:
            usage = StreamUsage()
            seen: list[Any] | None = [] if judges(self.fleet.admission, slot.limit) else None
            chunks = self.runnable.stream(input, config, **kwargs)
            try:
                for chunk in chunks:
                    usage.add(chunk)
                    if seen is not None:
                        seen.append(chunk)
                    yield chunk
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:  # ends the HTTP stream before the slot is given back
                    close()
            self._report(slot, usage.tokens, usage.headers)
            if seen:
                self._judge(slot, seen, kwargs)

    async def astream(
        self, input: Input, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Output]:
        """:meth:`stream` for coroutines."""
        async with self._aslot(input, kwargs) as slot:
            usage = StreamUsage()
            seen: list[Any] | None = [] if judges(self.fleet.admission, slot.limit) else None
            chunks = self.runnable.astream(input, config, **kwargs)
            try:
                async for chunk in chunks:
                    usage.add(chunk)
                    if seen is not None:
                        seen.append(chunk)
                    yield chunk
            finally:
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
            await self._areport(slot, usage.tokens, usage.headers)
            if seen:
                await self._ajudge(slot, seen, kwargs)

    # -- the wrapped Runnable's face ---------------------------------------------------------

    @property
    def InputType(self) -> Any:  # noqa: N802 (LangChain's name)
        return self.runnable.InputType

    @property
    def OutputType(self) -> Any:  # noqa: N802 (LangChain's name)
        return self.runnable.OutputType

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return self.runnable.get_name(suffix, name=name)

    def get_input_schema(self, config: RunnableConfig | None = None) -> Any:
        return self.runnable.get_input_schema(config)

    def get_output_schema(self, config: RunnableConfig | None = None) -> Any:
        return self.runnable.get_output_schema(config)

    def __getattr__(self, name: str) -> Any:
        """The wrapped Runnable's attribute; a method returning a new Runnable returns it
        wrapped on the same limit (``bind_tools``, ``with_structured_output``...)."""
        if name.startswith("__") or "runnable" not in self.__dict__:
            raise AttributeError(name)
        attr = getattr(self.__dict__["runnable"], name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        @functools.wraps(attr)
        def rewrapped(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if isinstance(result, Runnable) and not isinstance(result, FleetRunnable):
                return self.wrap(result)
            return result

        return rewrapped

    def wrap(self, runnable: Runnable[Any, Any]) -> FleetRunnable[Any, Any]:
        """``runnable`` wrapped on this one's fleet, limit and options."""
        return FleetRunnable(
            runnable, self.fleet, self.limit, tokens=self.tokens, max_wait=self.max_wait
        )

    def __repr__(self) -> str:
        return f"with_fleet({self.runnable!r}, limit={self.limit!r})"


def with_fleet(
    model: Runnable[Input, Output],
    fleet: FleetSource,
    limit: str,
    *,
    tokens: int | Callable[[Any], int] | None = None,
    max_wait: float | None = None,
) -> FleetRunnable[Input, Output]:
    """``model`` (a LangChain chat model or any Runnable calling one) with every call held
    in a slot of ``fleet``'s limit ``limit``.

    Each ``invoke``/``ainvoke``/``stream``/``astream`` (and each input of ``batch`` and
    ``abatch``, which call them) waits its turn as ``fleet.slot`` does, so the limit's
    ``max_in_flight`` holds fleet-wide; it reserves ``tokens`` (an int, a callable of the
    input, or by default :func:`estimate_input_tokens`: the input's characters / 4 plus the
    model's ``max_tokens``) and settles to the usage the answer reports
    (``usage_metadata``; a stream settles when it ends, from its chunks: with
    ``ChatOpenAI`` pass ``stream_usage=True`` off OpenAI's own endpoint). A provider 429 or
    overload raised by the SDK becomes :class:`~celery_fleet.Throttled` and pauses the
    limit fleet-wide; an exhausted quota :class:`~celery_fleet.QuotaExhausted`. Past
    ``max_wait`` (default: the fleet's or the running task's) the wait raises ``Throttled``.

    Give the model ``max_retries=0``: the fleet is then the only retry loop, and a 429 is
    seen by it instead of being retried while the slot is held.

    Example::

        model = with_fleet(ChatOpenAI(model="gpt-4o-mini", max_tokens=500, max_retries=0),
                           fleet, "openai")
        chain = prompt | model.bind_tools([search]) | parser
    """
    return FleetRunnable(model, fleet, limit, tokens=tokens, max_wait=max_wait)
