"""httpx transports that hold a fleet slot for each model call: the SDKs' own HTTP layer.

``OpenAI(http_client=httpx.Client(transport=FleetTransport(fleet, "openai")))`` is all a
user writes: every model call the SDK makes then waits its turn fleet-wide, reserves its
token estimate, tells the fleet what the provider answered and settles to the usage the
provider reported. Public under :mod:`celery_fleet.httpx` (``pip install
celery-fleet[httpx]``); the sync and async transports are a pair over one policy, as
httpx's own are.

For each request that is a model call (a ``POST`` whose path ends with one of ``paths``):

1. ``fleet.slot(limit, tokens=...)`` (``fleet.aslot`` for the async transport) waits for
   admission; a refusal raises :class:`~celery_fleet.Throttled` or
   :class:`~celery_fleet.CircuitOpen` out of the SDK call, as a slot in a task does;
2. the request goes to the inner transport; the response headers are observed
   (``x-ratelimit-*``, ``anthropic-ratelimit-*``);
3. a JSON response is read whole, its ``usage`` settles the reservation, and the slot is
   released with what the status says (a 429's Retry-After pauses the limit fleet-wide, a
   503/529 counts as an overload, a 5xx as a failure) before the response, unchanged, goes
   back to the SDK, which raises its own ``RateLimitError`` for a 429 as it always did;
4. a ``text/event-stream`` response keeps its slot until the stream ends or is closed, and
   settles from the usage in its events (see :mod:`~celery_fleet.contrib.stream_usage`);
   the slot is released exactly once: at the end of the stream, when the caller closes it
   early, when the connection breaks, or, if nobody ever closes it, when it is collected.

Any other request (``GET /models``, file uploads) goes straight through, holding nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import httpx

from ..admission.aslot import AsyncSlot, _shielded
from ..admission.providers import OK, Observation, Signal, classify, parse_headers
from ..admission.slot import Slot
from ..errors import ConfigError, FleetError
from .stream_usage import UsageMeter
from .usage import estimate_tokens, usage_tokens

__all__ = ["AsyncFleetTransport", "DEFAULT_PATHS", "FleetTransport", "SlotSource"]

log = logging.getLogger("celery_fleet")

#: The endpoints that are model calls (path suffixes; OpenAI, Azure OpenAI and Anthropic).
DEFAULT_PATHS = ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages")

#: What leaving a stream unfinished tells the fleet: nothing about the provider.
ABANDONED = Signal("other", detail="the response stream was closed before its end")


class SlotSource(Protocol):
    """What the transports need of a :class:`~celery_fleet.Fleet`: its two slot factories."""

    def slot(
        self, name: str, tokens: int = 0, max_wait: float | None = None, validate: Any = None,
        jitter: float | None = None,
    ) -> Slot: ...  # fmt: skip

    def aslot(
        self, name: str, tokens: int = 0, max_wait: float | None = None, validate: Any = None,
        jitter: float | None = None,
    ) -> AsyncSlot: ...  # fmt: skip


TokensOption = int | Callable[[Mapping[str, Any]], int] | None


class _Policy:
    """Which requests hold a slot and what they reserve; arguments checked once, here."""

    def __init__(
        self,
        fleet: SlotSource,
        limit: str,
        tokens: TokensOption,
        max_wait: float | None,
        paths: Iterable[str],
    ) -> None:
        # The fleet's own checks: a known limit, a wait, a fixed reservation it can hold.
        probe = fleet.slot(
            limit, tokens=tokens if isinstance(tokens, int) else 0, max_wait=max_wait
        )
        #: A limit with no token budget reserves and settles nothing.
        self.counts_tokens = bool(probe.admission.limit(limit).token_windows)
        if tokens is None:
            tokens = estimate_tokens
        elif isinstance(tokens, bool) or not (callable(tokens) or isinstance(tokens, int)):
            raise ConfigError(
                f"FleetTransport(tokens=...) must be an int or a callable body -> int, "
                f"got {tokens!r}"
            )
        if isinstance(paths, str) or not all(isinstance(p, str) and p[:1] == "/" for p in paths):
            raise ConfigError(
                f"FleetTransport(paths=...) must be path suffixes starting with '/', "
                f"e.g. ('/chat/completions',), got {paths!r}"
            )
        self.fleet, self.limit, self.max_wait = fleet, limit, max_wait
        self.tokens, self.paths = tokens, tuple(paths)

    def holds(self, request: httpx.Request) -> bool:
        """Whether ``request`` is a model call (one slot) or passes through."""
        return request.method == "POST" and request.url.path.rstrip("/").endswith(self.paths)

    def reservation(self, request: httpx.Request) -> int:
        """Tokens to reserve for ``request``: the ``tokens`` option over its JSON body."""
        if not self.counts_tokens:
            return 0
        if callable(self.tokens):
            return self.tokens(_json_body(request))
        return self.tokens


def _json_body(request: httpx.Request) -> Mapping[str, Any]:
    try:
        body = json.loads(request.content)
    except (httpx.RequestNotRead, ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _is_stream(response: httpx.Response) -> bool:
    return (
        response.status_code < 400
        and UsageMeter(response.headers.get("content-type", "")).streaming
    )


def _meter(response: httpx.Response) -> UsageMeter:
    headers = response.headers
    return UsageMeter(headers.get("content-type", ""), headers.get("content-encoding", ""))


class _ProviderAnswer(Exception):
    """A non-2xx response in the shape :func:`classify` reads (status, headers, error body)."""

    def __init__(self, response: httpx.Response, raw: bytes) -> None:
        text = _decoded(response, raw).decode("utf-8", errors="replace")
        super().__init__(f"HTTP {response.status_code}: {text[:500]}")
        self.status_code = response.status_code
        self.response = response
        try:
            error = json.loads(text).get("error")
        except (ValueError, AttributeError):
            error = None
        self.body = error if isinstance(error, dict) else None


def _answer_signal(response: httpx.Response, raw: bytes) -> Signal:
    return OK if response.status_code < 400 else classify(_ProviderAnswer(response, raw))


def _decoded(response: httpx.Response, raw: bytes) -> bytes:
    """A body as the client will see it: decoded per its content-encoding."""
    try:
        return httpx.Response(200, headers=response.headers, content=raw).content
    except httpx.DecodingError:
        return b""


def _tokens_of(response: httpx.Response, raw: bytes) -> int | None:
    if response.status_code >= 400:
        return None
    try:
        body = json.loads(_decoded(response, raw))
    except (ValueError, UnicodeDecodeError):
        return None
    return usage_tokens(body.get("usage")) if isinstance(body, dict) else None


def _rebuilt(response: httpx.Response, raw: bytes, request: httpx.Request) -> httpx.Response:
    """The answer, read, as a fresh response over its raw bytes (still content-encoded)."""
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        extensions=response.extensions,
        request=request,
    )


def _observed(headers: httpx.Headers) -> bool:
    return parse_headers(headers) != Observation()


def _warn(what: str, limit: str, error: Exception) -> None:
    log.warning("celery-fleet: %s for %r failed (%s)", what, limit, error)


class _Held:
    """One slot's end, which happens once: by the stream's end, its close, an error, or
    (nobody closed it) its collection. Thread-safe: a close may race the last read."""

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
                _warn("settling", self.slot.limit, exc)
        try:
            self.slot.release(signal)
        except FleetError as exc:
            _warn("releasing", self.slot.limit, exc)

    async def aend(self, aslot: AsyncSlot, signal: Signal, tokens: int | None) -> None:
        """:meth:`end` for the async slot ``aslot`` holding :attr:`slot`: awaited, and run
        to its end even when the task is cancelled meanwhile."""
        if self.claim():
            await _shielded(self._aend(aslot, signal, tokens))

    async def _aend(self, aslot: AsyncSlot, signal: Signal, tokens: int | None) -> None:
        if tokens is not None and self.settles:
            try:
                await aslot.settle(tokens)
            except FleetError as exc:
                _warn("settling", aslot.limit, exc)
        try:
            await aslot.release(signal)
        except FleetError as exc:
            _warn("releasing", aslot.limit, exc)

    def collected(self) -> None:
        if self.slot.lease_id is not None and not self._ended:
            log.warning(
                "celery-fleet: a streamed response of %r was never closed; its slot is "
                "released now that it is collected (close streams: `with ...` or .close())",
                self.slot.limit,
            )
        self.end(ABANDONED, None)


class _MeteredStream(httpx.SyncByteStream):
    """A streamed body passed through unchanged, read by a :class:`UsageMeter` on the way;
    its end settles and releases the slot."""

    def __init__(self, inner: httpx.SyncByteStream, meter: UsageMeter, held: _Held) -> None:
        self._inner, self._meter, self._held = inner, meter, held
        weakref.finalize(self, held.collected)

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
            self._inner.close()
        finally:
            meter = self._meter
            if meter.ended:  # the caller stopped after the last event ([DONE], message_stop)
                meter.finish()
                self._held.end(meter.signal or OK, meter.tokens)
            else:
                self._held.end(ABANDONED, None)


class FleetTransport(httpx.BaseTransport):
    """An httpx transport that holds a slot of ``limit`` for each model call.

    Example::

        import httpx, openai
        from celery_fleet.httpx import FleetTransport

        client = openai.OpenAI(
            max_retries=0,  # the fleet waits and reschedules; one retry loop, not two
            http_client=httpx.Client(transport=FleetTransport(fleet, "openai")),
        )

    Parameters: ``fleet`` (a :class:`~celery_fleet.Fleet`), ``limit`` (one of its
    limits); keyword-only: ``tokens`` (an int, or a callable over the request's JSON body;
    default :func:`~celery_fleet.contrib.usage.estimate_tokens`), ``max_wait`` (seconds a
    call waits for admission; default the running task's or ``fleet_max_wait``),
    ``paths`` (the path suffixes of model calls, :data:`DEFAULT_PATHS`), ``transport``
    (the inner transport, default ``httpx.HTTPTransport()``). Checked here:
    :class:`~celery_fleet.ConfigError` names a bad one.
    """

    def __init__(
        self,
        fleet: SlotSource,
        limit: str,
        *,
        tokens: TokensOption = None,
        max_wait: float | None = None,
        paths: Iterable[str] = DEFAULT_PATHS,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if transport is not None and not isinstance(transport, httpx.BaseTransport):
            raise ConfigError(f"transport must be an httpx.BaseTransport, got {transport!r}")
        self.policy = _Policy(fleet, limit, tokens, max_wait, paths)
        self.transport = transport if transport is not None else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        policy = self.policy
        if not policy.holds(request):
            return self.transport.handle_request(request)
        slot = policy.fleet.slot(
            policy.limit, tokens=policy.reservation(request), max_wait=policy.max_wait
        )
        slot.acquire()  # Throttled / CircuitOpen leave here, holding nothing
        held = _Held(slot, policy.counts_tokens)
        try:
            response = self.transport.handle_request(request)
            if _observed(response.headers):
                try:
                    slot.observe(response.headers)
                except FleetError as exc:
                    _warn("reading the rate-limit headers", slot.limit, exc)
            if _is_stream(response):
                assert isinstance(response.stream, httpx.SyncByteStream)
                response.stream = _MeteredStream(response.stream, _meter(response), held)
                return response
            try:  # as sent (content-encoded): the client decodes it
                assert isinstance(response.stream, httpx.SyncByteStream)
                raw = b"".join(response.stream)
            finally:
                response.close()
        except BaseException as exc:
            held.end(slot.exit_signal(exc), None)
            raise
        held.end(_answer_signal(response, raw), _tokens_of(response, raw))
        return _rebuilt(response, raw, request)

    def close(self) -> None:
        self.transport.close()


class _AsyncMeteredStream(httpx.AsyncByteStream):
    """:class:`_MeteredStream` for the async transport."""

    def __init__(
        self, inner: httpx.AsyncByteStream, meter: UsageMeter, held: _Held, aslot: AsyncSlot
    ) -> None:
        self._inner, self._meter, self._held, self._aslot = inner, meter, held, aslot
        weakref.finalize(self, held.collected)

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
            await self._inner.aclose()
        finally:
            meter = self._meter
            if meter.ended:
                meter.finish()
                await self._held.aend(self._aslot, meter.signal or OK, meter.tokens)
            else:
                await self._held.aend(self._aslot, ABANDONED, None)


class AsyncFleetTransport(httpx.AsyncBaseTransport):
    """:class:`FleetTransport` for ``httpx.AsyncClient`` (``AsyncOpenAI``,
    ``AsyncAnthropic``): waits for admission with ``fleet.aslot``, never blocking the loop.

    Example::

        client = openai.AsyncOpenAI(
            max_retries=0,
            http_client=httpx.AsyncClient(transport=AsyncFleetTransport(fleet, "openai")),
        )

    The same parameters as :class:`FleetTransport`; ``transport`` is an
    ``httpx.AsyncBaseTransport`` (default ``httpx.AsyncHTTPTransport()``).
    """

    def __init__(
        self,
        fleet: SlotSource,
        limit: str,
        *,
        tokens: TokensOption = None,
        max_wait: float | None = None,
        paths: Iterable[str] = DEFAULT_PATHS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise ConfigError(f"transport must be an httpx.AsyncBaseTransport, got {transport!r}")
        self.policy = _Policy(fleet, limit, tokens, max_wait, paths)
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        policy = self.policy
        if not policy.holds(request):
            return await self.transport.handle_async_request(request)
        aslot = policy.fleet.aslot(
            policy.limit, tokens=policy.reservation(request), max_wait=policy.max_wait
        )
        await aslot.acquire()
        held = _Held(aslot.slot, policy.counts_tokens)
        try:
            response = await self.transport.handle_async_request(request)
            if _observed(response.headers):
                try:
                    await aslot.observe(response.headers)
                except FleetError as exc:
                    _warn("reading the rate-limit headers", aslot.limit, exc)
            if _is_stream(response):
                assert isinstance(response.stream, httpx.AsyncByteStream)
                meter = _meter(response)
                response.stream = _AsyncMeteredStream(response.stream, meter, held, aslot)
                return response
            try:
                assert isinstance(response.stream, httpx.AsyncByteStream)
                raw = b"".join([chunk async for chunk in response.stream])
            finally:
                await response.aclose()
        except BaseException as exc:
            await held.aend(aslot, aslot.slot.exit_signal(exc), None)
            raise
        await held.aend(aslot, _answer_signal(response, raw), _tokens_of(response, raw))
        return _rebuilt(response, raw, request)

    async def aclose(self) -> None:
        await self.transport.aclose()
