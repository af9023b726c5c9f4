"""Round trips of this process, counted as writes on redis-py connections.

Importing it wraps ``AbstractConnection.send_packed_command`` once; :data:`writes` counts
every write since (a pipeline is one write, like a round trip). Used by
``idempotency.py`` and ``metrics_overhead.py``.
"""

from __future__ import annotations

from typing import Any

import redis.connection

__all__ = ["writes"]

#: Writes so far (a one-element list, so importers see it move).
writes = [0]
_send = redis.connection.AbstractConnection.send_packed_command


def _counting(self: Any, command: Any, check_health: bool = True) -> None:
    writes[0] += 1
    _send(self, command, check_health)


if getattr(_send, "__name__", "") != "_counting":
    redis.connection.AbstractConnection.send_packed_command = _counting  # type: ignore[method-assign]
