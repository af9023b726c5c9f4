"""``celery -A proj fleet web``: a small live page of the fleet's state, read-only.

:class:`FleetPage` serves, with the standard library's ``ThreadingHTTPServer`` (no web
framework):

- ``/``: one page (HTML, CSS and JavaScript inline: no CDN, it works offline) that polls
  the JSON below every ``interval_s`` and shows, per limit, the budget left in each window,
  in flight against the cap, the adaptive cap and rate factor, a provider pause, the
  breaker, the line's length and the waits of recent admissions, each priority lane (in
  flight / may hold / owed / waiting), a keyed limit's busiest keys and the runtime change
  in force (``fleet.set_limit``: its version and fields), with sparklines of the last
  ``history_s`` seconds (in flight per lane too);
- ``/api/status``: the same rows as ``celery fleet status --json`` (``limits``), this
  process's ring buffer of recent readings (``history``) and the admissions, refusals and
  mean wait of the last minute (``activity``, from the fleet's counters). While Redis does
  not answer it is a ``503`` whose ``error`` says why, with the last good reading.

One :class:`~celery_fleet.observability.sampler.Sampler` thread reads Redis every
``interval_s`` (one read-only round trip per limit for the status, one ``HGETALL`` for its
counters), however many browsers watch: the pages read its latest reading, never Redis. It
survives any error, so the page says "Redis unreachable" and recovers when Redis is back.

It is read-only: only ``GET`` is served (any other method is a ``405``). It listens on
127.0.0.1 unless told otherwise, and then also refuses requests whose ``Host`` is not a
loopback name (a web page that rebinds its own DNS name to 127.0.0.1 cannot read it). With
``auth="user:password"`` every request needs HTTP basic authentication.

Example::

    page = FleetPage(Fleet(app), port=8555, auth="ops:s3cret")
    page.serve_forever()          # or: with page.start(): ... (a thread of its own)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from ..checks import check_port
from ..errors import ConfigError
from .sampler import PageSource, Sampler

__all__ = ["AUTH_ENV", "BasicAuth", "DEFAULT_PORT", "FleetPage"]

log = logging.getLogger("celery_fleet")

#: The port ``celery fleet web`` listens on unless ``--port`` says otherwise.
DEFAULT_PORT = 8555
#: The environment variable ``--auth`` is read from when not given (keeps it out of ``ps``).
AUTH_ENV = "CELERY_FLEET_WEB_AUTH"


@dataclass(frozen=True)
class BasicAuth:
    """The one user and password the page asks for (HTTP basic authentication).

    Example::

        auth = BasicAuth.parse("ops:s3cret")
        auth.allows("Basic b3BzOnMzY3JldA==")   # True
    """

    user: str
    password: str

    @classmethod
    def parse(cls, text: str, what: str = "auth") -> BasicAuth:
        """``"user:password"`` (the password may hold ``:``); a :class:`ConfigError` naming
        ``what`` otherwise."""
        user, colon, password = text.partition(":")
        # The value is a secret: say what is wrong with it, never echo it.
        wrong = "no ':'" if not colon else "an empty user" if not user else "an empty password"
        if not colon or not user or not password:
            raise ConfigError(f"{what} must be 'user:password', got a value with {wrong}")
        return cls(user, password)

    def allows(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries this user and password (compared in
        constant time, so the response time does not tell how much of a guess was right)."""
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        expected = f"{self.user}:{self.password}".encode()
        return hmac.compare_digest(given, expected)

    def __repr__(self) -> str:  # never print the password
        return f"BasicAuth(user={self.user!r}, password='***')"


