"""The depths of broker queues, sampled for stealing and for status.

Example::

    depths = BrokerDepths(app)                  # a Celery app: its broker connection
    depths.depths(["fleet.affinity.0", "fleet.affinity.1"])   # {"fleet.affinity.0": 3, ...}

Imports nothing of Celery or kombu: it is handed the app and uses its
``connection_for_read()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import FleetError

__all__ = ["BrokerDepths"]


class BrokerDepths:
    """The depths of broker queues, read on a connection of its own (this thread's).

    On the Redis transport a queue's depth is the sum of its priority lists' ``LLEN``
    (kombu's ``Channel._size``, one pipeline); elsewhere (AMQP) a passive
    ``queue_declare``'s ``message_count``. A queue that does not exist is empty.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._connection: Any = None
        self._channel: Any = None

    def depths(self, names: Iterable[str]) -> dict[str, int]:
        """The depth of each named queue now (raises :class:`FleetError` when the broker
        does not answer)."""
        try:
            channel = self._open()
            return {name: self._depth(channel, name) for name in names}
        except Exception as exc:
            self.close()
            raise FleetError(f"could not read the affinity queues' depths: {exc!r}") from exc

    def _open(self) -> Any:
        if self._channel is None:
            self._connection = self.app.connection_for_read()
            self._connection.ensure_connection(max_retries=1)
            self._channel = self._connection.channel()
        return self._channel

    def _depth(self, channel: Any, name: str) -> int:
        size = getattr(channel, "_size", None)
        if size is not None:  # kombu's virtual transports (Redis): LLEN, no declare
            return int(size(name))
        try:
            return int(channel.queue_declare(queue=name, passive=True).message_count)
        except self._connection.channel_errors:
            # AMQP closes the channel on a 404 (no such queue yet): empty, new channel.
            self._channel = self._connection.channel()
            return 0

    def close(self) -> None:
        """Drop the connection (the next call opens a new one)."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # a broken connection: nothing more to release
                pass
