"""``fleet.wrap(client, limit=...)``: an OpenAI or Anthropic client whose model calls hold slots.

A user who calls the provider through its SDK writes, around every call, the same glue:
reserve tokens, hold a slot, read the rate-limit headers, settle to the reported usage,
turn a 429 into the fleet's ``Throttled``. :func:`wrap` writes it once. The object it
returns behaves like the client: its model calls (``chat.completions.create``,
``completions.create``, ``embeddings.create``, ``responses.create``, ``messages.create``,
``messages.stream``, and ``stream=True`` on any of them) each hold one slot of ``limit``,
and everything else (``models.list()``, ``files``, ``beta``, attributes) passes through to
the client unchanged and takes no slot.

Per model call:

- the reservation is ``tokens`` (an int, or a callable given the call's keyword arguments),
  by default :func:`~celery_fleet.contrib.usage.estimate_tokens` of them (prompt
  characters / 4 plus ``max_tokens``; embeddings reserve their input only);
- the SDK's raw response is read (``with_raw_response``) so its rate-limit headers lower
  the fleet's buckets (``slot.observe``) before it is parsed and returned;
- the reservation is settled to ``usage`` (for a stream: the usage its events report,
  when it ends or is closed);
- on a limit with ``quality``, the answer is judged (``slot.judge(result, request=kwargs)``:
  the call's own ``max_tokens`` and ``response_format``) and the verdict rides on the
  release; a stream is judged on the answer its events add up to, once it has ended (see
  :mod:`celery_fleet.contrib.answers`); judging never raises into the caller;
- an SDK exception leaves the slot as in ``with fleet.slot(...)``: a 429 or an overload
  (Anthropic's 529) pauses the limit fleet-wide and raises :class:`~celery_fleet.Throttled`
  (its ``__cause__`` is the SDK's ``RateLimitError``/``OverloadedError``), so a fleet task
  reschedules instead of failing; other errors propagate unchanged.

The SDK's own retries would sleep inside the slot and hide a 429 from the fleet, so the
model calls go through ``client.with_options(max_retries=0)``: the fleet's line is the one
retry loop (``max_retries=None`` keeps the client's). No SDK is imported here: the client
is recognised by its base class names (both SDKs share them).

Example::

    client = fleet.wrap(openai.OpenAI(), limit="openai")
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[...], max_tokens=300)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..checks import check_max_wait
from ..errors import ConfigError, LeaseLost
from .answers import judges
from .usage import estimate_tokens, usage_tokens

if TYPE_CHECKING:
    from ..admission.aslot import AsyncSlot
    from ..admission.config import LimitConfig
    from ..admission.core import Admission
    from ..admission.slot import Slot

__all__ = ["wrap", "MODEL_CALLS", "SlotSource", "Policy"]

log = logging.getLogger("celery_fleet")

#: The attribute paths of a client that are model calls, each holding a slot.
MODEL_CALLS = frozenset(
    {
        ("chat", "completions", "create"),
        ("completions", "create"),
        ("embeddings", "create"),
        ("responses", "create"),
        ("messages", "create"),
        ("messages", "stream"),
    }
)
_ROUTES = frozenset(path[:i] for path in MODEL_CALLS for i in range(1, len(path)))
#: Calls with no completion: the reservation is the input alone.
_NO_COMPLETION = frozenset({("embeddings", "create")})


class SlotSource(Protocol):
    """What :func:`wrap` needs of a :class:`~celery_fleet.Fleet`."""

    admission: Admission

    def slot(self, name: str, tokens: int = 0, max_wait: float | None = None) -> Slot: ...

    def aslot(self, name: str, tokens: int = 0, max_wait: float | None = None) -> AsyncSlot: ...


class Policy:
    """How a wrapped client's model calls take their slots (one per :func:`wrap`)."""

    def __init__(
        self,
        fleet: SlotSource,
        limit: str,
        max_wait: float | None,
        tokens: int | Callable[[Mapping[str, Any]], int] | None,
        is_async: bool,
    ) -> None:
        self.fleet = fleet
        self.limit = limit
        self.cfg: LimitConfig = fleet.admission.limit(limit)
        self.max_wait = max_wait
        self.tokens = tokens
        self.is_async = is_async

    def reserve(self, path: tuple[str, ...], kwargs: Mapping[str, Any]) -> int:
        """The tokens a call with ``kwargs`` reserves (0 on a limit with no token budget)."""
        if not self.cfg.token_windows:
            return 0
        if self.tokens is None:
            default = 0 if path in _NO_COMPLETION else None
            guess = estimate_tokens(kwargs) if default is None else estimate_tokens(kwargs, 0)
            return min(guess, self.cfg.max_tokens_per_call or guess)
        if callable(self.tokens):
            return self.cfg.check_tokens(self.tokens(kwargs), "tokens(...)")
        return self.tokens

    def slot(self, reserve: int) -> Slot:
        """A blocking slot for one call (not yet entered)."""
        return self.fleet.slot(self.limit, tokens=reserve, max_wait=self.max_wait)

    def aslot(self, reserve: int) -> AsyncSlot:
        """A slot for one awaited call (not yet entered)."""
        return self.fleet.aslot(self.limit, tokens=reserve, max_wait=self.max_wait)

    def judges(self, path: tuple[str, ...]) -> bool:
        """Whether a call at ``path`` is judged for garbage: the limit has ``quality`` and
        the call has an answer to judge (an embedding has none)."""
        return path not in _NO_COMPLETION and judges(self.fleet.admission, self.limit)

    def settle_to(self, used: int | None) -> int | None:
        """The figure to settle to, or None when there is nothing to settle."""
        if used is None or not self.cfg.token_windows:
            return None
        return used


