"""Durable steps: run a paid call once per run id, replay its stored result on a re-run.

An agent task that is rescheduled, retried or redelivered starts again from the top of its
body. Wrapping each expensive call in a step makes the re-run cheap: a step whose result is
stored under the run's id returns that result without calling anything.

Example (inside a ``@fleet_task(bind=True)`` body, the run id is the task id)::

    plan = self.step("plan", call_model, goal)            # runs once per task id
    hits = self.step("search-1", search_api, plan["query"])

Results are stored as JSON in one Redis hash per run, ``{<namespace>:run:<run id>}:steps``
(step name -> JSON), which expires ``ttl_s`` after its last write. The hash tag keeps a
run's keys in one slot, so the idempotency ledger can live beside it later. A step's result
must be JSON-serialisable and at most ``max_bytes`` long: a function whose return annotation
says otherwise is refused before it runs; a result that turns out not to fit is refused
after (it ran, but nothing is stored, so the next run calls it again).

Steps alone do not lock: two copies of one run executing at the same time may both run a
step. A keyed task's claim (:mod:`celery_fleet.durability.ledger`) lets only one copy run at a time.
This module knows nothing about Celery.
"""

from __future__ import annotations

import json
import logging
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from ..checks import MAX_SECONDS, number
from ..errors import StepError, StoreUnavailable, Throttled
from ..store.specs import STEP_PUT
from ..store.sync import RedisStore

log = logging.getLogger("celery_fleet")

#: The wait a step reports when Redis is away (a guess: the task backs off with jitter).
STORE_DOWN_WAIT_MS = 1000

__all__ = ["Steps", "DEFAULT_STEP_TTL_S", "DEFAULT_STEP_MAX_BYTES", "MAX_STEP_NAME"]

DEFAULT_STEP_TTL_S = 7 * 86_400.0
DEFAULT_STEP_MAX_BYTES = 1 << 20
MAX_STEP_NAME = 200

T = TypeVar("T")

_JSON_LEAVES = (str, int, float, bool, type(None))
_JSON_CONTAINERS = (list, tuple, dict)


class Steps:
    """The stored steps of one run (a task id), in one Redis hash.

    Args:
        store: the fleet's Redis.
        namespace: the fleet's key prefix.
        run_id: the id that identifies a run across re-runs (a Celery task id).
        ttl_s: how long results are kept after the last step stored one.
        max_bytes: the largest JSON text one step may store.
    """

    def __init__(
        self,
        store: RedisStore,
        namespace: str,
        run_id: str,
        ttl_s: float = DEFAULT_STEP_TTL_S,
        max_bytes: int = DEFAULT_STEP_MAX_BYTES,
    ) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise StepError(f"a durable step needs a run id (a task id), got {run_id!r}")
        self.store = store
        self.run_id = run_id
        self.key = f"{{{namespace}:run:{run_id}}}:steps"
        self.ttl_ms = int(number(ttl_s, "step ttl", lo=1.0, hi=MAX_SECONDS) * 1000)
        self.max_bytes = int(max_bytes)

    def run(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Return the stored result of step ``name``, or call ``fn(*args, **kwargs)`` once,
        store its result and return it (as JSON gives it back: a tuple comes back a list,
        on the first run too, so both runs see the same value)."""
        check_step(name, fn)
        try:
            found, value = self.get(name)
        except StoreUnavailable as exc:
            # Calling fn now could pay for a step a first run already paid for: wait
            # for Redis instead (a task reschedules with backoff).
            raise Throttled("steps", STORE_DOWN_WAIT_MS, "store_down") from exc
        if found:
            return value  # type: ignore[no-any-return]
        result = fn(*args, **kwargs)
        text = self._encode(name, result)
        try:
            stored = STEP_PUT.run(self.store, [self.key], [name, text, self.ttl_ms])
        except StoreUnavailable as exc:
            log.warning("celery-fleet: step %r ran but was not stored (%s)", name, exc)
            return json.loads(text)  # type: ignore[no-any-return]
        if not stored:
            # Another copy of this run stored it first: everyone goes on with that answer.
            found, value = self.get(name)
            if found:
                return value  # type: ignore[no-any-return]
        return json.loads(text)  # type: ignore[no-any-return]

    def get(self, name: str) -> tuple[bool, Any]:
        """``(True, result)`` when step ``name`` of this run is stored, else ``(False, None)``."""
        raw = self.store.call("HGET", self.key, name)
        if raw is None:
            return False, None
        return True, json.loads(raw)

    def done(self) -> list[str]:
        """The names of this run's stored steps."""
        return sorted(
            k.decode() if isinstance(k, bytes) else k for k in self.store.call("HKEYS", self.key)
        )

    def forget(self) -> None:
        """Drop every stored step of this run (the next run calls them all again)."""
        self.store.call("DEL", self.key)

    def _encode(self, name: str, result: Any) -> str:
        try:
            text = json.dumps(result, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise StepError(
                f"step {name!r} returned a {type(result).__name__}, which is not "
                f"JSON-serialisable ({exc}); nothing was stored, so a re-run calls it again. "
                f"Return plain data (e.g. resp.model_dump() rather than the response object)"
            ) from None
        if len(text.encode()) > self.max_bytes:
            raise StepError(
                f"step {name!r} returned {len(text.encode())} bytes of JSON, more than "
                f"fleet_step_max_bytes = {self.max_bytes}; nothing was stored. Store less "
                f"(a reference to the data, not the data)"
            )
        return text


def check_step(name: object, fn: object) -> None:
    """Refuse a bad step before it runs: the name, the callable, its return annotation."""
    if not isinstance(name, str) or not name or len(name) > MAX_STEP_NAME:
        raise StepError(
            f"a step name must be a non-empty str of at most {MAX_STEP_NAME} characters, "
            f"got {name!r}"
        )
    if not callable(fn):
        raise StepError(f"step {name!r}: {fn!r} is not callable")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: the result is checked after the call
        return
    if "return" in hints and not json_type(hints["return"]):
        raise StepError(
            f"step {name!r}: {getattr(fn, '__qualname__', fn)} is annotated to return "
            f"{hints['return']!r}, which JSON cannot store; return plain data "
            f"(dict, list, str, int, float, bool, None)"
        )


def json_type(tp: Any) -> bool:
    """Whether values of annotation ``tp`` survive JSON (Any and unknown forms pass)."""
    if tp is Any or tp in _JSON_LEAVES or tp is None:
        return True
    if isinstance(tp, TypeVar) or isinstance(tp, (str, typing.ForwardRef)):
        return True
    origin = typing.get_origin(tp)
    if origin is None:
        if isinstance(tp, type):
            if typing.is_typeddict(tp):
                return all(json_type(v) for v in typing.get_type_hints(tp).values())
            return tp in _JSON_CONTAINERS
        return True
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return all(json_type(a) for a in args)
    if origin is typing.Literal:
        return all(isinstance(a, _JSON_LEAVES) for a in args)
    if origin in (list, tuple, dict) or origin in (typing.Annotated,):
        if origin is dict and args and args[0] is not str:
            return False
        return all(json_type(a) for a in args if a is not Ellipsis)
    return False
