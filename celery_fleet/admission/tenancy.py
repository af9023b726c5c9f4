"""Keys (tenants) of a limit: each key's own sub-limit, and fair share between keys.

A limit configured with ``"keys"`` (every key's own windows and in-flight cap, inside the
limit's) or ``"weights"`` (fair-share weights, default 1) admits callers *by key*::

    app.conf.fleet_limits = {"openai": {
        "rpm": 600, "max_in_flight": 12,
        "keys": {"rpm": 200, "max_in_flight": 4},
        "weights": {"acme": 3},
    }}
    with fleet.slot("openai", key="acme"): ...

The key's budgets are checked in the same acquire call as the limit's, all or nothing
(``scripts/_lib/keys.lua``), and when callers wait, the line is served in start-time fair
queueing order between keys (weighted, FIFO inside a key) instead of by age. Callers that
pass no key share one default key (weight ``weights.get("")``, 1 by default) that has
the fair share but no sub-limit.

Keys are user data: at most :data:`MAX_KEY_LENGTH` printable characters, hashed
(:func:`key_hash`) into the Redis keys ``{ns:limit}:k:<hash>:ctl`` / ``:leases``, which
are created on first use and expire when idle. A keyed ticket (and so its lease) ends in
``-k<hash>``, so a release, renewal or settle finds the key's state from the lease alone
(a replayed release too). This module knows nothing about Celery and holds no state.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..checks import number
from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import LimitConfig, Window

__all__ = [
    "MAX_KEY_LENGTH",
    "KEY_MARK",
    "KeysConfig",
    "WeightsConfig",
    "check_key",
    "key_hash",
    "lease_key_hash",
    "key_redis_keys",
    "key_acquire_args",
    "parse_weights",
]

#: The longest key accepted (characters): a key travels in every acquire of its callers.
MAX_KEY_LENGTH = 256
#: What separates a keyed ticket from its key's hash: hex ids never contain "-".
KEY_MARK = "-k"
#: Characters of the sha1 hex digest a key is stored under (64 bits: no collisions in
#: practice among the keys of one limit).
HASH_CHARS = 16
#: The hash of the default key (callers that pass none); never a sha1 prefix of a key.
DEFAULT_HASH = "_"
#: Fair-share weights are bounded so virtual time (admissions / weight) keeps its
#: resolution in the line's order keys (doubles).
MIN_WEIGHT, MAX_WEIGHT = 0.01, 100.0


@dataclass(frozen=True)
class KeysConfig:
    """Every key's own sub-limit: its windows (same format as the limit's) and cap."""

    windows: tuple[Window, ...]
    max_in_flight: int | None

    @property
    def keep_ms(self) -> float:
        """How long an idle key's state lives at least: its longest window's period."""
        return max([2000.0, *(w.period_s * 1000.0 for w in self.windows)])


@dataclass(frozen=True)
class WeightsConfig:
    """Fair-share weights per key (a key not listed weighs ``default``)."""

    weights: tuple[tuple[str, float], ...] = ()
    default: float = 1.0

    def weight(self, key: str | None) -> float:
        for name, weight in self.weights:
            if name == (key or ""):
                return weight
        return self.default


def check_key(key: object, what: str = "key") -> str:
    """A key as given by a caller: a non-empty str of at most :data:`MAX_KEY_LENGTH`
    printable characters, else :class:`ConfigError` (before anything reaches Redis).

    Example::

        check_key("tenant-42")  # "tenant-42"
    """
    if isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH and key.isprintable():
        return key
    shown = repr(key) if len(repr(key)) <= 60 else f"{repr(key)[:40]}...({len(repr(key))} chars)"
    raise ConfigError(
        f"{what} must be a non-empty str of at most {MAX_KEY_LENGTH} printable characters "
        f"(no newlines or control characters), got {shown}"
    )


def key_hash(key: str | None) -> str:
    """The name a key's state is stored under: its sha1, hex, first 16 characters."""
    if not key:
        return DEFAULT_HASH
    return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def lease_key_hash(lease_id: str) -> str:
    """The key hash a keyed ticket or lease ends with (:data:`DEFAULT_HASH` for none)."""
    head, mark, tail = lease_id.rpartition(KEY_MARK)
    if mark and len(tail) == HASH_CHARS and head:
        return tail
    return DEFAULT_HASH


def key_redis_keys(namespace: str, limit: str, hashed: str) -> tuple[str, str]:
    """The key's ctl hash and leases zset, under the limit's hash tag."""
    prefix = f"{{{namespace}:{limit}}}:k:{hashed}"
    return f"{prefix}:ctl", f"{prefix}:leases"


def key_acquire_args(cfg: LimitConfig, key: str | None) -> list[bytes]:
    """acquire's arguments after the limit's window fields, for ``key`` (None: the default
    key, fair share only): constants as doubles, the key's window fields, its name."""
    keys, weights = cfg.keys, cfg.weights
    sub = keys is not None and key is not None
    windows = keys.windows if (keys is not None and sub) else ()
    cap = (keys.max_in_flight or 0) if (keys is not None and sub) else 0
    keep = keys.keep_ms if keys is not None else 2000.0
    weight = weights.weight(key) if weights is not None else 1.0
    values = (
        1.0 if sub else 0.0,
        weight,
        float(cap),
        keep,
        float(len(windows)),
        *(x for w in windows for x in (w.emission_ms, w.tolerance_ms)),
    )
    constants = struct.pack(f"<{len(values)}d", *values)
    return [constants, *(w.field.encode() for w in windows), (key or "").encode()]


def parse_weights(value: object, setting: str) -> WeightsConfig | None:
    """``{"acme": 3, ...}``: each key's weight, a number in [0.01, 100]."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{setting} must be a dict of key -> weight, got {value!r}")
    pairs = []
    for key, weight in value.items():
        where = f"{setting}[{key!r}]"
        if key != "":
            check_key(key, f"{setting} key")
        pairs.append((key, number(weight, where, lo=MIN_WEIGHT, hi=MAX_WEIGHT)))
    return WeightsConfig(tuple(pairs))
