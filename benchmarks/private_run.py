"""Shared by the one-process benchmarks on a private redis-server (``idempotency.py``,
``metrics_overhead.py``): a round-trip counter and the report.

Importing it wraps ``AbstractConnection.send_packed_command`` and the combiner's own
``celery_fleet.store.replies.send`` once; :data:`writes` counts every write since (a
pipeline is one write, like a round trip).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.connection

__all__ = ["writes", "report"]

#: Writes so far (a one-element list, so importers see it move).
writes = [0]
_send = redis.connection.AbstractConnection.send_packed_command


def _counting(self: Any, command: Any, check_health: bool = True) -> None:
    writes[0] += 1
    _send(self, command, check_health)


if getattr(_send, "__name__", "") != "_counting":
    redis.connection.AbstractConnection.send_packed_command = _counting  # type: ignore[method-assign]

    # The combiner writes on its own connection without send_packed_command.
    from celery_fleet.store import replies as _replies

    _bare_send = _replies.send

    def _bare_counting(conn: Any, data: bytes) -> None:
        writes[0] += 1
        _bare_send(conn, data)

    _replies.send = _bare_counting


def report(body: str, url: str, title: str, write: bool) -> None:
    """Print ``body``; unless ``write`` is false, append it to RESULTS.md as ``title``."""
    print(body)
    if write:
        from results import append_section  # benchmarks/ is on sys.path as a script

        append_section(redis.Redis.from_url(url), body, title=title)
