"""What LiteLLM tells a callback about a call, read for :mod:`celery_fleet.contrib.litellm`.

The call's id, type and provider from the ``kwargs`` LiteLLM hands its callbacks, the
usage and provider headers of its response, and :func:`watch_stream`: a stream's slot is
given back when the caller lets go of the stream, which no LiteLLM callback reports.
Nothing here imports LiteLLM.

Example::

    used = provider_usage(kwargs, response_obj)   # None: keep the reservation
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

__all__ = [
    "GUARD_KEY",
    "call_id",
    "call_type",
    "provider",
    "in_event_loop",
    "parse_json",
    "field",
    "response_headers",
    "request_body",
    "asked_for_usage",
    "watch_stream",
]

log = logging.getLogger("celery_fleet")

#: The key of a streamed call's guard in LiteLLM's record of the call (``model_call_details``).
GUARD_KEY = "_celery_fleet_stream"


def call_id(kwargs: Mapping[str, Any] | None) -> str | None:
    if not kwargs:
        return None
    value = kwargs.get("litellm_call_id") or (kwargs.get("litellm_params") or {}).get(
        "litellm_call_id"
    )
    return str(value) if value else None


def call_type(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


def provider(kwargs: Mapping[str, Any]) -> str | None:
    value = kwargs.get("custom_llm_provider") or (kwargs.get("litellm_params") or {}).get(
        "custom_llm_provider"
    )
    return str(value) if value else None


def in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def parse_json(value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def field(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def response_headers(response: Any) -> Any:
    """The provider's HTTP headers LiteLLM keeps on a response (``_hidden_params``)."""
    hidden = getattr(response, "_hidden_params", None)
    if isinstance(hidden, Mapping):
        headers = hidden.get("headers") or hidden.get("additional_headers")
        if isinstance(headers, Mapping):
            return headers
    return getattr(response, "_response_headers", None)


def request_body(kwargs: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """What the call asked for: the body LiteLLM sent (``complete_input_dict``), else the
    call's own arguments with LiteLLM's ``optional_params`` (``max_tokens``,
    ``response_format``)."""
    if not isinstance(kwargs, Mapping):
        return None
    sent = (kwargs.get("additional_args") or {}).get("complete_input_dict")
    if isinstance(sent, Mapping):
        return sent
    optional = kwargs.get("optional_params")
    return {**kwargs, **optional} if isinstance(optional, Mapping) else kwargs


def asked_for_usage(kwargs: Mapping[str, Any]) -> bool:
    """Whether a streamed call asked the provider for its usage chunk
    (``stream_options={"include_usage": True}`` in the body LiteLLM sent). Without it
    LiteLLM counts the streamed text itself and logs that count as the usage: an estimate
    like the reservation, not the provider's word, so the reservation stands."""
    body = (kwargs.get("additional_args") or {}).get("complete_input_dict")
    options = body.get("stream_options") if isinstance(body, Mapping) else None
    if options is None:
        options = kwargs.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


class _StreamGuard:
    """Lives as long as LiteLLM's record of a streamed call; copies of the record share it.
    ``ended``: what each hook watching the call asked to run once the record is gone."""

    __slots__ = ("__weakref__", "ended")

    def __init__(self) -> None:
        self.ended: list[Callable[[], None]] = []

    def __copy__(self) -> _StreamGuard:
        return self

    def __deepcopy__(self, memo: Any) -> _StreamGuard:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, ("<celery-fleet stream guard>",))

    def __repr__(self) -> str:
        return "<celery-fleet stream guard>"


def watch_stream(record: MutableMapping[str, Any], ended: Callable[[], None]) -> None:
    """Call ``ended`` once LiteLLM's ``record`` of a streamed call is collected.

    LiteLLM's stream (``CustomStreamWrapper``) owns that record; a stream closed, broken
    out of or dropped before its end reports nothing to any callback, but once the caller
    lets go of it the record goes too (at once on the async path; at the next garbage
    collection on the sync one, whose objects hold each other in cycles). A guard object
    put in the record is collected with it, and its finalizer calls ``ended``.

    One guard serves every hook watching the call (two ``FleetHook`` s in
    ``litellm.callbacks``, one per fleet or limit): each adds its ``ended``. A guard made
    for the first hook alone left the second one's slot held until ``max_hold``."""
    guard = record.get(GUARD_KEY)
    if not isinstance(guard, _StreamGuard):
        guard = _StreamGuard()
        weakref.finalize(guard, _call_each, guard.ended)
        record[GUARD_KEY] = guard
    if ended not in guard.ended:
        guard.ended.append(ended)


def _call_each(callbacks: list[Callable[[], None]]) -> None:
    """Run every hook's ``ended`` (one failing does not stop the others)."""
    for ended in callbacks:
        try:
            ended()
        except Exception:  # a finalizer: nobody to raise to
            log.exception("celery-fleet: a stream's end handler failed")
