"""Admission logic written once, run by a blocking or an asyncio store (sans-IO).

Each operation of :class:`~celery_fleet.admission.core.Admission` (acquire with the store-down
policy and its retry, release, settle, observe, renew, leave) is a generator that *yields*
the Redis calls it needs (:class:`ScriptCall`, :class:`PackedCalls`) and receives their
replies, or has the store's error thrown in at the ``yield``; its return value is the
answer. :func:`drive` runs one on a :class:`~celery_fleet.store.sync.RedisStore` (blocking
calls), :func:`adrive` on an :class:`~celery_fleet.store.aio.AsyncStore` (awaited calls), so
``fleet.slot`` and ``fleet.aslot`` share every decision and differ only in how they wait.

This module knows nothing about Celery, nor about Redis clients.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

__all__ = ["ScriptCall", "PackedCalls", "Steps", "drive", "adrive"]

T = TypeVar("T")


@dataclass(frozen=True)
class ScriptCall:
    """Run one script by name (``store.run``)."""

    script: str
    keys: list[str]
    args: list[Any]


@dataclass(frozen=True)
class PackedCalls:
    """Send packed script calls in one round trip (``store.send``): the replies, in order."""

    commands: tuple[tuple[str, bytes], ...]


Call = ScriptCall | PackedCalls
#: An operation: yields calls, receives replies, returns its answer.
Steps = Generator[Call, Any, T]


class _Store(Protocol):
    def run(self, script: str, keys: list[str], args: list[Any]) -> Any: ...

    def send(self, *commands: tuple[str, bytes]) -> list[Any]: ...


class _AsyncStore(Protocol):
    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any: ...

    async def send(self, *commands: tuple[str, bytes]) -> list[Any]: ...


def drive(steps: Steps[T], store: _Store) -> T:
    """Run an operation's calls on a blocking store and return its answer."""
    try:
        call = next(steps)
        while True:
            try:
                if isinstance(call, PackedCalls):
                    reply: Any = store.send(*call.commands)
                else:
                    reply = store.run(call.script, call.keys, call.args)
            except Exception as exc:  # the operation decides (store-down policy, retry)
                call = steps.throw(exc)
            else:
                call = steps.send(reply)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def adrive(steps: Steps[T], store: _AsyncStore) -> T:
    """Run an operation's calls on an asyncio store and return its answer."""
    try:
        call = next(steps)
        while True:
            try:
                if isinstance(call, PackedCalls):
                    reply: Any = await store.send(*call.commands)
                else:
                    reply = await store.run(call.script, call.keys, call.args)
            except Exception as exc:
                call = steps.throw(exc)
            else:
                call = steps.send(reply)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
