"""Limits changed at runtime: stored in Redis with a version, applied by every process.

``fleet.set_limit("openai", rpm=900)`` validates the change as start-up configuration is
validated (:mod:`celery_fleet.admission.overrides`), writes it to one hash per namespace,
``{<namespace>:_config}:limits`` (no TTL: it is configuration, not state), and applies it
in the calling process at once. Every other process polls that hash's ``version`` field
every :data:`POLL_S` seconds from one background thread and reloads the limits whose own
version changed: the change is in force everywhere within a second, with no restart and
nothing added to an ask (the thread reads the hash, the ask reads the constants it left).

- **Versions only grow.** A version is Redis ``TIME`` in µs at the write, or one more
  than the highest version the hash or the writer knew when the clock is behind: a
  version never goes backwards, also after the hash was lost (a flush, a failover to an
  empty replica). A process that finds the hash gone after it saw versions writes a new,
  higher version for every limit with no override: the fleet goes back to the configured
  values together, and the versions it shows keep growing.
- **Redis down.** The poll fails, the process keeps the values it last applied and logs
  it once (and once when Redis answers again).
- **Forks.** The thread is the process's own (:class:`~celery_fleet.background.BackgroundLoop`
  forgets the parent's after a fork); the first ask of a process reads the hash once
  before it starts the thread, so a prefork child never asks with values older than
  what the hash held when it started.
- **Bad stored fields** (a process whose own ``fleet_limits`` a change does not fit, in a
  deploy's middle) keep the values in force for that limit, logged once per version.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..background import BackgroundLoop
from ..errors import ConfigError, FleetError, StoreUnavailable
from ..logfields import log_fields
from ..store.specs import LIMIT_CONFIG
from .config import LimitConfig
from .overrides import check_fields, merge_fields, with_fields

__all__ = ["AppliedLimit", "RuntimeLimits", "POLL_S", "config_key"]

log = logging.getLogger("celery_fleet")

#: Seconds between two reads of the namespace's config version (each a single HGET).
POLL_S = 0.5
#: Writes ``set_limit`` tries when other writers keep changing the same limit meanwhile.
WRITE_TRIES = 8


def config_key(namespace: str) -> str:
    """The hash of a namespace's runtime overrides (see :mod:`limit_config.lua`)."""
    return f"{{{namespace}:_config}}:limits"


class _Store(Protocol):
    def run(self, script: str, keys: list[str], args: list[Any]) -> Any: ...

    def call(self, command: str, *args: Any) -> Any: ...


class _Down(Protocol):
    @property
    def down(self) -> bool: ...

    def failed(self, error: StoreUnavailable) -> None: ...


class _Admission(Protocol):
    """What :class:`RuntimeLimits` needs of :class:`~celery_fleet.admission.core.Admission`."""

    @property
    def store(self) -> _Store: ...

    @property
    def namespace(self) -> str: ...

    @property
    def limits(self) -> dict[str, LimitConfig]: ...

    @property
    def store_down(self) -> _Down: ...

    def limit(self, name: str) -> LimitConfig: ...

    def reconfigure(self, name: str, cfg: LimitConfig) -> None: ...


@dataclass(frozen=True)
class AppliedLimit:
    """What a process applies of one limit: ``version`` of the last runtime write of it
    (0: none seen, the configured values) and the ``fields`` that write set over the
    configured values (empty after a reset)."""

    version: int = 0
    fields: Mapping[str, Any] = field(default_factory=dict)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(text: str | None) -> dict[str, Any]:
    """The fields stored for a limit (JSON text); ConfigError when it is not an object."""
    if not text:
        return {}
    try:
        fields = json.loads(text)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise ConfigError(f"the stored runtime fields {text[:100]!r} are not a JSON object")
    return fields


