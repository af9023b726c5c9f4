"""pybreaker's interface on the fleet's shared breaker: ``fleet.circuit_breaker(name)``.

Code written for `pybreaker <https://github.com/danielfm/pybreaker>`_ (``@breaker``,
``breaker.call(f)``, ``with breaker.calling():``, listeners, excluded exceptions) can use
the fleet-wide breaker of a limit unchanged. The object is a ``pybreaker.CircuitBreaker``
but keeps no state machine of its own: every call is one admission of the limit (the Lua
breaker refuses while it is open and lets exactly one caller in the whole fleet through as
the half-open probe), and its release tells the breaker how the call ended. The state it
shows (``current_state``) is read from Redis.

Example::

    search_breaker = fleet.circuit_breaker("search-api", exclude=[NotFound])

    @search_breaker
    def search(query):
        ...

    try:
        search("celery")
    except pybreaker.CircuitBreakerError:
        ...  # open fleet-wide: do without search for a while

Where it differs from pybreaker, it is the fleet's breaker that decides:

- It opens on the limit's failure *rate* (``fleet_limits[name]["breaker"]``), not on
  ``fail_max`` consecutive failures; ``fail_max`` reads as ``min_calls`` (that many
  failures in a row open a fresh breaker), ``reset_timeout`` as the limit's, and both are
  set in ``fleet_limits``, not on this object.
- A system error (any exception not excluded) counts as a failure; excluded exceptions
  count as successes, as in pybreaker. Exceptions the fleet reads as the provider's
  pushback keep their meaning: a 429 pauses the limit fleet-wide and counts against the
  breaker only with ``count_rate_limits``; an exhausted quota does not count. A
  :class:`~celery_fleet.FleetError` raised inside (a nested slot refused) or a
  ``KeyboardInterrupt`` says nothing about the dependency and does not count either.
  The call's own exception always propagates (never turned into ``Throttled``).
- ``state_change`` listeners hear of the transitions this process sees: a probe admitted
  here, a release here that opens or closes the breaker, ``open()`` / ``close()`` /
  ``half_open()`` here, and a change made elsewhere noticed by reading ``state``.
- The refusal is :class:`CircuitBreakerOpen`, both a ``pybreaker.CircuitBreakerError`` and
  a :class:`~celery_fleet.CircuitOpen` (with ``wait_ms``): a fleet task reschedules on it.
- No lock is held around the call (pybreaker holds one: one call at a time per process),
  and tornado's ``call_async``, async and generator functions are not supported.

pybreaker is an optional dependency: ``pip install 'celery-fleet[pybreaker]'``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

try:
    import pybreaker
except ImportError as exc:  # the [pybreaker] extra is not installed
    raise ImportError(
        "fleet.circuit_breaker() needs pybreaker: pip install 'celery-fleet[pybreaker]' "
        "(or pip install pybreaker)"
    ) from exc

from ..admission.breaker import Breaker
from ..admission.core import Admission
from ..admission.guarded import SlotSource
from ..admission.providers import OK, Signal, classify
from ..admission.slot import Slot
from ..checks import check_max_wait
from ..errors import CircuitOpen, ConfigError, FleetError

__all__ = ["FleetCircuitBreaker", "CircuitBreakerOpen"]

T = TypeVar("T")

#: The fleet's state names (breaker.py, Admission listeners) as pybreaker spells them.
_PYBREAKER_STATE = {
    "closed": pybreaker.STATE_CLOSED,
    "open": pybreaker.STATE_OPEN,
    "half_open": pybreaker.STATE_HALF_OPEN,
}
#: The state a transition to each state left, when this object knew no other.
_CAME_FROM = {
    pybreaker.STATE_HALF_OPEN: pybreaker.STATE_OPEN,
    pybreaker.STATE_CLOSED: pybreaker.STATE_HALF_OPEN,
    pybreaker.STATE_OPEN: pybreaker.STATE_CLOSED,
}
#: pybreaker constructor options that the fleet configures in ``fleet_limits`` instead.
_CONFIGURED_IN_LIMITS = {
    "fail_max": "it opens on failure_rate over at least min_calls calls",
    "reset_timeout": "set its reset_timeout there",
    "success_threshold": "one successful probe closes it",
    "state_storage": "its state lives in the fleet's Redis",
}
#: A failure by pybreaker's rule that the provider classifier reads as "not the provider's".
_SYSTEM_ERROR = Signal("invalid_output", detail="a system error (pybreaker: not excluded)")
_NO_VERDICT = Signal("other")


class CircuitBreakerOpen(CircuitOpen, pybreaker.CircuitBreakerError):
    """The fleet's breaker of ``limit`` is open: ``pybreaker.CircuitBreakerError`` for code
    written for pybreaker, :class:`~celery_fleet.CircuitOpen` (``wait_ms`` until a probe
    may run) for the fleet, so a :class:`~celery_fleet.FleetTask` reschedules on it."""

    def __str__(self) -> str:
        return (
            f"the circuit breaker of limit {self.limit!r} is open ({self.reason}); "
            f"retry in {self.wait_ms} ms"
        )


class _Listeners:
    """The one Admission listener per fleet that tells this process's breaker objects."""

    def __init__(self) -> None:
        self.breakers: weakref.WeakSet[FleetCircuitBreaker] = weakref.WeakSet()
        #: Per limit: how many times this process saw its breaker open.
        self.opened: dict[str, int] = {}

    def __call__(self, limit: str, state: str) -> None:
        if state == "open":
            self.opened[limit] = self.opened.get(limit, 0) + 1
        self.tell(limit, _PYBREAKER_STATE.get(state, state))

    def tell(self, limit: str, new: str, old: str | None = None) -> None:
        for cb in list(self.breakers):
            if cb.limit == limit:
                cb._saw(new, old)


