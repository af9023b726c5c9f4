"""httpx transports that hold a fleet slot for each model call: the SDKs' own HTTP layer.

``OpenAI(http_client=httpx.Client(transport=FleetTransport(fleet, "openai")))`` is all a
user writes: every model call the SDK makes then waits its turn fleet-wide, reserves its
token estimate, tells the fleet what the provider answered and settles to the usage the
provider reported. The public classes live in :mod:`celery_fleet.httpx` (httpx) and
:mod:`celery_fleet.httpx2` (httpx2, which the openai and anthropic SDKs use by default
since their 3.x/2.x lines); both are these mixins over their library's base classes, the
sync and async transports a pair over one :class:`Policy`, as httpx's own are.

For each request that is a model call (a ``POST`` whose path ends with one of ``paths``):

1. ``fleet.slot(limit, tokens=...)`` (``fleet.aslot`` for the async transport) waits for
   admission; a refusal raises :class:`~celery_fleet.Throttled` or
   :class:`~celery_fleet.CircuitOpen` out of the SDK call, as a slot in a task does;
2. the request goes to the inner transport; the response headers are observed
   (``x-ratelimit-*``, ``anthropic-ratelimit-*``);
3. a JSON response is read whole, its ``usage`` settles the reservation, and the slot is
   released with what the status says (a 429's Retry-After pauses the limit fleet-wide, a
   503/529 counts as an overload, a 5xx as a failure). Then, with ``pushback="raise"``
   (the default), a 429 or an overload raises :class:`~celery_fleet.Throttled` and an
   exhausted quota :class:`~celery_fleet.QuotaExhausted`, as leaving ``fleet.slot`` with
   the SDK's error does, so a ``fleet_task`` reschedules (a ``RateLimitError`` escaping a
   task body would fail it) and the SDK retries nothing; with ``pushback="return"`` the
   response goes back unchanged and the SDK raises its own error;
4. a ``text/event-stream`` response keeps its slot until the stream ends or is closed, and
   settles from the usage in its events (see :mod:`~celery_fleet.contrib.stream_usage`);
   the slot is released exactly once (:mod:`~celery_fleet.contrib.httpx_streams`).

Any other request (``GET /models``, file uploads) goes straight through, holding nothing.
This module imports no HTTP library: requests and responses are duck-typed, and each
public class names its library in ``lib``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

from ..admission.aslot import AsyncSlot
from ..admission.providers import OK, Observation, Signal, classify, parse_headers
from ..admission.slot import Slot
from ..errors import ConfigError, FleetError
from .httpx_streams import AsyncMeteredStream, HeldSlot, MeteredStream, warn
from .stream_usage import UsageMeter
from .usage import estimate_tokens, usage_tokens

__all__ = ["AsyncTransportMixin", "DEFAULT_PATHS", "Policy", "SlotSource", "TransportMixin"]

#: The endpoints that are model calls (path suffixes; OpenAI, Azure OpenAI and Anthropic).
DEFAULT_PATHS = ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages")

TokensOption = int | Callable[[Mapping[str, Any]], int] | None
#: What a provider's pushback (429, 503, 529) does once the fleet heard it.
PUSHBACK = ("raise", "return")


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


class Policy:
    """Which requests hold a slot and what they reserve; arguments checked once, here."""

    def __init__(
        self,
        fleet: SlotSource,
        limit: str,
        tokens: TokensOption,
        max_wait: float | None,
        paths: Iterable[str],
        pushback: str = "raise",
    ) -> None:
        if pushback not in PUSHBACK:
            raise ConfigError(
                f"FleetTransport(pushback=...) must be one of {', '.join(PUSHBACK)}, "
                f"got {pushback!r}"
            )
        self.raises = pushback == "raise"
        if not callable(getattr(fleet, "slot", None)):  # FleetTransport("openai", fleet)
            raise ConfigError(
                f"FleetTransport(fleet, limit) takes a celery_fleet.Fleet first, "
                f"got {type(fleet).__name__}"
            )
        # The fleet's own checks: a known limit, a wait, a fixed reservation it can hold.
        fixed = tokens if isinstance(tokens, int) else 0
        probe = fleet.slot(limit, tokens=fixed, max_wait=max_wait)
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

    def holds(self, request: Any) -> bool:
        """Whether ``request`` is a model call (one slot) or passes through."""
        return bool(request.method == "POST" and request.url.path.rstrip("/").endswith(self.paths))

    def reservation(self, request: Any) -> int:
        """Tokens to reserve for ``request``: the ``tokens`` option over its JSON body."""
        if not self.counts_tokens:
            return 0
        if callable(self.tokens):
            return self.tokens(_json_body(request))
        return self.tokens


def _json_body(request: Any) -> Mapping[str, Any]:
    try:
        body = json.loads(request.content)
    except Exception:  # not read (a streamed upload), not JSON: nothing to estimate from
        return {}
    return body if isinstance(body, dict) else {}


def _meter(response: Any) -> UsageMeter:
    headers = response.headers
    return UsageMeter(headers.get("content-type", ""), headers.get("content-encoding", ""))


def _decoded(lib: Any, response: Any, raw: bytes) -> bytes:
    """A body as the client will see it: decoded per its content-encoding."""
    try:
        return bytes(lib.Response(200, headers=response.headers, content=raw).content)
    except lib.DecodingError:
        return b""


class _ProviderAnswer(Exception):
    """A non-2xx response in the shape :func:`classify` reads (status, headers, error body)."""

    def __init__(self, response: Any, text: str) -> None:
        super().__init__(f"HTTP {response.status_code}: {text[:500]}")
        self.status_code = response.status_code
        self.response = response
        try:
            error = json.loads(text).get("error")
        except (ValueError, AttributeError):
            error = None
        self.body = error if isinstance(error, dict) else None


def _verdict(lib: Any, response: Any, raw: bytes) -> tuple[Signal, int | None]:
    """What a whole (non-streamed) answer tells the fleet, and the tokens it used."""
    body = _decoded(lib, response, raw)
    if response.status_code >= 400:
        text = body.decode("utf-8", errors="replace")
        return classify(_ProviderAnswer(response, text)), None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return OK, None
    return OK, usage_tokens(parsed.get("usage")) if isinstance(parsed, dict) else None


def _rebuilt(lib: Any, response: Any, stream: Any, request: Any) -> Any:
    """The answer as a fresh, unread response over ``stream``: its raw bytes (still
    content-encoded) once read, or the metered stream. Fresh, because a response the inner
    transport already read (``MockTransport``) would serve its cached body, not the stream."""
    return lib.Response(
        response.status_code,
        headers=response.headers,
        stream=stream,
        extensions=response.extensions,
        request=request,
    )


def _streams(response: Any) -> bool:
    return bool(response.status_code < 400 and _meter(response).streaming)


def _observed(headers: Any) -> bool:
    return parse_headers(headers) != Observation()


class _Transport:
    """What the sync and async transports share: the arguments, checked once, and the
    library's classes (``lib``, the subclass's ``lib=`` keyword) each variant uses."""

    lib: ClassVar[Any]
    stream_class: ClassVar[type[Any]]
    #: The names, in ``lib``, of the variant's base transport, its default inner transport
    #: and the byte stream class its clients accept.
    _names: ClassVar[tuple[str, str, str]]
    _stream_mixin: ClassVar[type[Any]]

    def __init_subclass__(cls, lib: Any = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if lib is not None:  # a public transport over httpx or httpx2
            cls.lib = lib
            stream_base = getattr(lib, cls._names[2])
            mixin = cls._stream_mixin
            cls.stream_class = type(
                mixin.__name__, (mixin, stream_base), {"__module__": cls.__module__}
            )

    def __init__(
        self,
        fleet: SlotSource,
        limit: str,
        *,
        tokens: TokensOption = None,
        max_wait: float | None = None,
        paths: Iterable[str] = DEFAULT_PATHS,
        transport: Any = None,
        pushback: str = "raise",
    ) -> None:
        base, default, _ = self._names
        if transport is not None and not isinstance(transport, getattr(self.lib, base)):
            raise ConfigError(f"transport must be a {self.lib.__name__}.{base}, got {transport!r}")
        self.policy = Policy(fleet, limit, tokens, max_wait, paths, pushback)
        self.transport = transport if transport is not None else getattr(self.lib, default)()


class TransportMixin(_Transport):
    """The sync transport: ``handle_request`` over ``lib`` (httpx or httpx2).

    A public transport is this over its library's base class, naming the library::

        class FleetTransport(TransportMixin, httpx.BaseTransport, lib=httpx): ...

    Parameters: ``fleet`` (a :class:`~celery_fleet.Fleet`), ``limit`` (one of its
    limits); keyword-only: ``tokens`` (an int, or a callable over the request's JSON body;
    default :func:`~celery_fleet.contrib.usage.estimate_tokens`; nothing is reserved on a
    limit without a token budget), ``max_wait`` (seconds a call waits for admission;
    default the running task's, else ``fleet_max_wait``), ``paths`` (path suffixes of
    model calls, :data:`DEFAULT_PATHS`), ``pushback`` (``"raise"``: a 429 or an overload
    raises ``Throttled`` once the fleet heard it, as ``fleet.slot`` does, so a task
    reschedules; ``"return"``: the SDK gets the response and raises its own error),
    ``transport`` (the inner transport, default ``lib.HTTPTransport()``). Checked here:
    :class:`~celery_fleet.ConfigError` names a bad one.
    """

    _names = ("BaseTransport", "HTTPTransport", "SyncByteStream")
    _stream_mixin = MeteredStream
    stream_class: ClassVar[type[MeteredStream]]

    def handle_request(self, request: Any) -> Any:
        policy = self.policy
        if not policy.holds(request):
            return self.transport.handle_request(request)
        slot = policy.fleet.slot(
            policy.limit, tokens=policy.reservation(request), max_wait=policy.max_wait
        )
        slot.acquire()  # Throttled / CircuitOpen leave here, holding nothing
        held = HeldSlot(slot, policy.counts_tokens)
        try:
            response = self.transport.handle_request(request)
            if _observed(response.headers):
                try:
                    slot.observe(response.headers)
                except FleetError as exc:
                    warn("reading the rate-limit headers", slot.limit, exc)
            if _streams(response):
                stream = self.stream_class(response.stream, _meter(response), held)
                return _rebuilt(self.lib, response, stream, request)
            try:  # as sent (content-encoded): the client decodes it
                raw = b"".join(response.stream)
            finally:
                response.close()
        except BaseException as exc:
            held.end(slot.exit_signal(exc), None)
            raise
        signal, tokens = _verdict(self.lib, response, raw)
        held.end(signal, tokens)
        if policy.raises:
            slot.raise_pushback(signal, None)  # Throttled / QuotaExhausted, as a slot does
        return _rebuilt(self.lib, response, self.lib.ByteStream(raw), request)

    def close(self) -> None:
        self.transport.close()


class AsyncTransportMixin(_Transport):
    """The async transport: ``handle_async_request`` over ``lib``, waiting with
    ``fleet.aslot`` so the loop is never blocked; the parameters are
    :class:`TransportMixin`'s, ``transport`` defaulting to ``lib.AsyncHTTPTransport()``."""

    _names = ("AsyncBaseTransport", "AsyncHTTPTransport", "AsyncByteStream")
    _stream_mixin = AsyncMeteredStream
    stream_class: ClassVar[type[AsyncMeteredStream]]

    async def handle_async_request(self, request: Any) -> Any:
        policy = self.policy
        if not policy.holds(request):
            return await self.transport.handle_async_request(request)
        aslot = policy.fleet.aslot(
            policy.limit, tokens=policy.reservation(request), max_wait=policy.max_wait
        )
        await aslot.acquire()
        held = HeldSlot(aslot.slot, policy.counts_tokens)
        try:
            response = await self.transport.handle_async_request(request)
            if _observed(response.headers):
                try:
                    await aslot.observe(response.headers)
                except FleetError as exc:
                    warn("reading the rate-limit headers", aslot.limit, exc)
            if _streams(response):
                stream = self.stream_class(response.stream, _meter(response), held, aslot)
                return _rebuilt(self.lib, response, stream, request)
            try:
                raw = b"".join([chunk async for chunk in response.stream])
            finally:
                await response.aclose()
        except BaseException as exc:
            await held.aend(aslot, aslot.slot.exit_signal(exc), None)
            raise
        signal, tokens = _verdict(self.lib, response, raw)
        await held.aend(aslot, signal, tokens)
        if policy.raises:
            aslot.slot.raise_pushback(signal, None)
        return _rebuilt(self.lib, response, self.lib.ByteStream(raw), request)

    async def aclose(self) -> None:
        await self.transport.aclose()
