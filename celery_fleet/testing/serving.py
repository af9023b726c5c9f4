"""One simulated model call, whatever the API: the request's path through the simulator.

Both endpoints of :class:`~celery_fleet.testing.ProviderSim` (OpenAI's
``/v1/chat/completions``, :mod:`~celery_fleet.testing.chat`; Anthropic's ``/v1/messages``,
:mod:`~celery_fleet.testing.messages`) serve a request the same way, on the same limits:
count it, parse it (a 400), apply a scripted outage (a 503/529 before admission), admit it
on the buckets and the in-flight limit (a 429), draw its latency and output length, log
it, then answer, holding its in-flight place until the answer (or the stream's last
event) is written. :func:`serve` is that path; a :class:`Dialect` is what differs: the
bodies, the headers and the error shapes of one API.

Example::

    def handle(self, method, path, query, headers, body):
        if (method, path) == ("POST", "/v1/messages"):
            return serve(self, MESSAGES, headers, body)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .phases import effective_at
from .records import RequestRecord
from .server import Response
from .wire import BadRequest

if TYPE_CHECKING:
    from .limiter import Bucket, Decision
    from .provider import ProviderSim

__all__ = ["Dialect", "SimRequest", "serve"]


class SimRequest(Protocol):
    """What :func:`serve` reads of a parsed request (``ChatRequest``, ``MessagesRequest``)."""

    @property
    def cost(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    @property
    def stream(self) -> bool: ...


class Dialect(Protocol):
    """One API's wire format: how its requests parse and its answers and errors read.

    ``number`` is the request's serial number on the simulator (its ids derive from it).
    """

    def headers(self, number: int) -> dict[str, str]:
        """The headers every answer carries (the request id)."""

    def parse(self, sim: ProviderSim, body: bytes) -> Any:
        """The request (a :class:`SimRequest`), or :class:`~.wire.BadRequest`."""

    def bad_request(self, error: BadRequest, number: int) -> dict[str, Any]:
        """The body of a 400."""

    def outage(self, status: int, number: int) -> dict[str, Any]:
        """The body of a scripted outage's ``status`` (503, 529, ...)."""

    def ratelimit_headers(self, buckets: Mapping[str, Bucket]) -> dict[str, str]:
        """The rate-limit headers of an admitted or refused request."""

    def refusal(
        self, request: Any, decision: Decision, max_in_flight: int | None, number: int
    ) -> tuple[int | None, dict[str, str], dict[str, Any]]:
        """A 429: its retry hint (ms), extra headers and body."""

    def answer(self, number: int, request: Any, output_tokens: int, garbage: str) -> dict[str, Any]:
        """The body of a whole (not streamed) answer."""

    def stream(
        self,
        sim: ProviderSim,
        number: int,
        request: Any,
        output_tokens: int,
        garbage: str,
        latency_s: float,
    ) -> Iterator[bytes]:
        """The bytes of a streamed answer, paced over ``latency_s``; raises
        ``ConnectionAbortedError`` when the simulator stops mid-stream."""


def serve(sim: ProviderSim, dialect: Dialect, headers: Mapping[str, str], body: bytes) -> Response:
    """Answer one model call on ``sim``'s limits in ``dialect`` (see the module docstring)."""
    now = sim._clock()
    t_s = now - sim._t0
    task_id = headers.get("x-fleet-task-id") or headers.get("x-task-id")
    with sim._lock:
        sim._served += 1
        number = sim._served
        base = sim._base
    meta = dialect.headers(number)
    try:
        request = dialect.parse(sim, body)
    except BadRequest as exc:
        sim._append(RequestRecord(t_s, "400", 400, task_id=task_id))
        return Response(400, dialect.bad_request(exc, number), meta)
    effect = effective_at(t_s, base, sim.phases)
    if effect.status is not None:
        status = effect.status
        in_flight = sim._limiter.in_flight
        sim._append(
            RequestRecord(
                t_s, str(status), status, cost=request.cost, in_flight=in_flight, task_id=task_id
            )
        )
        return Response(status, dialect.outage(status, number), meta)
    decision = sim._limiter.admit(request.cost, effect.limits, now)
    if sim.rate_limit_headers:
        meta.update(dialect.ratelimit_headers(decision.buckets))
    if not decision.admitted:
        retry_after_ms, extra, refusal = dialect.refusal(
            request, decision, effect.limits.max_in_flight, number
        )
        sim._append(
            RequestRecord(
                t_s,
                "429",
                429,
                limit=decision.limit,
                cost=request.cost,
                in_flight=decision.in_flight,
                task_id=task_id,
                retry_after_ms=retry_after_ms,
            )
        )
        return Response(429, refusal, {**meta, **extra})
    with sim._lock:
        latency_s = (
            sim._rng.lognormvariate(math.log(sim.latency), sim.latency_sigma)
            if sim.latency
            else 0.0
        )
        output_tokens = sim._rng.randint(1, request.max_tokens)
        # a share of the phase's answers is garbage, drawn per answer
        kind = effect.garbage if effect.garbage and sim._rng.random() < effect.share else ""
    sim._append(
        RequestRecord(
            t_s,
            "garbage" if kind else "ok",
            200,
            cost=request.cost,
            latency_s=latency_s,
            in_flight=decision.in_flight,
            task_id=task_id,
            completion_tokens=0 if kind == "empty" else output_tokens,
            kind=kind,
        )
    )
    if request.stream:  # in flight until the last event is written or the client goes
        events = dialect.stream(sim, number, request, output_tokens, kind, latency_s)
        return Response(200, None, meta, stream=events, done=sim._limiter.release)
    answer = dialect.answer(number, request, output_tokens, kind)
    try:
        sim._stopping.wait(latency_s)
    finally:
        # Released before the answer is written: a client that fires its next request on
        # receipt must find the slot free.
        sim._limiter.release()
    return Response(200, answer, meta)
