"""The Redis connection and the Lua scripts, per process and fork-safe.

A :class:`RedisStore` creates its client lazily and again in every process it finds
itself in (it compares ``os.getpid()``), because a client created before Celery's prefork
``fork()`` would share its sockets with the children. Scripts are run by SHA1 with
EVALSHA; when the server answers NOSCRIPT the source is loaded and the call repeated, so
``SCRIPT FLUSH`` or a failover to a fresh replica is transparent.

Every Redis error is translated here: connection problems become
:class:`~celery_fleet.errors.StoreUnavailable` naming the URL, anything else a
:class:`~celery_fleet.errors.FleetError`; no raw ``redis.exceptions`` reach the API.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.exceptions import NoScriptError

from .errors import ConfigError, FleetError, StoreUnavailable

__all__ = ["RedisStore", "mask_url", "script_source"]

SCRIPTS = ("acquire", "release", "settle", "renew", "observe", "breaker_admin")


@cache
def script_source(name: str) -> str:
    """The text of ``celery_fleet/scripts/<name>.lua``."""
    return resources.files("celery_fleet.scripts").joinpath(f"{name}.lua").read_text("utf-8")


_live_stores: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for store in list(_live_stores):
        store._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


class RedisStore:
    """One Redis URL, a lazily created client per process, and the registered scripts.

    Example::

        store = RedisStore("redis://127.0.0.1:6379/1")
        reply = store.run("acquire", keys=[...], args=[...])
    """

    def __init__(self, url: str, **client_options: Any) -> None:
        self.url = url
        self.safe_url = mask_url(url)
        self._options = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0, **client_options}
        try:  # parse now (no connection): a bad port or option is a ConfigError at start-up
            redis.ConnectionPool.from_url(url, **self._options).disconnect()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"invalid Redis URL {self.safe_url}: {exc}") from None
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._client: redis.Redis | None = None
        _live_stores.add(self)
        self._shas = {name: _sha1(script_source(name)) for name in SCRIPTS}

    def _after_fork(self) -> None:
        # A fork while another thread held the lock would leave it held forever here.
        self._lock = threading.Lock()
        self._client, self._pid = None, None

    @property
    def client(self) -> redis.Redis:
        """This process's client (created on first use, and again after a fork)."""
        pid = os.getpid()
        if self._pid != pid or self._client is None:
            with self._lock:
                if self._pid != pid or self._client is None:
                    client = redis.Redis.from_url(self.url, **self._options)
                    self._client, self._pid = client, pid
        return self._client

    def reset(self) -> None:
        """Forget this process's client (called from ``worker_process_init``).

        The old client is not closed: after a fork its sockets belong to the parent.
        """
        with self._lock:
            self._client, self._pid = None, None

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run one script by EVALSHA: exactly one round trip (two after SCRIPT FLUSH).

        Called directly rather than through redis-py's ``Script`` wrapper, which copies the
        arguments on every call: this is the hot path. When the server answers NOSCRIPT
        (flush, failover, a fresh server) the source is loaded and the call made again.
        """
        try:
            client = self.client
            try:
                return client.execute_command(
                    "EVALSHA", self._shas[script], len(keys), *keys, *args
                )  # type: ignore[no-untyped-call]
            except NoScriptError:
                client.script_load(script_source(script))
                return client.execute_command(
                    "EVALSHA", self._shas[script], len(keys), *keys, *args
                )  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(self.safe_url, exc) from exc
        except redis.RedisError as exc:
            raise FleetError(
                f"celery-fleet script {script!r} failed on {self.safe_url}: {exc}"
            ) from exc

    def call(self, command: str, *args: Any) -> Any:
        """Run one plain Redis command with the same error translation as :meth:`run`."""
        try:
            return self.client.execute_command(command, *args)  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(self.safe_url, exc) from exc
        except redis.RedisError as exc:
            raise FleetError(f"celery-fleet {command} failed on {self.safe_url}: {exc}") from exc

    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` (naming the URL) unless Redis answers."""
        self.call("PING")

    def __repr__(self) -> str:
        return f"RedisStore({self.safe_url!r})"