def observe(slot: Slot, headers: Any) -> None:
    """Read a response's rate-limit headers; a lease lost meanwhile only warns (the call
    is made and paid: its answer is still returned)."""
    try:
        slot.observe(headers)
    except LeaseLost as exc:
        log.warning("celery-fleet: %s (the answer is returned all the same)", exc)


def settle(slot: Slot, policy: Policy, usage: Any) -> None:
    """Settle ``slot`` to the tokens ``usage`` reports, when it reports any."""
    used = policy.settle_to(usage_tokens(usage))
    if used is None:
        return
    try:
        slot.settle(used)
    except LeaseLost as exc:
        log.warning("celery-fleet: %s (the answer is returned all the same)", exc)


async def asettle(slot: AsyncSlot, policy: Policy, usage: Any) -> None:
    """:func:`settle` for an :class:`~celery_fleet.admission.aslot.AsyncSlot`."""
    used = policy.settle_to(usage_tokens(usage))
    if used is None:
        return
    try:
        await slot.settle(used)
    except LeaseLost as exc:
        log.warning("celery-fleet: %s (the answer is returned all the same)", exc)


async def aobserve(slot: AsyncSlot, headers: Any) -> None:
    """:func:`observe` for an :class:`~celery_fleet.admission.aslot.AsyncSlot`."""
    try:
        await slot.observe(headers)
    except LeaseLost as exc:
        log.warning("celery-fleet: %s (the answer is returned all the same)", exc)


def _flavour(client: object) -> bool:
    """True for an async client, False for a blocking one; ConfigError for anything else."""
    names = {cls.__name__ for cls in type(client).__mro__}
    if "AsyncAPIClient" in names:
        return True
    if "SyncAPIClient" in names:
        return False
    raise ConfigError(
        f"wrap() takes an openai.OpenAI/AsyncOpenAI or anthropic.Anthropic/AsyncAnthropic "
        f"client, got {client!r}"
    )


def wrap(
    fleet: SlotSource,
    client: Any,
    limit: str,
    *,
    max_wait: float | None = None,
    tokens: int | Callable[[Mapping[str, Any]], int] | None = None,
    max_retries: int | None = 0,
) -> Any:
    """A proxy of an OpenAI or Anthropic ``client`` whose model calls each hold a slot of
    ``limit`` (see the module docstring); async clients use ``fleet.aslot``.

    Args:
        limit: the limit (a key of ``fleet_limits``).
        max_wait: seconds a call waits for admission (default: as ``fleet.slot``).
        tokens: the reservation: None (estimate from the call's arguments), an int, or a
            callable given the call's keyword arguments that returns one.
        max_retries: the SDK's own retries inside a slot (0: none, the fleet's line
            retries; None: the client's setting).

    Everything is checked here: an unknown limit, a bad ``tokens``, ``max_wait`` or
    ``max_retries``, or an object that is not an SDK client raise ``ConfigError``.
    """
    from .sdk_calls import WrappedClient

    is_async = _flavour(client)
    if not isinstance(limit, str):
        raise ConfigError(f"wrap() needs the name of a limit (limit='openai'), got {limit!r}")
    policy = Policy(fleet, limit, max_wait, tokens, is_async)
    if tokens is not None and not callable(tokens):
        policy.cfg.check_tokens(tokens)
    if max_wait is not None:
        check_max_wait(max_wait)
    if max_retries is not None and (
        isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0
    ):
        raise ConfigError(f"max_retries must be an int >= 0 or None, got {max_retries!r}")
    inner = client if max_retries is None else client.with_options(max_retries=max_retries)
    return WrappedClient(client, inner, policy, max_retries)
