"""``POST /v1/messages``: the simulator's Anthropic endpoint, on the same limits as its OpenAI one.

A request to either endpoint takes from the same RPM and TPM buckets, counts against the same
in-flight limit, follows the same phases and lands in the same log and ``stats()``: one
simulated provider account reached through two wire formats. What differs is the dialect
(:mod:`celery_fleet.testing.anthropic_wire`): Anthropic's bodies and errors, its
``anthropic-ratelimit-*`` headers and ``retry-after`` in seconds, a scripted 503 or 529
phase answered as ``overloaded_error``, and ``stream: true`` as Anthropic's server-sent
events, the request staying in flight until its last event is written. The path of a request
(parse, outage, admission, latency, log) is :func:`~celery_fleet.testing.serving.serve`'s,
shared with the OpenAI endpoint (:mod:`celery_fleet.testing.chat`).

Example::

    with ProviderSim(rpm=50, tpm=40_000, max_in_flight=4) as sim:
        client = anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=0)
        client.messages.create(model="sim", max_tokens=64, messages=[...])
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

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
from .server import Response
from .serving import serve
from .wire import BadRequest

if TYPE_CHECKING:
    from .limiter import Bucket, Decision
    from .provider import ProviderSim

__all__ = ["MESSAGES", "MessagesDialect", "serve_messages"]

#: Text deltas a streamed answer is cut into; the simulated latency is spread over them.
STREAM_PIECES = 4


def _request_id(number: int) -> str:
    return f"req_sim{number:07d}"


class MessagesDialect:
    """Anthropic's Messages API (see the module docstring)."""

    def headers(self, number: int) -> dict[str, str]:
        return {"request-id": _request_id(number)}

    def parse(self, sim: ProviderSim, body: bytes) -> MessagesRequest:
        return parse_messages_request(body)

    def bad_request(self, error: BadRequest, number: int) -> dict[str, Any]:
        return anthropic_error(400, error.message, _request_id(number))

    def outage(self, status: int, number: int) -> dict[str, Any]:
        return anthropic_error(status, "Overloaded (simulated outage).", _request_id(number))

    def ratelimit_headers(self, buckets: Mapping[str, Bucket]) -> dict[str, str]:
        return ratelimit_headers(buckets, dt.datetime.now(dt.timezone.utc))

    def refusal(
        self, request: MessagesRequest, decision: Decision, max_in_flight: int | None, number: int
    ) -> tuple[int | None, dict[str, str], dict[str, Any]]:
        return rate_limit_refusal(request, decision, max_in_flight, _request_id(number))

    def answer(
        self, number: int, request: MessagesRequest, output_tokens: int, garbage: str
    ) -> dict[str, Any]:
        return message_body(
            message_id=f"msg_sim{number:07d}",
            request=request,
            output_tokens=output_tokens,
            garbage=garbage,
        )

    def stream(
        self,
        sim: ProviderSim,
        number: int,
        request: MessagesRequest,
        output_tokens: int,
        garbage: str,
        latency_s: float,
    ) -> Iterator[bytes]:
        """The events of a streamed answer, the latency spread before its text deltas and
        its ``message_delta`` (the server releases the request when the stream ends, either
        way)."""
        step_s = latency_s / (STREAM_PIECES + 1)
        for event, data in sse_events(
            message_id=f"msg_sim{number:07d}",
            request=request,
            output_tokens=output_tokens,
            garbage=garbage,
            pieces=STREAM_PIECES,
        ):
            if event in ("content_block_delta", "message_delta") and sim._stopping.wait(step_s):
                raise ConnectionAbortedError("the simulator stopped mid-stream")
            yield sse_bytes(event, data)


#: The dialect ``ProviderSim`` serves ``/v1/messages`` in.
MESSAGES = MessagesDialect()


def serve_messages(sim: ProviderSim, headers: Mapping[str, str], body: bytes) -> Response:
    """Answer one ``POST /v1/messages`` on ``sim``'s limits (called by ``ProviderSim.handle``)."""
    return serve(sim, MESSAGES, headers, body)
