"""The few redis-py calls whose form changed between the versions the fleet supports (5.0-8.x).

Each difference is decided once, at import, from the installed redis-py's signatures, so a
call on the hot path costs what it costs on the newest redis-py:

- :func:`read_reply` reads one reply waiting no longer than a deadline. redis-py 8 takes
  ``read_response(timeout=...)``; before 8 the parsers read with whatever timeout the
  socket has, so the socket's timeout is set to the deadline around a plain
  ``read_response()`` and the connection's own ``socket_timeout`` put back after. Either
  way the deadline bounds each ``recv`` (as redis-py 8's own does), a read past it raises
  ``redis.TimeoutError`` and redis-py disconnects the connection (the reply may still come:
  the socket is out of step).
- :func:`take_connection` / :func:`atake_connection` check a connection out of a pool.
  redis-py 5.3 deprecated the command name that ``get_connection`` required before (5.0-5.2:
  a ``TypeError`` without it; 5.3 on: a ``DeprecationWarning`` with it).

Example::

    conn = take_connection(pool)
    conn.send_command("BLPOP", key, "5.000")
    reply = read_reply(conn, 5.0 + health_s)  # a frozen Redis: redis.TimeoutError
"""

from __future__ import annotations

import inspect
from typing import Any

import redis
import redis.asyncio

__all__ = ["HAS_READ_TIMEOUT", "atake_connection", "read_reply", "take_connection"]


def _takes(function: Any, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C function: assume the newest
        return True


def _optional_first(function: Any) -> bool:
    """True when ``function(self, command_name=None, ...)`` may be called without a name."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover
        return True
    return len(parameters) < 2 or parameters[1].default is not inspect.Parameter.empty


#: Whether this redis-py's ``Connection.read_response`` takes ``timeout=`` (8.0 on).
HAS_READ_TIMEOUT = _takes(redis.connection.Connection.read_response, "timeout")
_BARE_CHECKOUT = _optional_first(redis.ConnectionPool.get_connection)
_ABARE_CHECKOUT = _optional_first(redis.asyncio.ConnectionPool.get_connection)
#: The command name redis-py before 5.3 wants at checkout (it only logs or ignores it).
_CHECKOUT_NAME = "_"


def _read_with_timeout(conn: Any, timeout_s: float) -> Any:
    return conn.read_response(timeout=timeout_s)


def _read_on_socket_timeout(conn: Any, timeout_s: float) -> Any:
    # redis-py < 8: both parsers (PythonParser's SocketBuffer and _HiredisParser) recv with
    # the socket's current timeout unless told one, and a socket.timeout there becomes
    # redis.TimeoutError, on which Connection.read_response disconnects.
    sock = conn._sock
    if sock is None:  # nothing written on it since it was dropped: no reply will come
        raise redis.ConnectionError("reading a reply from a closed connection")
    sock.settimeout(timeout_s)
    try:
        return conn.read_response()
    finally:
        if conn._sock is sock:  # still connected (a timeout or an error disconnected it)
            sock.settimeout(conn.socket_timeout)


#: ``read_reply(conn, timeout_s)``: one reply of ``conn`` (a redis-py ``Connection``), each
#: read from its socket waiting at most ``timeout_s``; past it ``redis.TimeoutError`` and the
#: connection is disconnected. An error reply is raised (``redis.ResponseError``), as
#: ``read_response`` does.
read_reply = _read_with_timeout if HAS_READ_TIMEOUT else _read_on_socket_timeout


def take_connection(pool: Any) -> Any:
    """A connection checked out of ``pool`` (a blocking redis-py pool), connected; give it
    back with ``pool.release(conn)``."""
    if _BARE_CHECKOUT:
        return pool.get_connection()
    return pool.get_connection(_CHECKOUT_NAME)


async def atake_connection(pool: Any) -> Any:
    """:func:`take_connection` for a ``redis.asyncio`` pool."""
    if _ABARE_CHECKOUT:
        return await pool.get_connection()
    return await pool.get_connection(_CHECKOUT_NAME)
