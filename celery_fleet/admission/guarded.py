"""Bulkheads for plain functions: ``@fleet.guarded("search-api")`` runs each call in a slot.

A tool an agent calls (a search API, a scraper, a vector store) needs the same protection
as the model: a cap on calls in flight, a rate, a breaker that stops calling it while it
fails. :func:`guarded` wraps a plain (sync) function so that every call is made inside
``fleet.slot(name, tokens=..., max_wait=..., validate=...)``: it waits its turn, the
breaker learns how it ended (exceptions are classified as the slot's ``__exit__`` does, and
a falsy ``validate(result)`` marks a failure), and with ``usage`` the reservation is
settled to the tokens the result says were used.

Example::

    @fleet.guarded("search-api", max_wait=5, validate=lambda hits: hits is not None)
    def search(query: str) -> list[str]:
        return client.search(query)

    @fleet.guarded("openai", tokens=lambda prompt: len(prompt) // 3 + 500,
                   usage=lambda resp: resp.usage.total_tokens)
    def complete(prompt: str) -> Any:
        return client.chat.completions.create(...)

    @fleet.guarded("openai", key=lambda tenant, prompt: tenant, lane="interactive")
    def answer(tenant: str, prompt: str) -> Any: ...

``key`` and ``lane`` (a limit with keys / lanes, see docs/limits.md) are fixed strings or
callables given the function's own arguments, like ``tokens``: each call is made in
``fleet.slot(name, key=..., lane=...)``. Everything is checked when the decorator is
applied (an unknown limit, bad ``tokens``, a fixed key or lane the limit cannot take, a
key or lane on a limit without keys or lanes, a callable that is not one), so a typo fails
at import; only a callable's answer is checked per call. This module knows nothing about
Celery.
"""

from __future__ import annotations

import functools
import inspect
import string
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from ..checks import check_max_wait
from ..errors import ConfigError
from .lanes import check_lane
from .tenancy import check_key

if TYPE_CHECKING:
    from .aslot import AsyncSlot
    from .config import LimitConfig
    from .core import Admission
    from .slot import Slot

__all__ = ["guarded", "aguarded", "ASlotSource", "Guard", "SlotSource", "Choice"]

P = ParamSpec("P")
R = TypeVar("R")

#: A guard's ``key`` or ``lane``: fixed, a callable of the function's arguments, or None.
Choice = str | Callable[..., str | None] | None


class _Limits(Protocol):
    def limit(self, name: str) -> LimitConfig: ...


class _LimitSource(Protocol):
    """What a guard checks when it is applied: the limit's configuration."""

    @property
    def admission(self) -> _Limits: ...


class SlotSource(Protocol):
    """What :func:`guarded` needs of a :class:`~celery_fleet.Fleet`: the limits, and
    blocking slots (:mod:`celery_fleet.contrib.pybreaker` reaches the whole Admission)."""

    admission: Admission

    def slot(
        self,
        name: str,
        tokens: int = 0,
        max_wait: float | None = None,
        validate: Callable[[Any], object] | None = None,
        jitter: float | None = None,
        *,
        lane: str | None = None,
        key: str | None = None,
    ) -> Slot: ...


class ASlotSource(_LimitSource, Protocol):
    """What :func:`aguarded` needs of a :class:`~celery_fleet.Fleet`: the limits, and
    slots for coroutines."""

    def aslot(
        self,
        name: str,
        tokens: int = 0,
        max_wait: float | None = None,
        validate: Callable[[Any], object] | None = None,
        jitter: float | None = None,
        *,
        lane: str | None = None,
        key: str | None = None,
    ) -> AsyncSlot: ...


class Guard(Protocol):
    """The decorator :func:`guarded` returns: the same signature, each call in a slot."""

    def __call__(self, func: Callable[P, R], /) -> Callable[P, R]: ...


