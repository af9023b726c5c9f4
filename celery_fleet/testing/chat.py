"""``POST /v1/chat/completions``: the simulator's OpenAI endpoint, in OpenAI's dialect.

The path of a request (parse, outage, admission, latency, log) is
:func:`~celery_fleet.testing.serving.serve`'s, shared with Anthropic's ``/v1/messages``;
this is what OpenAI's wire format adds (:mod:`celery_fleet.testing.wire`): its bodies and
errors, ``x-ratelimit-*`` headers and ``retry-after-ms``, and ``stream: true`` as
``chat.completion.chunk`` events ending in ``[DONE]``, the first at once and the others
spread over the latency.

Example::

    with ProviderSim(rpm=600, tpm=90_000, max_in_flight=8) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
        client.chat.completions.create(model="sim", messages=[...])
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .wire import (
    BadRequest,
    ChatRequest,
    completion_body,
    error_body,
    parse_chat_request,
    rate_limit_refusal,
    ratelimit_headers,
    stream_frames,
)

if TYPE_CHECKING:
    from .limiter import Bucket, Decision
    from .provider import ProviderSim

__all__ = ["CHAT", "ChatDialect"]


class ChatDialect:
    """OpenAI's chat completions API (see the module docstring)."""

    def headers(self, number: int) -> dict[str, str]:
        return {"x-request-id": f"req_sim{number:07d}"}

    def parse(self, sim: ProviderSim, body: bytes) -> ChatRequest:
        return parse_chat_request(body, sim.default_max_tokens)

    def bad_request(self, error: BadRequest, number: int) -> dict[str, Any]:
        return error_body(error.message, "invalid_request_error", None, error.param)

    def outage(self, status: int, number: int) -> dict[str, Any]:
        message = "The server is overloaded or not ready yet (simulated outage)."
        return error_body(message, "server_error")

    def ratelimit_headers(self, buckets: Mapping[str, Bucket]) -> dict[str, str]:
        return ratelimit_headers(buckets)

    def refusal(
        self, request: ChatRequest, decision: Decision, max_in_flight: int | None, number: int
    ) -> tuple[int | None, dict[str, str], dict[str, Any]]:
        return rate_limit_refusal(request, decision, max_in_flight)

    def answer(
        self, number: int, request: ChatRequest, output_tokens: int, garbage: str
    ) -> dict[str, Any]:
        return completion_body(
            request_id=f"chatcmpl-sim{number:07d}",
            created=int(time.time()),
            request=request,
            completion_tokens=output_tokens,
            garbage=garbage,
        )

    def stream(
        self,
        sim: ProviderSim,
        number: int,
        request: ChatRequest,
        output_tokens: int,
        garbage: str,
        latency_s: float,
    ) -> Iterator[bytes]:
        """The frames of the answer, the first at once, the others over the latency."""
        answer = self.answer(number, request, output_tokens, garbage)
        frames = stream_frames(answer, request.include_usage)
        for i, frame in enumerate(frames):
            if i and sim._stopping.wait(latency_s / (len(frames) - 1)):
                raise ConnectionAbortedError("the simulator stopped mid-stream")
            yield frame


#: The dialect ``ProviderSim`` serves ``/v1/chat/completions`` in.
CHAT = ChatDialect()