_by_admission: weakref.WeakKeyDictionary[Admission, _Listeners] = weakref.WeakKeyDictionary()
_by_admission_lock = threading.Lock()


def _listeners_of(admission: Admission) -> _Listeners:
    with _by_admission_lock:
        found = _by_admission.get(admission)
        if found is None:
            found = _by_admission[admission] = _Listeners()
            admission.listeners.append(found)
        return found


def _block() -> None:
    """Stands for the body of a ``with breaker.calling():`` block in ``before_call``."""


class FleetCircuitBreaker(pybreaker.CircuitBreaker):
    """A ``pybreaker.CircuitBreaker`` whose state is the fleet's shared breaker of a limit.

    Made by ``fleet.circuit_breaker(name, ...)``; see the module docstring for what
    differs from pybreaker. Constructing it makes no Redis call.

    Args:
        fleet: the :class:`~celery_fleet.Fleet`.
        limit: a limit of ``fleet_limits`` that has a ``breaker``.
        exclude: exception types, or predicates ``exc -> bool``, that are not system errors.
        listeners: ``pybreaker.CircuitBreakerListener`` instances.
        throw_new_error_on_trip: raise :class:`CircuitBreakerOpen` (else the call's own
            exception) from the call whose failure opened the breaker, as pybreaker does.
        tokens: each call's token reservation (for a limit with a token budget).
        max_wait: seconds a call may wait for the limit's other budgets (rate, in-flight);
            an open breaker never waits (default: as ``fleet.slot``).
    """

    def __init__(
        self,
        fleet: SlotSource,
        limit: str,
        *,
        exclude: Iterable[type[BaseException] | Callable[[Any], bool]] | None = None,
        listeners: Sequence[pybreaker.CircuitBreakerListener] | None = None,
        throw_new_error_on_trip: bool = True,
        tokens: int = 0,
        max_wait: float | None = None,
        **pybreaker_options: Any,
    ) -> None:
        _check_options(pybreaker_options, limit)
        # Not pybreaker's __init__: it reads the state from its storage (a round trip at
        # import time for a module-level breaker) and sets up the local state machine.
        self._fleet = fleet
        self._breaker = Breaker(fleet.admission, limit)
        self.limit = limit
        self._tokens = fleet.admission.limit(limit).check_tokens(tokens)
        self._max_wait = None if max_wait is None else check_max_wait(max_wait)
        self._lock = threading.RLock()
        self._excluded_exceptions: list[Any] = []
        for exclusion in exclude or ():
            self.add_excluded_exception(exclusion)
        self._listeners: list[Any] = list(listeners or [])
        self._name = limit
        if not isinstance(throw_new_error_on_trip, bool):
            raise ConfigError(
                f"circuit_breaker({limit!r}): throw_new_error_on_trip must be a bool, "
                f"got {throw_new_error_on_trip!r}"
            )
        self._throw_new_error_on_trip = throw_new_error_on_trip
        self._known: str | None = None  # the state this object last saw
        self._events = _listeners_of(fleet.admission)
        self._events.breakers.add(self)

    def __repr__(self) -> str:
        c = self._breaker.config
        return (
            f"<FleetCircuitBreaker {self.limit!r} failure_rate={c.failure_rate} "
            f"min_calls={c.min_calls} reset_timeout={c.reset_timeout_s:g}s "
            f"(state in Redis: .current_state)>"
        )

    # -- configuration: the limit's, read-only here -------------------------------------

    @property
    def fail_max(self) -> int:
        """``min_calls`` of the limit's breaker: that many failures in a row open a fresh
        breaker (it opens on the failure rate over at least ``min_calls`` calls)."""
        return self._breaker.config.min_calls

    @fail_max.setter
    def fail_max(self, number: int) -> None:
        self._configured_in_limits("fail_max")

    @property
    def reset_timeout(self) -> float:
        """Seconds the breaker stays open before one probe may run (the limit's)."""
        return self._breaker.config.reset_timeout_s

    @reset_timeout.setter
    def reset_timeout(self, timeout: float) -> None:
        self._configured_in_limits("reset_timeout")

    @property
    def success_threshold(self) -> int:
        """Always 1: one successful probe closes the fleet's breaker."""
        return 1

    @success_threshold.setter
    def success_threshold(self, threshold: int) -> None:
        self._configured_in_limits("success_threshold")

    def _configured_in_limits(self, option: str) -> NoReturn:
        raise ConfigError(_not_an_option(option, self.limit))

    def add_excluded_exception(self, exception: Any) -> None:
        """Add an exception type (or a predicate ``exc -> bool``) that is not a system
        error: a call ending with it counts as a success."""
        is_type = isinstance(exception, type) and issubclass(exception, BaseException)
        if not is_type and not callable(exception):
            raise ConfigError(
                f"an excluded exception is an exception type or a callable exc -> bool, "
                f"got {exception!r}"
            )
        super().add_excluded_exception(exception)

    # -- state, read from Redis -----------------------------------------------------------

    @property
    def current_state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"``, as the fleet sees it now (one round
        trip; ``"half-open"``: open past ``reset_timeout``, a probe may run or runs)."""
        return _PYBREAKER_STATE[self._breaker.state().state]

    @property
    def state(self) -> pybreaker.CBStateType:
        """The state as a pybreaker state object (``.name``); like pybreaker, telling the
        ``state_change`` listeners when it differs from what this object last saw."""
        now = self.current_state
        if self._known is not None and now != self._known:
            self._saw(now)  # changed elsewhere: pybreaker tells its listeners so too
        self._known = now
        return self._create_new_state(now)

    @state.setter
    def state(self, state_str: str) -> None:
        {
            pybreaker.STATE_OPEN: self.open,
            pybreaker.STATE_HALF_OPEN: self.half_open,
            pybreaker.STATE_CLOSED: self.close,
        }[state_str]()

    @property
    def fail_counter(self) -> int:
        """Failures the fleet counted in the breaker's current window (all processes)."""
        return self._breaker.state().failures

    @property
    def success_counter(self) -> int:
        """Always 0: one successful probe closes the breaker at once."""
        return 0

    def open(self) -> bool:
        """Open the breaker fleet-wide now, as if it had tripped: calls are refused for
        ``reset_timeout``, then one probe decides. Returns ``throw_new_error_on_trip``."""
        self._change(pybreaker.STATE_OPEN, lambda: self._breaker.trip())
        return self._throw_new_error_on_trip

    def half_open(self) -> None:
        """Half-open the breaker fleet-wide: the next call in the whole fleet is the probe."""
        self._change(pybreaker.STATE_HALF_OPEN, lambda: self._breaker.trip(half_open=True))

    def close(self) -> None:
        """Close the breaker fleet-wide: counts forgotten, an operator's override lifted."""
        self._change(pybreaker.STATE_CLOSED, self._breaker.reset)

    def _change(self, new: str, change: Callable[[], object]) -> None:
        old = self.current_state
        change()
        self._events.tell(self.limit, new, old)

    def _audience(self) -> tuple[pybreaker.CircuitBreakerListener, ...]:
        return tuple(self._listeners)

    def _inc_counter(self) -> None:
        """Nothing: the release script counts failures."""

    def _saw(self, new: str, old: str | None = None) -> None:
        """Tell this object's listeners of a transition to ``new`` (from ``old``, else from
        what it last saw, else from where the fleet's breaker comes to ``new`` from)."""
        if old is None:
            old = self._known if self._known not in (None, new) else _CAME_FROM[new]
        self._known = new
        before, after = self._create_new_state(old), self._create_new_state(new)
        for listener in self._audience():
            listener.state_change(self, before, after)

    # -- calls --------------------------------------------------------------------------

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``func(*args, **kwargs)`` as one admission of the limit: raise
        :class:`CircuitBreakerOpen` without calling it while the fleet's breaker refuses."""
        _check_plain_function(func)
        with self._calling(func, args, kwargs):
            return func(*args, **kwargs)

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """The ``with`` block is the call (``before_call`` listeners get a stand-in
        function named ``_block``)."""
        with self._calling(_block, (), {}):
            yield

    def call_async(self, func: Any, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            "a fleet circuit breaker does not run tornado coroutines; call it from sync code"
        )

    def __call__(self, *call_args: Any, **call_kwargs: bool) -> Callable[..., Any]:
        """``@breaker`` (or ``@breaker()``): every call of the function goes through
        :meth:`call`; the function's name, docstring and ``__wrapped__`` are kept."""
        if call_kwargs:
            raise ConfigError(
                f"a fleet circuit breaker decorates plain functions only (no options), "
                f"got {sorted(call_kwargs)}"
            )

        def decorate(func: Callable[..., T]) -> Callable[..., T]:
            _check_plain_function(func)

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> T:
                return self.call(func, *args, **kwargs)

            return wrapper

        return decorate(*call_args) if call_args else decorate

    @contextlib.contextmanager
    def _calling(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Iterator[None]:
        slot = self._fleet.slot(self.limit, tokens=self._tokens, max_wait=self._max_wait)
        try:
            slot.acquire()  # a probe admitted here tells the listeners: open -> half-open
        except CircuitOpen as refused:
            raise CircuitBreakerOpen(self.limit, refused.wait_ms, "calls refused") from refused
        try:
            for listener in self._audience():
                listener.before_call(self, func, *args, **kwargs)
        except BaseException:
            slot.release(_NO_VERDICT)
            raise
        try:
            yield
        except BaseException as exc:
            self._failed(slot, exc)
            raise
        self._release(slot, OK)
        for listener in self._audience():
            listener.success(self)

    def _failed(self, slot: Slot, exc: BaseException) -> None:
        """pybreaker's order: ``failure`` listeners, then the release (which may open the
        breaker: ``state_change``), then :class:`CircuitBreakerOpen` if it did."""
        if not self.is_system_error(exc):  # pybreaker: a business error is a success
            self._release(slot, OK)
            for listener in self._audience():
                listener.success(self)
            return
        for listener in self._audience():
            listener.failure(self, exc)
        if isinstance(exc, FleetError) or not isinstance(exc, Exception):
            signal = _NO_VERDICT
        else:
            signal = classify(exc)
            if signal.kind == "other":
                signal = _SYSTEM_ERROR
        probe = bool(slot.decision and slot.decision.probe)
        if self._release(slot, signal) and self._throw_new_error_on_trip:
            why = "trial call failed" if probe else "failure rate reached"
            wait_ms = int(self.reset_timeout * 1000)
            raise CircuitBreakerOpen(self.limit, wait_ms, f"{why}, circuit breaker opened") from exc

    def _release(self, slot: Slot, signal: Signal) -> bool:
        """Release and wait for the reply (its transitions reach the listeners through the
        Admission); True if this process saw the breaker open meanwhile."""
        opened = self._events.opened.get(self.limit, 0)
        slot.release(signal)
        self._fleet.admission.store.drain()
        return self._events.opened.get(self.limit, 0) > opened


def _check_plain_function(func: object) -> None:
    if not callable(func):
        raise ConfigError(f"a circuit breaker calls a function, got {func!r}")
    target = inspect.unwrap(func)
    if (
        inspect.iscoroutinefunction(target)
        or inspect.isasyncgenfunction(target)
        or inspect.isgeneratorfunction(target)
    ):
        raise ConfigError(
            f"a fleet circuit breaker guards plain (sync) functions; {func!r} returns before "
            f"its work is done (async or a generator)"
        )


def _not_an_option(option: str, limit: str) -> str:
    return (
        f"{option} cannot be set on a fleet circuit breaker: the breaker every process shares "
        f"is configured in fleet_limits[{limit!r}]['breaker'] ({_CONFIGURED_IN_LIMITS[option]})"
    )


def _check_options(options: dict[str, Any], limit: str) -> None:
    """Refuse pybreaker's constructor options that the fleet configures in ``fleet_limits``
    (naming where), and any other unknown option."""
    for option in options:
        if option in ("name", "limit", "fleet"):
            raise ConfigError(
                f"circuit_breaker({limit!r}, {option}=...): the breaker's name is its limit, "
                f"given once as the first argument"
            )
        if option in _CONFIGURED_IN_LIMITS:
            raise ConfigError(_not_an_option(option, limit))
    if options:
        raise ConfigError(
            f"unknown circuit_breaker option(s) {sorted(options)}; known: exclude, listeners, "
            f"throw_new_error_on_trip, tokens, max_wait"
        )