def guarded(
    fleet: SlotSource,
    name: str,
    *,
    tokens: int | Callable[..., int] = 0,
    max_wait: float | None = None,
    validate: Callable[[Any], object] | None = None,
    usage: Callable[[Any], int] | None = None,
    key: Choice = None,
    lane: Choice = None,
) -> Guard:
    """A decorator making every call of a plain function inside ``fleet.slot(name, ...)``.

    Args:
        name: the limit (a key of ``fleet_limits``).
        tokens: the reservation: an int, or a callable given the function's own arguments
            that returns one (checked per call, before asking Redis).
        max_wait: seconds a call waits for admission (default: as ``fleet.slot``).
        validate: ``result -> bool``; falsy (or raising) marks the call a failure for the
            breaker; the result is returned all the same (default: the limit's hook).
        usage: ``result -> tokens actually used``; the reservation is settled to it.
        key: the caller's key on a limit with ``keys`` / ``weights`` (e.g. a tenant id):
            a str, or a callable given the function's arguments returning one (None: the
            default key). A template like ``"{tenant}"`` is refused: write a callable.
        lane: one of the limit's priority lanes: a name, or a callable given the
            function's arguments returning one (None: the limit's lowest lane).

    Refusals raise as the slot does (``Throttled``, ``CircuitOpen``), so does a provider
    429 / overload (``Throttled``) or an exhausted quota (``QuotaExhausted``); any other
    exception of the function propagates unchanged after the breaker has seen it.
    """
    cfg = _check_guard(fleet, name, tokens, max_wait, validate, usage)
    pick = _Picker(cfg, key, lane)

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        _check_plain_function(func, name)

        @functools.wraps(func)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            if callable(tokens):
                reserve = cfg.check_tokens(tokens(*args, **kwargs), "tokens(...)")
            else:
                reserve = tokens
            chosen_key, chosen_lane = pick(args, kwargs)
            with fleet.slot(
                name,
                tokens=reserve,
                max_wait=max_wait,
                validate=validate,
                key=chosen_key,
                lane=chosen_lane,
            ) as slot:
                result = func(*args, **kwargs)
                slot.validate(result)
                if usage is not None:
                    slot.settle(usage(result))
            return result

        return call

    return decorate


