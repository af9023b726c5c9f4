"""The packed acquire and release of each key of a keyed limit, built on first use.

A limit without keys sends one pre-packed EVALSHA per ask (:class:`Admission`); a keyed
limit's asks name the key's two Redis keys and carry its arguments, so each key gets its
own pre-packed commands, kept in a bounded LRU (a million one-off keys never grow this
process without bound). A keyed ticket ends in ``-k<hash>`` (tenancy.py): every later
call about it (a resend, a release, a renewal, a settle) finds the key from the ticket.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, FleetError
from ..store.combiner import Packed
from ..store.specs import ACQUIRE, RELEASE
from ..store.sync import RedisStore
from .config import LimitConfig
from .decision import LimitKeys
from .tenancy import (
    DEFAULT_HASH,
    KEY_MARK,
    check_key,
    key_acquire_args,
    key_hash,
    key_redis_keys,
    lease_key_hash,
)

__all__ = ["KeyedCommands", "PACKS_KEPT", "NAMES_KEPT"]

#: Keys whose packed commands one process keeps (least recently used go first).
PACKS_KEPT = 4096
#: Keys whose name (the string a hash stands for) one process remembers.
NAMES_KEPT = 200_000


class KeyedCommands:
    """Per-key packed commands of an :class:`Admission`'s keyed limits.

    Example::

        keyed = KeyedCommands(store, "fleet", limits, keys, acquire_tails, release_tails)
        ticket = keyed.with_key(limits["openai"], "0f3a", "acme")  # "0f3a-k<hash>"
        command = keyed.acquire("openai", ticket)         # a Packed acquire for "acme"
    """

    def __init__(
        self,
        store: RedisStore,
        namespace: str,
        limits: Mapping[str, LimitConfig],
        keys: Mapping[str, LimitKeys],
        acquire_tails: Mapping[str, list[bytes]],
        release_tails: Mapping[str, list[bytes]],
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.limits = limits
        self.keys = keys
        self.acquire_tails = acquire_tails
        self.release_tails = release_tails
        self._packs: OrderedDict[tuple[str, str], tuple[Packed, Packed | None]] = OrderedDict()
        self._names: OrderedDict[str, str] = OrderedDict()

    def with_key(self, cfg: LimitConfig, lease_id: str, key: str | None) -> str:
        """``lease_id`` (a caller's own) marked with ``key``'s hash unless it already is."""
        if key is None:
            return lease_id
        hashed = self.hash_of(cfg, key)
        if lease_key_hash(lease_id) == hashed:
            return lease_id
        return lease_id + KEY_MARK + hashed

    def forget(self, name: str) -> None:
        """Drop the commands packed for ``name``'s keys (its constants changed at runtime:
        they are packed again on their next use)."""
        for cached in [k for k in list(self._packs) if k[0] == name]:
            self._packs.pop(cached, None)

    def hash_of(self, cfg: LimitConfig, key: str) -> str:
        check_key(key)
        if not cfg.keyed:
            raise ConfigError(
                f"key={key!r} given for limit {cfg.name!r}, which has no keys: add "
                f'"keys": {{...}} (every key\'s own budgets) or "weights": {{}} (fair share '
                f"only) to fleet_limits[{cfg.name!r}]"
            )
        hashed = key_hash(key)
        names = self._names
        if names.get(hashed) != key:
            names[hashed] = key
            if len(names) > NAMES_KEPT:
                _drop_oldest(names)
        return hashed

    def _packed(self, name: str, hashed: str) -> tuple[Packed, Packed | None]:
        found = self._packs.get((name, hashed))
        if found is not None:
            try:
                self._packs.move_to_end((name, hashed))
            except KeyError:  # another thread dropped it meanwhile: it is still good
                pass
            return found
        cfg = self.limits[name]
        if hashed == DEFAULT_HASH:
            key: str | None = None
        else:
            key = self._names.get(hashed)
            if key is None:
                raise FleetError(
                    f"a ticket of limit {name!r} names key hash {hashed!r}, unknown to this "
                    f"process: make keyed tickets with fleet.slot/try_acquire(key=...)"
                )
        ctl, leases = key_redis_keys(self.namespace, name, hashed)
        base = ACQUIRE.keys_of(self.keys[name])
        tail = [*self.acquire_tails[name], *key_acquire_args(cfg, key)]
        acquire = self.store.packed(ACQUIRE.name, [*base, ctl, leases], 5, tail)
        release = None
        if key is not None and cfg.keys is not None and cfg.keys.max_in_flight:
            keys = [*RELEASE.keys_of(self.keys[name]), leases]
            release = self.store.packed(RELEASE.name, keys, 5, self.release_tails[name])
        self._packs[(name, hashed)] = (acquire, release)
        if len(self._packs) > PACKS_KEPT:
            _drop_oldest(self._packs)
        return acquire, release

    def acquire(self, name: str, lease_id: str) -> Packed:
        """The packed acquire for the key ``lease_id`` was made for."""
        return self._packed(name, lease_key_hash(lease_id))[0]

    def release(self, name: str, lease_id: str) -> Packed | None:
        """The packed release that also frees the key's own slot (None: the key has none,
        or the lease has no key)."""
        hashed = lease_key_hash(lease_id)
        cfg = self.limits[name]
        if hashed == DEFAULT_HASH or cfg.keys is None or not cfg.keys.max_in_flight:
            return None
        _ctl, leases = key_redis_keys(self.namespace, name, hashed)
        base = [*RELEASE.keys_of(self.keys[name]), leases]
        found = self._packs.get((name, hashed))
        if found is not None and found[1] is not None:
            return found[1]
        # a lease whose key this process no longer remembers (a replayed release)
        return self.store.packed(RELEASE.name, base, 5, self.release_tails[name])

    def state_keys(self, name: str, lease_id: str) -> tuple[str, str] | None:
        """The key's ctl hash and leases zset for a keyed lease (None: it has no key)."""
        hashed = lease_key_hash(lease_id)
        if hashed == DEFAULT_HASH or self.limits[name].keys is None:
            return None
        return key_redis_keys(self.namespace, name, hashed)


def _drop_oldest(lru: OrderedDict[Any, Any]) -> None:
    """Forget the least recently used entry (threads share the LRU: one may have emptied
    it meanwhile; an entry forgotten twice is rebuilt on its next use)."""
    try:
        lru.popitem(last=False)
    except KeyError:
        pass
