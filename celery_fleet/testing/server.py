"""The HTTP plumbing of the provider simulator: a stdlib threading server no request can kill.

It knows nothing about limits: every request becomes a call to an ``App`` that returns a
:class:`Response` (after any simulated latency), and the handler writes it out. HTTP/1.1
keep-alive is on, because the ``openai`` SDK and httpx pool connections, and the server
closes the connections it still holds when it stops, so a stopped simulator really stops
answering.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from .wire import error_body

__all__ = ["Response", "App", "SimServer"]

logger = logging.getLogger("celery_fleet.testing")

_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass
class Response:
    """An answer to write: status, a JSON-serialisable body, extra headers; or, with
    ``stream``, server-sent events written as they come (chunked), after which ``done`` is
    called once, whether the stream was written whole or the client went away."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterable[bytes] | None = None
    done: Callable[[], None] | None = None


class App(Protocol):
    """What :class:`SimServer` calls for each request."""

    def handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response:
        """Answer one request; may block (simulated latency)."""
        ...


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms.
    disable_nagle_algorithm = True
    timeout = 30.0  # idle keep-alive connections give their thread back after this
    server: SimServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def do_GET(self) -> None:
        self._dispatch(b"")

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY_BYTES:
            # We did not read the body, so the connection cannot be reused.
            self.close_connection = True
            self._write(
                Response(
                    413 if length > 0 else 400,
                    error_body("Bad Content-Length.", "invalid_request_error"),
                )
            )
            return
        self._dispatch(self.rfile.read(length))

    def _dispatch(self, body: bytes) -> None:
        url = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            response = self.server.app.handle(
                self.command, url.path, parse_qs(url.query), headers, body
            )
        except Exception:
            logger.exception("provider simulator failed on %s %s", self.command, self.path)
            response = Response(
                500, error_body("The simulator failed; see its log.", "server_error")
            )
        self._write(response)

    def _write(self, response: Response) -> None:
        if response.stream is not None:
            try:
                self._write_stream(response, response.stream)
            finally:
                if response.done is not None:
                    response.done()
            return
        payload = json.dumps(response.body).encode()
        self.send_response(response.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _write_stream(self, response: Response, stream: Iterable[bytes]) -> None:
        self.send_response(response.status)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            for frame in stream:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away mid-stream
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s " + format, self.address_string(), *args)


class SimServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` with daemon threads that serves an :class:`App`.

    Example::

        server = SimServer(("127.0.0.1", 0), app)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ...
        server.close()
    """

    daemon_threads = True
    request_queue_size = (
        256  # bursts of connections from many workers must not be refused by the kernel
    )

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket) -> None:
        """Remember an open client connection so :meth:`close` can cut it."""
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        """Forget a connection its handler has finished with."""
        with self._connections_lock:
            self._connections.discard(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-answer are normal under load tests; never print tracebacks.
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)

    def close(self) -> None:
        """Stop serving (from another thread than ``serve_forever``); cut kept-alive connections."""
        self.shutdown()
        self.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
