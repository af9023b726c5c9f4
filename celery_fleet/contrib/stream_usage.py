"""The usage a model response reports, read from its bytes as they pass: JSON or SSE.

An HTTP-level adapter (the httpx transport) sees a response as bytes, not as an SDK's
objects. :class:`UsageMeter` is fed those bytes (still content-encoded, as they come off
the wire) and says at the end how many tokens the call used and whether the stream
itself reported an error:

- a JSON body: its ``usage`` (OpenAI's or Anthropic's shape, see
  :func:`~celery_fleet.contrib.usage.usage_tokens`);
- a ``text/event-stream`` body: OpenAI's last chunk with a ``usage`` (sent when the request
  asks ``stream_options={"include_usage": true}``), or Anthropic's
  ``message_start.message.usage`` updated by each ``message_delta.usage`` (its counts are
  cumulative); an ``error`` event (Anthropic's ``overloaded_error`` mid-stream) becomes a
  signal for the slot's release.

No HTTP library is imported here: only bytes, JSON and zlib.

Example::

    meter = UsageMeter(content_type="text/event-stream", encoding="")
    for chunk in stream:
        meter.feed(chunk)
    meter.finish()
    meter.tokens  # 1234, or None when the body reported no usage
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import Any

from ..admission.providers import Signal
from .usage import CumulativeUsage, usage_tokens

__all__ = ["UsageMeter", "MAX_JSON_BYTES"]

log = logging.getLogger("celery_fleet")

#: A JSON body larger than this is not kept to be read for usage (the reservation stands).
MAX_JSON_BYTES = 8 * 1024 * 1024
#: An SSE event larger than this is skipped (no usage chunk is anywhere near it).
_MAX_EVENT_BYTES = 1024 * 1024


def _decompressor(encoding: str) -> Any:
    """A zlib decompressor for ``encoding``, None for identity; raises ValueError for an
    encoding zlib cannot read (br, zstd: the meter then reports no usage)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise ValueError(f"cannot read content-encoding {encoding!r}")


class UsageMeter:
    """Reads the tokens a response reports from its raw bytes; see the module docstring.

    ``content_type`` and ``encoding`` are the response's ``content-type`` and
    ``content-encoding`` headers. After :meth:`finish`, :attr:`tokens` is the usage (None
    when none was reported, or the body could not be read) and :attr:`signal` what an
    error event in the stream said (None when there was none).
    """

    def __init__(self, content_type: str, encoding: str = "") -> None:
        self.streaming = content_type.split(";")[0].strip().lower() == "text/event-stream"
        self.tokens: int | None = None
        self.signal: Signal | None = None
        #: The stream said it is complete (OpenAI's ``[DONE]``, Anthropic's ``message_stop``).
        self.ended = False
        self._finished = False
        self._buffer = bytearray()
        self._usage = CumulativeUsage()  # Anthropic's, merged across events
        self._broken = False
        try:
            self._decompress = _decompressor(encoding)
        except ValueError as exc:
            log.debug("celery-fleet: %s; the reservation stands", exc)
            self._decompress, self._broken = None, True

    def feed(self, raw: bytes) -> None:
        """Take the next bytes of the body, as sent (content-encoded)."""
        if self._broken or not raw:
            return
        try:
            data = self._decompress.decompress(raw) if self._decompress is not None else raw
        except zlib.error:
            self._broken = True
            return
        self._buffer += data
        if self.streaming:
            self._events()
        elif len(self._buffer) > MAX_JSON_BYTES:
            self._broken = True
            self._buffer.clear()

    def finish(self) -> None:
        """The body ended: read what is left (a JSON body's usage, a last SSE event)."""
        if self._broken or self._finished:
            return
        self._finished = True
        if self._decompress is not None:
            try:
                self._buffer += self._decompress.flush()
            except zlib.error:
                return
        if self.streaming:
            self._buffer += b"\n\n"
            self._events()
            return
        try:
            body = json.loads(bytes(self._buffer))
        except (ValueError, UnicodeDecodeError):
            return
        finally:
            self._buffer.clear()
        if isinstance(body, dict):
            self.tokens = usage_tokens(body.get("usage"))

    def _events(self) -> None:
        buffer = self._buffer.replace(b"\r\n", b"\n")  # CRLF may straddle two feeds: rare
        *events, rest = buffer.split(b"\n\n")
        self._buffer = bytearray(rest if len(rest) <= _MAX_EVENT_BYTES else b"")
        for event in events:
            data = b"\n".join(
                line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
            )
            if data == b"[DONE]":
                self.ended = True
            elif data:
                self._event(data)

    def _event(self, data: bytes) -> None:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "message_start" and isinstance(obj.get("message"), dict):
            self._merge(obj["message"].get("usage"))
        elif kind == "message_delta":
            self._merge(obj.get("usage"))
        elif kind == "message_stop":
            self.ended = True
        elif kind == "error" or (kind is None and isinstance(obj.get("error"), dict)):
            self.signal = _error_signal(obj.get("error"))
        elif obj.get("usage") is not None:  # OpenAI's usage chunk
            self.tokens = usage_tokens(obj["usage"])

    def _merge(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.tokens = self._usage.merge(usage)


def _error_signal(error: Any) -> Signal:
    """An error event of a stream as the signal a release reports."""
    kind = error.get("type") if isinstance(error, dict) else None
    detail = str(error.get("message", "")) if isinstance(error, dict) else ""
    if kind == "overloaded_error":
        return Signal("overloaded", 529, None, None, detail[:200])
    if kind in ("rate_limit_error", "rate_limit_exceeded"):
        return Signal("rate_limited", 429, None, None, detail[:200])
    return Signal("server_error", None, None, None, detail[:200])