def aguarded(
    fleet: ASlotSource,
    name: str,
    *,
    tokens: int | Callable[..., int] = 0,
    max_wait: float | None = None,
    validate: Callable[[Any], object] | None = None,
    usage: Callable[[Any], int] | None = None,
    key: Choice = None,
    lane: Choice = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:func:`guarded` for coroutine functions: each call awaited inside
    ``fleet.aslot(name, ...)``, the loop never blocked. Same arguments and checks;
    ``validate`` may be a coroutine function."""
    cfg = _check_guard(fleet, name, tokens, max_wait, validate, usage)
    pick = _Picker(cfg, key, lane)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.iscoroutinefunction(inspect.unwrap(func)):
            raise ConfigError(
                f"@fleet.aguarded({name!r}) takes coroutine functions (async def); "
                f"{func!r} is not one: use @fleet.guarded for plain functions"
            )

        @functools.wraps(func)
        async def call(*args: Any, **kwargs: Any) -> Any:
            if callable(tokens):
                reserve = cfg.check_tokens(tokens(*args, **kwargs), "tokens(...)")
            else:
                reserve = tokens
            chosen_key, chosen_lane = pick(args, kwargs)
            slot = fleet.aslot(
                name,
                tokens=reserve,
                max_wait=max_wait,
                validate=validate,
                key=chosen_key,
                lane=chosen_lane,
            )
            async with slot:
                result = await func(*args, **kwargs)
                await slot.validate(result)
                if usage is not None:
                    await slot.settle(usage(result))
            return result

        return call

    return decorate


def _check_guard(
    fleet: _LimitSource,
    name: str,
    tokens: object,
    max_wait: float | None,
    validate: object,
    usage: object,
) -> LimitConfig:
    """Everything a guard can check when it is applied; the limit's configuration."""
    if callable(name) and not isinstance(name, str):
        raise ConfigError(
            f"guarded needs the limit's name: write @fleet.guarded('limit'), with "
            f"parentheses (got the function {name!r})"
        )
    cfg = fleet.admission.limit(name)
    if not callable(tokens):
        cfg.check_tokens(tokens)
    if max_wait is not None:
        check_max_wait(max_wait)
    if validate is not None and not callable(validate):
        raise ConfigError(f"validate must be a callable result -> bool, got {validate!r}")
    if usage is not None:
        if not callable(usage):
            raise ConfigError(f"usage must be a callable result -> tokens, got {usage!r}")
        if not cfg.token_windows:
            raise ConfigError(
                f"usage settles tokens, but limit {name!r} has no token budget "
                f"(set 'tpm' or 'tokens' in fleet_limits[{name!r}], or drop usage=)"
            )
    return cfg


class _Picker:
    """A guard's ``key`` and ``lane``: checked at decoration when fixed (or when the limit
    cannot take one at all), computed and checked per call when callables."""

    def __init__(self, cfg: LimitConfig, key: Choice, lane: Choice) -> None:
        where = f"@fleet.guarded({cfg.name!r})"
        for what, value in (("key", key), ("lane", lane)):
            if value is not None and not isinstance(value, str) and not callable(value):
                raise ConfigError(
                    f"{where}: {what} must be a str or a callable taking the function's "
                    f"arguments, got {value!r}"
                )
        if key is not None:
            if not cfg.keyed:
                raise ConfigError(
                    f"{where}: key={key!r}, but limit {cfg.name!r} has no keys: add "
                    f'"keys": {{...}} or "weights": {{}} to fleet_limits[{cfg.name!r}]'
                )
            if isinstance(key, str):
                _refuse_template(key, where)
                check_key(key, f"{where}: key")
        if lane is not None and cfg.lanes is None:
            raise ConfigError(
                f"{where}: lane={lane!r}, but limit {cfg.name!r} has no lanes "
                f"(declare them in fleet_limits[{cfg.name!r}]['lanes'])"
            )
        if isinstance(lane, str):
            check_lane(cfg.lanes, cfg.name, lane)
        self.cfg, self.key, self.lane = cfg, key, lane

    def __call__(self, args: Any, kwargs: Any) -> tuple[str | None, str | None]:
        key, lane = self.key, self.lane
        if callable(key):
            key = key(*args, **kwargs)
            if key is not None:
                check_key(key, "the value of key(...)")
        if callable(lane):
            lane = lane(*args, **kwargs)
            check_lane(self.cfg.lanes, self.cfg.name, lane)
        return key, lane


def _refuse_template(key: str, where: str) -> None:
    """A fixed key that reads as a template (``"{tenant}"``) would put every call under
    that one literal key: @fleet_task binds templates, a guard takes a callable."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(key) if f]
    except ValueError:
        return  # unbalanced braces: not a template, a key like any other
    if fields:
        raise ConfigError(
            f"{where}: key={key!r} looks like a template, which guarded does not fill in "
            f"(every call would share that literal key): pass a callable, e.g. "
            f"key=lambda {fields[0]}, *args, **kwargs: {fields[0]}"
        )


def _check_plain_function(func: object, name: str) -> None:
    """Refuse what a slot cannot hold: its call would return before the work is done."""
    if not callable(func):
        raise ConfigError(f"@fleet.guarded({name!r}) decorates a function, got {func!r}")
    target = inspect.unwrap(func)
    if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
        raise ConfigError(
            f"@fleet.guarded({name!r}) takes plain (sync) functions; {func!r} is async "
            f"(its call would return before the work is done)"
        )
    if inspect.isgeneratorfunction(target):
        raise ConfigError(
            f"@fleet.guarded({name!r}) takes plain functions; {func!r} is a generator "
            f"(its work runs after the call returns): use `with fleet.slot(...)` inside it"
        )
