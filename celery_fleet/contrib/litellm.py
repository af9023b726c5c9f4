"""LiteLLM: ``litellm.callbacks = [FleetHook(fleet)]`` puts every
``litellm.completion`` / ``litellm.acompletion`` under the fleet's limits: the fleet's only
limit, or with several the one named like the call's LiteLLM provider (``"openai"``,
``"anthropic"``); ``limit=`` names another (see :class:`FleetHook`).

Each call holds one slot of its limit from just before its HTTP request until its answer:
the fleet's budgets and in-flight cap apply fleet-wide, the reservation (an estimate from
the prompt and ``max_tokens``) is settled from the response's ``usage``, the provider's
rate-limit headers are observed, and a failure is classified, so a 429 pauses the limit
for every worker and a 5xx counts against its breaker.

Example::

    import litellm
    from celery_fleet.contrib.litellm import FleetHook

    litellm.callbacks = [FleetHook(fleet)]   # or FleetHook(fleet, limit="openai")
    litellm.completion(model="openai/gpt-4o-mini", messages=[...])   # waits its turn

Where LiteLLM lets a callback act (checked against litellm 1.110, its Python path):

- ``acompletion``: the slot is taken in ``async_pre_call_deployment_hook``, awaited in the
  call's own task (the loop never blocks, and a refusal, ``Throttled`` or ``CircuitOpen``,
  reaches the caller); it is released in ``async_post_call_success_deployment_hook`` /
  ``async_post_call_failure_deployment_hook``, awaited before ``acompletion`` returns.
  LiteLLM calls the blocking ``log_pre_api_call`` inside the event loop as well: the hook
  never blocks there.
- ``completion``: the only callback run before the request is ``log_pre_api_call``, in
  the caller's thread, and LiteLLM swallows what it raises, so it cannot refuse: it waits
  until admitted, with no deadline (through an open breaker too, until a probe passes). It
  is released in ``log_post_api_call``, in the caller's thread before ``completion``
  returns (``log_success_event`` runs later on LiteLLM's logging thread), or in
  ``log_failure_event``, which LiteLLM runs synchronously on failure.
- Streams hold their slot until the stream ends (the success or failure event), settled
  only from the provider's usage chunk (``stream_options={"include_usage": True}``). A
  stream left early reports nothing: the slot comes back when the caller lets go of the
  stream (a guard in LiteLLM's record of the call, see
  :func:`~celery_fleet.contrib.litellm_calls.watch_stream`).
- On a limit with ``quality``, the answer is judged before the release, with the body
  LiteLLM sent (its ``max_tokens`` and ``response_format``), and the verdict rides on
  the release; a stream is judged on the complete response LiteLLM assembles for its
  success event (a stream left early has none, and is not judged). Judging never raises.
- A call whose release never comes (a path that skips the events) is released after
  ``max_hold`` seconds, and forgotten; its lease would otherwise be renewed for as long
  as the process lives.

LiteLLM's own retries (``num_retries``) each ask for admission again. Calls that name no
limit (see ``limit``) pass through untouched; embeddings and other endpoints are not
covered. LiteLLM is an optional dependency: ``pip install 'celery-fleet[litellm]'``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

try:
    import litellm
    from litellm.integrations.custom_logger import CustomLogger
except ImportError as exc:  # the [litellm] extra is not installed
    raise ImportError(
        "celery_fleet.contrib.litellm needs LiteLLM: pip install 'celery-fleet[litellm]' "
        "(or pip install litellm)"
    ) from exc

from ..admission.aslot import AsyncSlot
from ..admission.core import Admission
from ..admission.providers import OK, Signal, classify
from ..admission.slot import Slot
from ..checks import check_max_wait
from ..errors import Backpressure, ConfigError, FleetError, attach_pushback
from .answers import ajudge_quietly, judge_quietly, judges
from .held import Held, HeldCalls
from .litellm_calls import asked_for_usage, watch_stream
from .litellm_calls import call_id as _call_id
from .litellm_calls import call_type as _call_type
from .litellm_calls import field as _get
from .litellm_calls import in_event_loop as _in_event_loop
from .litellm_calls import parse_json as _json
from .litellm_calls import provider as _provider
from .litellm_calls import request_body as _request_body
from .litellm_calls import response_headers as _response_headers
from .usage import estimate_tokens, usage_tokens

__all__ = ["FleetHook", "DEFAULT_MAX_HOLD_S"]

log = logging.getLogger("celery_fleet")

#: How long a call may hold its slot before the hook gives it back itself (s): above the
#: 600 s read deadline of LiteLLM's default HTTP clients (its ``request_timeout`` is longer).
DEFAULT_MAX_HOLD_S = 900.0

#: The call types the hook admits: chat completions (a Router's calls included).
_COMPLETIONS = frozenset({"completion", "acompletion"})

LimitChoice = str | Mapping[str, str] | Callable[[str], str | None]
TokenChoice = int | Callable[[Mapping[str, Any]], int] | None


class _Fleet(Protocol):
    """What the hook needs of a :class:`~celery_fleet.Fleet`."""

    admission: Admission

    def slot(self, name: str, tokens: int = 0, max_wait: float | None = None) -> Slot: ...

    def aslot(self, name: str, tokens: int = 0, max_wait: float | None = None) -> AsyncSlot: ...


class FleetHook(CustomLogger):
    """A LiteLLM callback holding a fleet slot around every completion (module docstring).

    ``limit``: the limit of every call (``"openai"``); a mapping from model to limit,
    looked up as ``"provider/model"`` then ``"model"``, then ``"*"`` (a model it does not
    name passes through); or a callable ``"provider/model" -> limit or None``. Left out:
    the fleet's only limit; with several, the limit named like each call's LiteLLM
    provider (``openai/gpt-4o`` draws on ``"openai"``; a provider with no limit of its
    name passes through, with a warning once per provider), a :class:`ConfigError` if
    no limit is named like a LiteLLM provider.
    ``tokens``: the reservation: default :func:`~celery_fleet.contrib.usage.estimate_tokens`
    of the request body, an int, or a callable ``body -> int``.
    ``max_wait``: how long ``acompletion`` waits for its turn before raising ``Throttled``
    (default: the fleet's ``fleet_max_wait``, or the running task's). ``max_hold``:
    seconds after which a call's slot is released even if LiteLLM never reported its end.

    Example::

        litellm.callbacks = [FleetHook(fleet, limit={"openai/gpt-4o": "openai", "*": "llm"})]
    """

    def __init__(
        self,
        fleet: _Fleet,
        limit: LimitChoice | None = None,
        *,
        tokens: TokenChoice = None,
        max_wait: float | None = None,
        max_hold: float = DEFAULT_MAX_HOLD_S,
    ) -> None:
        super().__init__()
        self.fleet = fleet
        self.limit = _default_limit(fleet) if limit is None else _check_limit(fleet, limit)
        if not (tokens is None or callable(tokens)):
            for name in _named_limits(self.limit):
                fleet.admission.limit(name).check_tokens(tokens)
        self.tokens = tokens
        self.max_wait = None if max_wait is None else check_max_wait(max_wait)
        if (
            isinstance(max_hold, bool)
            or not isinstance(max_hold, (int, float))
            or not (0 < max_hold < math.inf)
        ):
            raise ConfigError(f"max_hold must be a number of seconds > 0, got {max_hold!r}")
        self.max_hold_s = float(max_hold)
        self.calls = HeldCalls(self.max_hold_s, name="celery-fleet-litellm")
        self._warned_loop = False

    # -- what a call is ---------------------------------------------------------------

    def limit_for(self, model: str, provider: str | None = None) -> str | None:
        """The limit a call of ``model`` (as LiteLLM names it) draws on, or None."""
        full = model if not provider or model.startswith(f"{provider}/") else f"{provider}/{model}"
        if isinstance(self.limit, str):
            return self.limit
        if isinstance(self.limit, Mapping):
            bare = full.split("/", 1)[1] if "/" in full else full
            for name in (full, model, bare, "*"):
                if name in self.limit:
                    return self.limit[name]
            return None
        chosen = self.limit(full)
        if chosen is not None:
            self.fleet.admission.limit(chosen)  # ConfigError naming the known limits
        return chosen

    def tokens_for(self, limit: str, body: Mapping[str, Any]) -> int:
        """The tokens to reserve on ``limit`` for a request ``body`` (see ``tokens``): 0 on
        a limit without a token budget; the estimate at most a full bucket."""
        cfg = self.fleet.admission.limit(limit)
        ceiling = cfg.max_tokens_per_call
        if ceiling is None:
            return 0
        if self.tokens is None:
            return min(estimate_tokens(body), ceiling)
        if callable(self.tokens):
            return cfg.check_tokens(self.tokens(body), "tokens(body)")
        return self.tokens

    @property
    def holding(self) -> list[str]:
        """The ``litellm_call_id`` of every call holding a slot now."""
        return self.calls.ids()

    # -- acompletion: awaited in the call's own task ------------------------------------

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: Any
    ) -> dict[str, Any] | None:
        """Wait for admission without blocking the loop; a refusal reaches the caller."""
        call_id = _call_id(kwargs)
        if _call_type(call_type) not in _COMPLETIONS or call_id is None or call_id in self.calls:
            return None
        model = str(kwargs.get("model") or "")
        limit = self.limit_for(model, kwargs.get("custom_llm_provider"))
        if limit is None:
            return None
        aslot = self.fleet.aslot(
            limit, tokens=self.tokens_for(limit, kwargs), max_wait=self.max_wait
        )
        await aslot.acquire()
        stream = bool(kwargs.get("stream"))
        self.calls.hold(call_id, aslot, stream)
        task = asyncio.current_task()
        if task is not None and not stream:  # a stream may outlive the task that opened it
            # Cancelled (a CancelledError skips every failure hook) or ended otherwise
            # without a release: give the slot back now rather than after max_hold.
            task.add_done_callback(lambda _: self.calls.orphan(call_id))
        return None

    async def async_post_call_success_deployment_hook(
        self, request_data: dict[str, Any], response: Any, call_type: Any
    ) -> Any:
        """Settle from the response's usage, observe its headers, release: before return."""
        await self._afinish(_call_id(request_data), OK, response, request=request_data)
        return None

    async def async_post_call_failure_deployment_hook(
        self,
        request_data: Mapping[str, Any],
        exception: Exception,
        call_type: Any,
        fallback_depth: int | None = None,
    ) -> None:
        """Release, telling the fleet what the failure was (a 429 pauses the limit)."""
        await self._afinish(_call_id(request_data), classify(exception), exception=exception)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """The end of a stream, or a call the deployment hooks did not see end."""
        await self._afinish(_call_id(kwargs), OK, response_obj, _settles(kwargs), request=kwargs)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        exception = kwargs.get("exception")
        await self._afinish(_call_id(kwargs), classify(exception), exception=exception)

    async def _afinish(
        self,
        call_id: str | None,
        signal: Signal,
        response: Any = None,
        settle: bool = True,
        exception: BaseException | None = None,
        request: Mapping[str, Any] | None = None,
    ) -> None:
        held = self.calls.take(call_id, asyncio_slot=True)
        if held is None:
            return
        aslot = held.slot
        assert isinstance(aslot, AsyncSlot)
        try:
            await self._aend(held, aslot, signal, response, settle, exception, request)
        except BaseException:  # cancelled, its loop ending: a thread releases it instead
            if aslot.slot.lease_id is not None and call_id is not None:
                self.calls.hand_back(call_id, held)
            raise

    async def _aend(
        self,
        held: Held,
        aslot: AsyncSlot,
        signal: Signal,
        response: Any,
        settle: bool,
        exception: BaseException | None,
        request: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            used = usage_tokens(_get(response, "usage"))
            if used is not None and signal is OK and settle:
                await aslot.settle(used)
            headers = _response_headers(response)
            if headers:
                await aslot.observe(headers)
        except FleetError as exc:
            log.warning("celery-fleet: settling a LiteLLM call of %r failed: %s", held.limit, exc)
        if self._judges(held, signal, response):
            await ajudge_quietly(aslot, response, _request_body(request))
        try:
            await aslot.release(signal)
        except FleetError as exc:
            log.warning(
                "celery-fleet: releasing %r failed (%s); its lease expires", held.limit, exc
            )
        _mark_pushback(held.blocking, signal, exception)

    # -- completion: LiteLLM's blocking logging hooks -------------------------------------

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
        """Block the calling thread until admitted (never inside an event loop)."""
        call_id = _call_id(kwargs)
        if call_id is not None and call_id in self.calls:
            if kwargs.get("stream"):  # held: acompletion's, or a second attempt of this one
                watch_stream(kwargs, lambda: self.calls.orphan(call_id))
            return
        if _call_type(kwargs.get("call_type")) != "completion" or call_id is None:
            return  # not a completion
        if _in_event_loop():  # waiting would block the loop, and the releases it runs
            if not self._warned_loop:
                self._warned_loop = True
                log.warning(
                    "celery-fleet: a synchronous litellm.completion inside a running event "
                    "loop is not admitted by FleetHook; use litellm.acompletion"
                )
            return
        limit = self.limit_for(str(model or kwargs.get("model") or ""), _provider(kwargs))
        if limit is None:
            return
        body = (kwargs.get("additional_args") or {}).get("complete_input_dict")
        if not isinstance(body, Mapping):
            body = {"messages": messages, **(kwargs.get("optional_params") or {})}
        tokens = self.tokens_for(limit, body)
        while True:  # LiteLLM ignores what this hook raises: it cannot refuse, so it waits
            slot = self.fleet.slot(limit, tokens=tokens, max_wait=math.inf)
            try:
                slot.acquire()
                break
            except Backpressure as refused:  # an open breaker, or the store-down policy
                time.sleep(max(refused.wait_ms, 50) / 1000.0)
        self.calls.hold(call_id, slot, bool(kwargs.get("stream")))
        if kwargs.get("stream"):
            watch_stream(kwargs, lambda: self.calls.orphan(call_id))

    def log_post_api_call(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """The answer arrived (caller's thread, before ``completion`` returns): release."""
        call_id = _call_id(kwargs)
        held = self.calls.get(call_id)
        if held is None or held.stream or isinstance(held.slot, AsyncSlot):
            return
        answer = _json(kwargs.get("original_response"))
        if not isinstance(answer, Mapping) or "choices" not in answer:
            return  # not a completion (an error text): the failure event tells
        self._finish(call_id, OK, answer, kwargs.get("response_headers"), request=kwargs)

    def log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """The end of a sync stream (LiteLLM's logging thread)."""
        headers = _response_headers(response_obj)
        self._finish(_call_id(kwargs), OK, response_obj, headers, _settles(kwargs), request=kwargs)

    def log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """A failed call (LiteLLM runs it in the caller's thread): classify, release."""
        exception = kwargs.get("exception")
        self._finish(_call_id(kwargs), classify(exception), exception=exception)

    def _finish(
        self,
        call_id: str | None,
        signal: Signal,
        response: Any = None,
        headers: Any = None,
        settle: bool = True,
        exception: BaseException | None = None,
        request: Mapping[str, Any] | None = None,
    ) -> None:
        held = self.calls.take(call_id, asyncio_slot=False)
        if held is None:
            return
        slot = held.blocking
        try:
            used = usage_tokens(_get(response, "usage"))
            if used is not None and signal is OK and settle:
                slot.settle(used)
            if headers:
                slot.observe(headers)
        except FleetError as exc:
            log.warning("celery-fleet: settling a LiteLLM call of %r failed: %s", held.limit, exc)
        if self._judges(held, signal, response):
            judge_quietly(slot, response, _request_body(request))
        try:
            slot.release(signal)
        except FleetError as exc:
            log.warning(
                "celery-fleet: releasing %r failed (%s); its lease expires", held.limit, exc
            )
        _mark_pushback(slot, signal, exception)

    def _judges(self, held: Held, signal: Signal, response: Any) -> bool:
        """Whether this call's answer is judged: it succeeded, with an answer, on a limit
        with ``quality``."""
        return signal is OK and response is not None and judges(self.fleet.admission, held.limit)

    def close(self) -> None:
        """Stop the thread that releases forgotten slots (see ``max_hold``)."""
        self.calls.close()

    def __repr__(self) -> str:
        return f"<FleetHook limit={self.limit!r} holding={len(self.calls)}>"


def _mark_pushback(slot: Slot, signal: Signal, exception: BaseException | None) -> None:
    """Mark LiteLLM's exception of a provider 429 or overload with the fleet's ``Throttled``
    (what leaving ``fleet.slot`` with it raises), so a fleet task whose body lets
    ``litellm.RateLimitError`` escape reschedules instead of failing. The hook itself
    cannot raise it: LiteLLM raises its own exception, and swallows a callback's."""
    if exception is None or signal.kind not in ("rate_limited", "overloaded"):
        return
    try:
        slot.raise_pushback(signal, exception)
    except Backpressure as refusal:
        # acompletion's hooks get a copy of the live exception sharing its chain only
        for link in (exception, exception.__cause__, exception.__context__):
            if link is not None:
                attach_pushback(link, refusal)
    except FleetError:  # a quota: the task fails fast, as with fleet.slot
        pass


def _check_limit(fleet: _Fleet, limit: Any) -> LimitChoice:
    if isinstance(limit, str):
        fleet.admission.limit(limit)  # ConfigError naming the known limits
        return limit
    if isinstance(limit, Mapping):
        if not limit:
            raise ConfigError("limit must name at least one model, got an empty mapping")
        for model, name in limit.items():
            if not isinstance(model, str) or not isinstance(name, str):
                raise ConfigError(f"limit maps model names to limit names, got {model!r}: {name!r}")
            fleet.admission.limit(name)
        return dict(limit)
    if callable(limit):
        return limit  # type: ignore[no-any-return]
    raise ConfigError(
        f"limit must be a limit name, a mapping model -> limit or a callable, got {limit!r}"
    )


class ByProvider:
    """The limit of a call is the one named like its LiteLLM provider (``FleetHook``
    without ``limit``, on a fleet of several limits): ``"openai/gpt-4o"`` -> ``"openai"``.
    A bare model name is resolved by LiteLLM (``gpt-4o`` -> ``openai``). A provider the
    fleet has no limit for passes through, with a warning the first time."""

    def __init__(self, fleet: _Fleet) -> None:
        self.fleet = fleet
        self._warned: set[str] = set()

    def __call__(self, model: str) -> str | None:
        provider = model.split("/", 1)[0] if "/" in model else _litellm_provider(model)
        if not provider:
            return None
        if provider in self.fleet.admission.limits:
            return provider
        if provider not in self._warned:
            self._warned.add(provider)
            log.warning(
                "celery-fleet: FleetHook: no limit named %r for %r; its calls pass through "
                "unadmitted (known limits: %s; pass limit= to map it)",
                provider,
                model,
                ", ".join(sorted(self.fleet.admission.limits)),
            )
        return None

    def __repr__(self) -> str:
        return "<by provider>"


def _litellm_provider(model: str) -> str | None:
    """LiteLLM's provider for a bare model name (``gpt-4o`` -> ``openai``), or None."""
    try:
        return str(litellm.get_llm_provider(model)[1]) or None
    except Exception:  # LiteLLM raises its BadRequestError for a model it does not know
        return None


def _default_limit(fleet: _Fleet) -> LimitChoice:
    """``FleetHook(fleet)``: the fleet's only limit, else the limit named like each call's
    provider, if any limit is named like a LiteLLM provider."""
    names = sorted(fleet.admission.limits)
    if len(names) == 1:
        return names[0]
    providers = {str(getattr(p, "value", p)) for p in litellm.provider_list}
    if names and any(name in providers for name in names):
        return ByProvider(fleet)
    raise ConfigError(
        "FleetHook(fleet) needs limit= when the fleet has "
        + (
            f"several limits and none is named like a LiteLLM provider: {', '.join(names)}; "
            if names
            else "no limits (set fleet_limits); "
        )
        + 'pass limit="name", a mapping model -> limit, or a function'
    )


def _named_limits(limit: LimitChoice) -> list[str]:
    """The limits ``limit`` names up front (none for a callable)."""
    if isinstance(limit, str):
        return [limit]
    if isinstance(limit, Mapping):
        return list(limit.values())
    return []


def _settles(kwargs: Mapping[str, Any]) -> bool:
    """Whether the logged usage is the provider's: a stream's only when the request asked
    for its usage chunk (see :func:`~celery_fleet.contrib.litellm_calls.asked_for_usage`)."""
    return not kwargs.get("stream") or asked_for_usage(kwargs)