def _page() -> tuple[bytes, str]:
    """The page's HTML, and a Content-Security-Policy allowing only its own inline script
    and style (by hash) and requests to this server."""
    html = resources.files(__package__).joinpath("fleet_page.html").read_text("utf-8")

    def digest(tag: str) -> str:
        body = html.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    csp = (
        f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    )
    return html.encode(), csp


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port: ``[::1]:8555`` -> ``[::1]``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "celery-fleet"
    sys_version = ""
    timeout = 30  # an idle connection does not keep its thread forever

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._allowed():
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, self.server.html, "text/html; charset=utf-8")
        elif path == "/api/status":
            status, body = self.server.sampler.document()
            self._send(status, json.dumps(body).encode(), "application/json")
        else:
            self._send(404, b'{"error": "not found"}', "application/json")

    def _refuse(self) -> None:
        self._send(405, b'{"error": "read-only: only GET"}', "application/json", Allow="GET")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = _refuse  # noqa: N815
    do_CONNECT = _refuse  # noqa: N815

    def _allowed(self) -> bool:
        hosts = self.server.allowed_hosts
        if hosts is not None:
            if _host_name(self.headers.get("Host") or "") not in hosts:
                self._send(403, b'{"error": "unexpected Host header"}', "application/json")
                return False
        auth = self.server.auth
        if auth is not None and not auth.allows(self.headers.get("Authorization")):
            self._send(
                401,
                b'{"error": "authentication required"}',
                "application/json",
                **{"WWW-Authenticate": 'Basic realm="celery fleet", charset="UTF-8"'},
            )
            return False
        return True

    def _send(self, status: int, body: bytes, kind: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", self.server.csp)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def version_string(self) -> str:
        return self.server_version  # no Python version for strangers

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("celery-fleet web: %s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        sampler: Sampler,
        auth: BasicAuth | None,
        allowed_hosts: set[str] | None,
    ) -> None:
        self.sampler, self.auth, self.allowed_hosts = sampler, auth, allowed_hosts
        self.html, self.csp = _page()
        if ":" in address[0]:  # an IPv6 address ("::1", "::")
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A browser that hangs up mid-reply is not worth a traceback; the server goes on.
        log.debug("celery-fleet web: error serving %s", client_address, exc_info=True)


class FleetPage:
    """The fleet page and its JSON, served over HTTP from this process (see the module
    docstring). Checks its arguments at once (:class:`ConfigError` naming the bad one);
    binds its socket when created, so ``url`` is known (``port=0``: a free port).

    Example::

        with FleetPage(fleet, port=0).start() as page:
            print(page.url)        # http://127.0.0.1:40123/
    """

    def __init__(
        self,
        fleet: PageSource,
        limits: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        auth: str | BasicAuth | None = None,
        interval_s: float = 1.0,
        history_s: float = 300.0,
    ) -> None:
        known = sorted(fleet.limits)
        names = list(limits or known)
        unknown = [n for n in names if n not in fleet.limits]
        if unknown:
            raise ConfigError(f"unknown limit(s) {unknown}: the configured ones are {known}")
        if port != 0:
            check_port(port, "port")
        if not 0.1 <= interval_s <= 3600:
            raise ConfigError(f"interval_s must be 0.1-3600 seconds, got {interval_s!r}")
        if not interval_s <= history_s <= 86_400:
            raise ConfigError(f"history_s must be interval_s-86400 seconds, got {history_s!r}")
        self.auth = BasicAuth.parse(auth) if isinstance(auth, str) else auth
        self.sampler = Sampler(fleet, names, interval_s, history_s)
        # On a loopback address only loopback Host names are served (DNS rebinding).
        self.loopback = _loopback(host)
        hosts = {"127.0.0.1", "localhost", "[::1]", host.lower()} if self.loopback else None
        try:
            self.server = _Server((host, port), self.sampler, self.auth, hosts)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host, self.port = host, int(self.server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> FleetPage:
        """Read the fleet once, then serve from a daemon thread; returns self."""
        self.sampler.read_once()
        self.sampler.start()
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="fleet-web-http", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Read the fleet once, then serve in this thread until :meth:`close` (or Ctrl-C)."""
        self.sampler.read_once()
        self.sampler.start()
        try:
            self.server.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        """Stop serving and reading; idempotent."""
        self.sampler.stop()
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.server.server_close()

    def __enter__(self) -> FleetPage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
