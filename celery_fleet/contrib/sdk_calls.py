"""The proxies :func:`celery_fleet.contrib.sdk.wrap` returns, and the model calls they make.

:class:`WrappedClient` and :class:`Route` follow attribute paths: a path leading to a model
call (``chat`` then ``completions``) gives another proxy, a model call gives a function
that holds a slot around it, anything else is the client's own attribute. The model call
itself goes through the ``max_retries``-adjusted copy of the client; everything else
through the client the user gave.
"""

from __future__ import annotations

import inspect
from typing import Any

from .answers import StreamAnswer, ajudge_quietly, judge_quietly
from .sdk import _ROUTES, MODEL_CALLS, Policy, aobserve, asettle, observe, settle
from .sdk_streams import (
    AsyncSlotStream,
    AsyncStreamManager,
    SlotStream,
    StreamManager,
    exit_slot,
)

__all__ = ["WrappedClient", "Route"]

_OWN = frozenset({"_outer", "_inner", "_policy", "_path", "_max_retries"})


class Route:
    """A proxy of a client's namespace on the way to a model call (``client.chat``)."""

    def __init__(self, outer: Any, inner: Any, policy: Policy, path: tuple[str, ...]) -> None:
        self._outer = outer
        self._inner = inner
        self._policy = policy
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name in _OWN:  # not set yet (copy, pickle): never ask the client for them
            raise AttributeError(name)
        path = (*self._path, name)
        if path in MODEL_CALLS:
            return _model_call(self._policy, self._inner, path)
        if path in _ROUTES:
            return Route(getattr(self._outer, name), getattr(self._inner, name), self._policy, path)
        return getattr(self._outer, name)

    def __dir__(self) -> list[str]:
        return dir(self._outer)

    def __repr__(self) -> str:
        return f"<fleet {self._policy.limit!r}: {self._outer!r}>"


class WrappedClient(Route):
    """What ``fleet.wrap(client, limit=...)`` returns: the client, its model calls in slots.

    ``with_options(...)``/``copy(...)`` return a wrapped copy on the same limit; the
    original client is ``wrapped.unwrapped``.
    """

    def __init__(self, outer: Any, inner: Any, policy: Policy, max_retries: int | None) -> None:
        super().__init__(outer, inner, policy, ())
        self._max_retries = max_retries

    @property
    def unwrapped(self) -> Any:
        """The client given to ``wrap`` (its calls take no slot)."""
        return self._outer

    def with_options(self, **options: Any) -> WrappedClient:
        """The client's ``with_options``, wrapped on the same limit."""
        outer = self._outer.with_options(**options)
        retries = options.get("max_retries", self._max_retries)
        inner = outer if retries is None else outer.with_options(max_retries=retries)
        return WrappedClient(outer, inner, self._policy, self._max_retries)

    copy = with_options

    def __enter__(self) -> WrappedClient:
        self._outer.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._outer.__exit__(*exc_info)
        if self._inner is not self._outer:
            self._inner.close()

    async def __aenter__(self) -> WrappedClient:
        await self._outer.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._outer.__aexit__(*exc_info)
        if self._inner is not self._outer:
            await self._inner.close()


async def _parsed(raw: Any) -> Any:
    """``raw.parse()`` of an async client's raw response: openai's (its legacy response)
    parses at once, anthropic's is awaited."""
    parsed = raw.parse()
    return await parsed if inspect.isawaitable(parsed) else parsed


def _model_call(policy: Policy, resource: Any, path: tuple[str, ...]) -> Any:
    """The function standing for ``resource.<path[-1]>``, holding a slot per call."""
    name = path[-1]
    method = getattr(resource, name)

    if name == "stream":  # Anthropic's messages.stream(...): a context manager
        manager = AsyncStreamManager if policy.is_async else StreamManager

        def stream(*args: Any, **kwargs: Any) -> Any:
            reserve = policy.reserve(path, kwargs)
            judged = kwargs if policy.judges(path) else None
            return manager(policy, reserve, lambda: method(*args, **kwargs), judged)

        return stream

    if policy.is_async:

        async def acall(*args: Any, **kwargs: Any) -> Any:
            reserve = policy.reserve(path, kwargs)
            raw_call = getattr(resource.with_raw_response, name)
            slot = policy.aslot(reserve)
            if kwargs.get("stream"):
                await slot.acquire()
                try:
                    raw = await raw_call(*args, **kwargs)
                    await aobserve(slot, raw.headers)
                    inner = await _parsed(raw)
                except BaseException as exc:
                    await slot.__aexit__(type(exc), exc, exc.__traceback__)
                    raise
                return AsyncSlotStream(inner, slot, policy, _answer(policy, path, kwargs))
            async with slot:
                raw = await raw_call(*args, **kwargs)
                await aobserve(slot, raw.headers)
                result = await _parsed(raw)
                await asettle(slot, policy, getattr(result, "usage", None))
                if policy.judges(path):
                    await ajudge_quietly(slot, result, kwargs)
            return result

        return acall

    def call(*args: Any, **kwargs: Any) -> Any:
        reserve = policy.reserve(path, kwargs)
        raw_call = getattr(resource.with_raw_response, name)
        slot = policy.slot(reserve)
        if kwargs.get("stream"):
            slot.acquire()
            try:
                raw = raw_call(*args, **kwargs)
                observe(slot, raw.headers)
                inner = raw.parse()
            except BaseException as exc:
                exit_slot(slot, exc)
                raise
            return SlotStream(inner, slot, policy, _answer(policy, path, kwargs))
        with slot:
            raw = raw_call(*args, **kwargs)
            observe(slot, raw.headers)
            result = raw.parse()
            settle(slot, policy, getattr(result, "usage", None))
            if policy.judges(path):
                judge_quietly(slot, result, kwargs)
        return result

    return call


def _answer(
    policy: Policy, path: tuple[str, ...], kwargs: dict[str, Any]
) -> tuple[StreamAnswer, dict[str, Any]] | None:
    """What a stream assembles to be judged at its end (None: it is not judged)."""
    return (StreamAnswer(), kwargs) if policy.judges(path) else None