def _as_json(name: str, fields: Mapping[str, Any]) -> str:
    """The fields as JSON text, which every process reads back; ConfigError otherwise."""
    try:
        return json.dumps(fields, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        raise ConfigError(
            f"fleet.set_limit({name!r}): values must be plain ints, floats or strings, "
            f"got {dict(fields)!r}"
        ) from None


class RuntimeLimits:
    """The runtime overrides of one :class:`Admission`'s limits (see the module docstring).

    Example::

        runtime = admission.runtime
        runtime.set("openai", {"rpm": 900})   # -> the new version
        runtime.applied("openai")             # AppliedLimit(version=..., fields={'rpm': 900})
        runtime.reset("openai")               # the configured values again
    """

    def __init__(self, admission: _Admission) -> None:
        self.admission = admission
        self.key = config_key(admission.namespace)
        #: The limits as configured at start-up: every override is merged with these.
        self.configured: dict[str, LimitConfig] = dict(admission.limits)
        self._applied: dict[str, AppliedLimit] = {}
        self._seen = 0  # the namespace version last loaded
        self.floor = 0  # the highest version this process has seen
        self._pid = -1  # the process that read the hash once before its first ask
        self._lock = threading.RLock()  # a poll inside watch() applies under it
        self._down = False
        self._refused: set[tuple[str, int]] = set()
        #: True once this process's poller runs (False again in a forked child): the ask
        #: reads this one attribute, and calls :meth:`watch` only while it is False.
        self.following = False
        self._loop = BackgroundLoop(
            self,
            RuntimeLimits._step,
            "fleet-limits",
            retry_s=POLL_S,
            after_fork=RuntimeLimits._after_fork,
        )

    # -- the public side ---------------------------------------------------------------

    def applied(self, name: str) -> AppliedLimit:
        """What this process applies of limit ``name`` now."""
        self.admission.limit(name)
        return self._applied.get(name, AppliedLimit())

    def set(self, name: str, fields: Mapping[str, Any]) -> int:
        """Set ``fields`` of limit ``name`` fleet-wide (over what an earlier ``set`` left);
        returns the new version. Validated before anything is written: a bad value raises
        :class:`ConfigError` and changes nothing, here or in Redis. Without Redis it raises
        :class:`~celery_fleet.StoreUnavailable`; a write whose reply was lost may have
        landed (the pollers then apply it): call it again, the same fields set again are
        harmless."""
        base = self._configured(name)
        new = check_fields(name, fields)
        for _ in range(WRITE_TRIES):
            current, read = self._read_entry(name)
            merged = merge_fields(current, new)
            cfg = with_fields(base, merged)  # raises before any write
            written, version = self._write(name, read, _as_json(name, merged))
            if written:
                self._apply(name, cfg, AppliedLimit(version, merged))
                return version
        raise FleetError(
            f"fleet.set_limit({name!r}): {WRITE_TRIES} other changes of the limit came first; "
            f"try again"
        )

    def reset(self, name: str) -> int:
        """Remove limit ``name``'s override fleet-wide: the configured values again.
        Returns the new version."""
        base = self._configured(name)
        _, version = self._write(name, -1, "")
        self._apply(name, base, AppliedLimit(version, {}))
        return version

    def watch(self) -> None:
        """Make sure this process follows the overrides: on its first call (in each process)
        read them once, then start the polling thread. Cheap when the thread runs."""
        if self.following:
            return  # a forked child is not following (after_fork): it reads once first
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                if not self.admission.store_down.down:  # known down: the thread reads later
                    try:
                        error = self.poll_quietly()
                    except Exception:  # never the ask's failure: the thread tries again
                        log.exception("celery-fleet: reading the runtime limits failed")
                    else:
                        if isinstance(error, StoreUnavailable):
                            # On the caller's path: its ask would meet the same silence, so
                            # the outage starts now, and a frozen Redis costs the first call
                            # of a process one health deadline, not two.
                            self.admission.store_down.failed(error)
            self._loop.start()
            self.following = True

    def sync(self) -> None:
        """Read the overrides now, one HGET (a status read, in a process that may not poll:
        the ``celery fleet`` command, a worker's main process); a Redis error is logged
        once, the values in force stay."""
        self.poll_quietly()

    def stop(self) -> None:
        """Stop polling (tests; a Fleet that is closed)."""
        self._loop.stop()

    # -- polling -----------------------------------------------------------------------

    def _step(self) -> float:
        self.poll_quietly()
        return POLL_S

    def _after_fork(self) -> None:
        self._lock = threading.RLock()
        self.following = False

    def poll_quietly(self) -> Exception | None:
        """:meth:`poll`, with a Redis error logged once (until Redis answers again) and
        returned instead of raised: the values in force stay."""
        try:
            self.poll()
        except (FleetError, ValueError) as exc:
            if not self._down:
                self._down = True
                log.warning(
                    "celery-fleet: cannot read the runtime limits (%s); keeping the values in "
                    "force until Redis answers",
                    exc,
                )
            return exc
        if self._down:
            self._down = False
            log.info("celery-fleet: reading the runtime limits again")
        return None

    def poll(self) -> bool:
        """Read the namespace's version; reload the limits whose version changed. True when
        something was loaded. Raises :class:`~celery_fleet.StoreUnavailable` without Redis."""
        raw = self.admission.store.call("HGET", self.key, "version")
        if raw is None:
            if self.floor == 0:
                return False  # no override was ever written (that this process saw)
            # Lost after this process saw versions: a new, higher one for every limit
            # (only one process's write is needed; the others see it above their floor).
            LIMIT_CONFIG.run(
                self.admission.store, [self.key], ["", -1, "", self.floor, *self.configured]
            )
            log.warning(
                "celery-fleet: the runtime limits were lost from Redis; back to the "
                "configured values"
            )
            raw = self.admission.store.call("HGET", self.key, "version")
            if raw is None:
                return False
        version = int(_text(raw))
        if version == self._seen:
            return False
        self._load(self.admission.store.call("HGETALL", self.key) or {})
        self._seen = version
        self.floor = max(self.floor, version)
        return True

    def _load(self, raw: Mapping[Any, Any]) -> None:
        entries = {_text(k): _text(v) for k, v in raw.items()}
        for name, base in self.configured.items():
            version = int(entries.get(f"version:{name}", "0"))
            if version == self.applied(name).version:
                continue
            text = entries.get(f"limit:{name}")
            try:
                fields = _fields(text)
                cfg = with_fields(base, check_fields(name, fields) if fields else {})
            except ConfigError as exc:
                if (name, version) not in self._refused:
                    self._refused.add((name, version))
                    log.error(
                        "celery-fleet: the runtime change %d of limit %r does not fit this "
                        "process's configuration (%s); keeping the values in force",
                        version,
                        name,
                        exc,
                    )
                continue
            self._apply(name, cfg, AppliedLimit(version, fields))

    # -- Redis -------------------------------------------------------------------------

    def _configured(self, name: str) -> LimitConfig:
        self.admission.limit(name)  # an unknown limit: ConfigError listing the known ones
        return self.configured[name]

    def _read_entry(self, name: str) -> tuple[dict[str, Any], int]:
        text, version = self.admission.store.call(
            "HMGET", self.key, f"limit:{name}", f"version:{name}"
        )
        return _fields(_text(text) if text else None), int(_text(version or "0"))

    def _write(self, name: str, read: int, fields_json: str) -> tuple[bool, int]:
        reply = LIMIT_CONFIG.run(
            self.admission.store, [self.key], [name, read, fields_json, self.floor]
        )
        version = int(reply.version)
        self.floor = max(self.floor, version)
        return bool(reply.written), version

    def _apply(self, name: str, cfg: LimitConfig, applied: AppliedLimit) -> None:
        with self._lock:
            if applied.version < self.applied(name).version:
                return  # a poll already applied a later write
            self.admission.reconfigure(name, cfg)
            self._applied[name] = applied
        log.info(
            "celery-fleet: limit %r now at runtime version %d (%s)",
            name,
            applied.version,
            ", ".join(f"{k}={v!r}" for k, v in sorted(applied.fields.items())) or "as configured",
            extra=log_fields(limit=name),
        )
