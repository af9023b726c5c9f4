"""Replies read straight off the combiner's socket: RESP2 and RESP3 without redis-py's parser.

A decision's round trip is one write and one short reply (an integer, a lease id, a small
array). redis-py's pure-Python parser spends ~45 Python calls on such a reply (a
``BytesIO`` buffer sought and told per line, the error text's host string built for every
read); :class:`BareReader` spends ~8: one ``recv``, a ``find`` and a slice or two. That is
a fifth of a healthy ``slot()``'s client work, paid on every decision.

It reads only where nothing else must see the reply: a connection whose class is exactly
redis-py's plain TCP or Unix-socket ``Connection`` (not TLS, not a Sentinel-managed one,
whose ``read_response`` checks where the master is) with no periodic health check;
every other connection keeps redis-py's own reads (:func:`reader_for` says None). It
reads what redis-py 8's RESP3 parser reads, the same way (RESP2's types are a subset of
RESP3's), and a push message (RESP3: an invalidation, a maintenance notice) goes to the
parser's own push handler before the read goes on to the reply. The connection's
handshake (AUTH, SELECT, CLIENT SETNAME) stays redis-py's: the reader starts on a socket
with nothing left in redis-py's buffer.

Errors are redis-py's: an error reply is the exception ``parse_error`` makes of it (raised
at the top level, kept in an array, as redis-py does; ``NoScriptError`` included), a
closed socket is ``redis.ConnectionError``, a read past its timeout ``redis.TimeoutError``;
on any failure mid-reply (an interrupt included) the connection is disconnected, as it is
out of step. Bytes the reader holds beyond the replies read belong to replies nobody has
asked for yet (:meth:`BareReader.pending`).

Example::

    reader = reader_for(conn)          # None: use conn.read_response()
    send(conn, packed)
    reply = reader.read(conn)          # or reader.read(conn, timeout=0.2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from redis.connection import Connection, UnixDomainSocketConnection

__all__ = ["BareReader", "reader_for", "send"]

#: The connection classes whose reads may bypass redis-py (their ``read_response`` adds
#: nothing but the parsing: subclasses may, so they are not included).
PLAIN = (Connection, UnixDomainSocketConnection)
#: Bytes asked of the socket per ``recv``.
CHUNK = 65536


def reader_for(conn: Any) -> BareReader | None:
    """A :class:`BareReader` for ``conn`` when its replies can be read bare, else None."""
    if type(conn) not in PLAIN:
        return None
    if str(getattr(conn, "protocol", 2) or 2) not in ("2", "3"):
        return None
    if getattr(conn, "health_check_interval", 0):
        return None  # redis-py would PING an idle connection before writing: keep its path
    encoder = getattr(conn, "encoder", None)
    decode = encoder.decode if encoder is not None and encoder.decode_responses else None
    parser = conn._parser
    return BareReader(decode, parser.parse_error, getattr(parser, "handle_push_response", None))


def send(conn: Any, data: bytes) -> None:
    """Write ``data`` on ``conn``'s (connected) socket, failing as redis-py's
    ``send_packed_command`` does: a timeout or a socket error disconnects and raises
    ``redis.TimeoutError`` / ``redis.ConnectionError``; an interrupt disconnects (part of
    the command may be on the wire) and propagates."""
    try:
        conn._sock.sendall(data)
    except BaseException as exc:
        failure = _dropped(conn, exc, "writing to")
        if failure is exc:
            raise
        raise failure from None


def _dropped(conn: Any, exc: BaseException, doing: str) -> BaseException:
    """Disconnect ``conn`` (whatever broke a read or a write off, the socket is out of step)
    and say what to raise: redis-py's exception for a socket's timeout or error, else
    ``exc`` itself (a closed connection, a protocol error, an interrupt)."""
    conn.disconnect()
    if isinstance(exc, TimeoutError):
        return redis.TimeoutError(f"Timeout {doing} socket")
    if isinstance(exc, OSError):
        return redis.ConnectionError(f"Error while {doing} socket: {exc}")
    return exc


class BareReader:
    """Reads one connection's replies off its socket (see the module)."""

    __slots__ = ("_buf", "_pos", "_sock", "_decode", "_parse_error", "_push")

    def __init__(
        self,
        decode: Callable[[bytes], Any] | None,
        parse_error: Callable[[str], Any],
        push: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self._buf = b""
        self._pos = 0
        #: The socket the buffer came from: a new socket (a reconnect) starts empty.
        self._sock: Any = None
        self._decode = decode
        self._parse_error = parse_error
        self._push = push

    def pending(self, conn: Any) -> bool:
        """Whether bytes of ``conn``'s current socket were received but not read."""
        return self._sock is conn._sock and self._pos < len(self._buf)

    def read(self, conn: Any, timeout: float | None = None) -> Any:
        """The next reply on ``conn``; ``timeout`` (s) bounds each ``recv`` instead of the
        socket's own timeout. An error reply is raised (``redis.ResponseError``)."""
        sock = conn._sock
        if sock is None:  # dropped since written: no reply will come
            raise redis.ConnectionError("reading a reply from a closed connection")
        if sock is not self._sock:
            self._sock, self._buf, self._pos = sock, b"", 0
        if timeout is not None:
            sock.settimeout(timeout)
        try:
            reply = self._reply(sock)
        except BaseException as exc:
            failure = _dropped(conn, exc, "reading from")
            if failure is exc:
                raise
            raise failure from None
        finally:
            if timeout is not None and conn._sock is sock:
                sock.settimeout(conn.socket_timeout)
        if isinstance(reply, redis.ResponseError):
            raise reply
        return reply

    def _reply(self, sock: Any) -> Any:
        while True:
            line = self._line(sock)
            kind = line[:1]
            if kind == b":":
                return int(line[1:])
            if kind == b"$":
                size = int(line[1:])
                if size < 0:
                    return None
                data = self._take(sock, size)
                return data if self._decode is None else self._decode(data)
            if kind == b"*":
                size = int(line[1:])
                if size < 0:
                    return None
                return [self._reply(sock) for _ in range(size)]
            if kind == b">":  # a push: to the parser's handler, then on to the reply
                items = [self._reply(sock) for _ in range(int(line[1:]))]
                if self._push is not None:
                    self._push(items)
                continue
            return self._other(sock, kind, line)

    def _other(self, sock: Any, kind: bytes, line: bytes) -> Any:
        """The rarer types, as redis-py's RESP3 parser reads them."""
        if kind == b"+":
            data = line[1:]
            return data if self._decode is None else self._decode(data)
        if kind in (b"-", b"!"):
            text = line[1:] if kind == b"-" else self._take(sock, int(line[1:]))
            error = self._parse_error(text.decode("utf-8", errors="replace"))
            if isinstance(error, redis.ConnectionError):  # LOADING and the like: as redis-py
                raise error
            return error
        if kind == b"_":
            return None
        if kind == b"#":
            return line[1:] == b"t"
        if kind == b"(":
            return int(line[1:])
        if kind == b",":
            return float(line[1:])
        if kind == b"=":
            data = self._take(sock, int(line[1:]))[4:]
            return data if self._decode is None else self._decode(data)
        if kind == b"~":  # a set: a list, as redis-py gives it
            return [self._reply(sock) for _ in range(int(line[1:]))]
        if kind == b"%":
            pairs: dict[Any, Any] = {}
            for _ in range(int(line[1:])):
                key = self._reply(sock)
                pairs[key] = self._reply(sock)
            return pairs
        raise redis.InvalidResponse(f"Protocol Error: {line!r}")

    def _line(self, sock: Any) -> bytes:
        buf, pos = self._buf, self._pos
        end = buf.find(b"\r\n", pos)
        while end < 0:
            buf, pos = self._fill(sock), 0
            end = buf.find(b"\r\n")
        self._pos = end + 2
        return buf[pos:end]

    def _take(self, sock: Any, size: int) -> bytes:
        buf, pos, need = self._buf, self._pos, size + 2
        if len(buf) - pos < need:
            # A long bulk: its chunks gathered and joined once (appending each chunk to
            # the buffer would copy it over and over: quadratic in the reply's size).
            parts, have = [buf[pos:]], len(buf) - pos
            while have < need:
                chunk = self._recv(sock, max(CHUNK, need - have))
                parts.append(chunk)
                have += len(chunk)
            buf, pos = b"".join(parts), 0
            self._buf = buf
        self._pos = pos + need
        return buf[pos : pos + size]

    def _fill(self, sock: Any) -> bytes:
        chunk = self._recv(sock, CHUNK)
        rest = self._buf[self._pos :]
        buf: bytes = rest + chunk if rest else chunk
        self._buf, self._pos = buf, 0
        return buf

    @staticmethod
    def _recv(sock: Any, size: int) -> bytes:
        chunk: bytes = sock.recv(size)
        if not chunk:
            raise redis.ConnectionError("Connection closed by server.")
        return chunk
