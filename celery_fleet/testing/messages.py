"""``POST /v1/messages``: the simulator's Anthropic endpoint, on the same limits as its OpenAI one.

A request to either endpoint takes from the same RPM and TPM buckets, counts against the same
in-flight limit, follows the same phases and lands in the same log and ``stats()``: one
simulated provider account reached through two wire formats. What differs is the dialect
(:mod:`celery_fleet.testing.anthropic_wire`): Anthropic's bodies and errors, its
``anthropic-ratelimit-*`` headers and ``retry-after`` in seconds, a scripted 503 or 529
phase answered as ``overloaded_error``, and ``stream: true`` as Anthropic's server-sent
events, the request staying in flight until its last event is written.

Example::

    with ProviderSim(rpm=50, tpm=40_000, max_in_flight=4) as sim:
        client = anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=0)
        client.messages.create(model="sim", max_tokens=64, messages=[...])
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from .anthropic_wire import (
    MessagesRequest,
    anthropic_error,
    message_body,
    parse_messages_request,
    rate_limit_refusal,
    ratelimit_headers,
    sse_bytes,
    sse_events,
)
from .phases import effective_at
from .records import RequestRecord
from .server import Response
from .wire import BadRequest

if TYPE_CHECKING:
    from .provider import ProviderSim

__all__ = ["serve_messages"]

#: Text deltas a streamed answer is cut into; the simulated latency is spread over them.
STREAM_PIECES = 4


def serve_messages(sim: ProviderSim, headers: Mapping[str, str], body: bytes) -> Response:
    """Answer one ``POST /v1/messages`` on ``sim``'s limits (called by ``ProviderSim.handle``)."""
    now = sim._clock()
    t_s = now - sim._t0
    task_id = headers.get("x-fleet-task-id") or headers.get("x-task-id")
    with sim._lock:
        sim._served += 1
        number = sim._served
        base = sim._base
    request_id = f"req_sim{number:07d}"
    meta = {"request-id": request_id}
    try:
        request = parse_messages_request(body)
    except BadRequest as exc:
        sim._append(RequestRecord(t_s, "400", 400, task_id=task_id))
        return Response(400, anthropic_error(400, exc.message, request_id), meta)
    effect = effective_at(t_s, base, sim.phases)
    if effect.status is not None:
        status = effect.status
        in_flight = sim._limiter.in_flight
        sim._append(
            RequestRecord(
                t_s, str(status), status, cost=request.cost, in_flight=in_flight, task_id=task_id
            )
        )
        message = "Overloaded (simulated outage)."
        return Response(status, anthropic_error(status, message, request_id), meta)
    decision = sim._limiter.admit(request.cost, effect.limits, now)
    meta.update(ratelimit_headers(decision.buckets, dt.datetime.now(dt.timezone.utc)))
    if not decision.admitted:
        retry_after_ms, extra, refusal = rate_limit_refusal(
            request, decision, effect.limits.max_in_flight, request_id
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
    sim._append(
        RequestRecord(
            t_s,
            "garbage" if effect.garbage else "ok",
            200,
            cost=request.cost,
            latency_s=latency_s,
            in_flight=decision.in_flight,
            task_id=task_id,
            completion_tokens=0 if effect.garbage else output_tokens,
        )
    )
    message_id = f"msg_sim{number:07d}"
    if request.stream:  # in flight until the last event is written or the client goes
        events = _stream(sim, message_id, request, output_tokens, effect.garbage, latency_s)
        return Response(200, None, meta, stream=events, done=sim._limiter.release)
    try:
        sim._stopping.wait(latency_s)
    finally:
        # Released before the answer is written: a client that fires its next request on
        # receipt must find the slot free.
        sim._limiter.release()
    answer = message_body(
        message_id=message_id, request=request, output_tokens=output_tokens, garbage=effect.garbage
    )
    return Response(200, answer, meta)


def _stream(
    sim: ProviderSim,
    message_id: str,
    request: MessagesRequest,
    output_tokens: int,
    garbage: bool,
    latency_s: float,
) -> Iterator[bytes]:
    """The events of a streamed answer, the latency spread before its text deltas and its
    ``message_delta`` (the server releases the request when the stream ends, either way)."""
    step_s = latency_s / (STREAM_PIECES + 1)
    for event, data in sse_events(
        message_id=message_id,
        request=request,
        output_tokens=output_tokens,
        garbage=garbage,
        pieces=STREAM_PIECES,
    ):
        if event in ("content_block_delta", "message_delta") and sim._stopping.wait(step_s):
            raise ConnectionAbortedError("the simulator stopped mid-stream")
        yield sse_bytes(event, data)
