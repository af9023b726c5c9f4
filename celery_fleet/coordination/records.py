"""Versioned records on the fleet's Redis: the shared database row with a version number.

Example::

    counter = fleet.record("jobs-done")
    while True:
        value, version = counter.get()                  # (None, 0) while absent
        if counter.compare_and_set(version, (value or 0) + 1):
            break                                       # else somebody wrote first: re-read

A record is a hash ``{<namespace>:record:<name>}`` holding its value as JSON text and its
version: 0 while absent, 1 after the first write, one more per write. A write names the
version it read and is made only if that is still the current one (one script, so it is
atomic across processes): of concurrent writers that read the same version exactly one
wins, and no update is lost. Values are plain JSON data (dict, list, str, int, float,
bool, None) of at most ``max_bytes``; they come back as JSON gives them (a tuple as a list).

With ``ttl_s`` each write keeps the record that long; when it expires it is absent again,
version 0 included. Without, it stays until deleted.

This module knows nothing about Celery.
"""

from __future__ import annotations

import json
from typing import Any

from ..checks import MAX_SECONDS, MAX_UNITS, check_name, number, positive_int
from ..errors import ConfigError
from ..store.specs import RECORD_CAS
from ..store.sync import RedisStore

__all__ = ["Record", "DEFAULT_RECORD_MAX_BYTES", "MAX_RECORD_BYTES"]

DEFAULT_RECORD_MAX_BYTES = 1 << 20
#: Redis's own limit on a string value.
MAX_RECORD_BYTES = 512 << 20


class Record:
    """One versioned record, shared by every process on the fleet's Redis.

    Args:
        store: the fleet's Redis.
        namespace: the fleet's key prefix.
        name: the record's name (letters, digits and ``_./@+-``).
        ttl_s: how long each write keeps the record (None: no expiry).
        max_bytes: the largest JSON text a write may store.
    """

    def __init__(
        self,
        store: RedisStore,
        namespace: str,
        name: str,
        ttl_s: float | None = None,
        max_bytes: int = DEFAULT_RECORD_MAX_BYTES,
    ) -> None:
        self.name = check_name(name, "record name", colon=False)
        where = f"record {name!r}"
        if ttl_s is None:
            self.ttl_ms = 0
        else:
            self.ttl_ms = max(
                1, round(number(ttl_s, f"{where} ttl", lo=0.001, hi=MAX_SECONDS) * 1000)
            )
        self.max_bytes = positive_int(max_bytes, f"{where} max_bytes", hi=MAX_RECORD_BYTES)
        self.store = store
        self.key = f"{{{namespace}:record:{name}}}"

    def get(self) -> tuple[Any, int]:
        """``(value, version)`` now; ``(None, 0)`` while the record is absent."""
        value, version = self.store.call("HMGET", self.key, "value", "version")
        if version is None:
            return None, 0
        return json.loads(value), int(version)

    def compare_and_set(self, version: int, value: Any) -> bool:
        """Write ``value`` if the record is still at ``version`` (0: absent), making it
        ``version + 1``; False, with nothing written, when another write came first (read
        again with :meth:`get` and retry)."""
        if (
            isinstance(version, bool)
            or not isinstance(version, int)
            or not 0 <= version < MAX_UNITS
        ):
            raise ConfigError(
                f"record {self.name!r}: version must be an int from 0 (absent) to "
                f"{MAX_UNITS - 1}, as get() returned it; got {version!r}"
            )
        written, _current = self._do_compare_and_set(version, self._encode(value))
        return written

    def _do_compare_and_set(self, version: int, text: str) -> tuple[bool, int]:
        """Run the script: ``(written, version now)``."""
        reply = RECORD_CAS.run(self.store, [self.key], [version, text, self.ttl_ms])
        return bool(reply.written), int(reply.version)

    def _encode(self, value: Any) -> str:
        try:
            text = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"record {self.name!r}: a {type(value).__name__} is not JSON-serialisable "
                f"({exc}); nothing was written. Store plain data (dict, list, str, int, "
                f"float, bool, None)"
            ) from None
        size = len(text.encode())
        if size > self.max_bytes:
            raise ConfigError(
                f"record {self.name!r}: the value is {size} bytes of JSON, more than "
                f"max_bytes = {self.max_bytes}; nothing was written"
            )
        return text

    def __repr__(self) -> str:
        ttl = f" ttl={self.ttl_ms / 1000:g}s" if self.ttl_ms else ""
        return f"<Record {self.name!r}{ttl}>"
