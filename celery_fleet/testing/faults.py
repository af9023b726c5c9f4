"""Fault injectors for the chaos suite: a killer of pool children, a Redis that goes away.

:class:`Killer` SIGKILLs pool processes of a :class:`~celery_fleet.testing.chaos.ChaosWorkers`
while they hold a slot and a key (claimed through the probe first, so a child that already
counted its completion is never killed). :class:`KeptRedisServer` is a private redis-server
that can stop and come back with its data (a broker outage), restart empty, freeze
(SIGSTOP) and be slowed (``DEBUG SLEEP``). Only processes started here are signalled.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import tempfile
import threading
import time

import redis

from .chaos import ChaosWorkers, Probe, kill_quietly, wait_until
from .redis_server import RedisServer, find_binary

__all__ = ["KeptRedisServer", "Killer"]


class Killer:
    """A thread that SIGKILLs pool children inside a guarded section (holding a slot and a
    key), ``kills`` times, one every ``every_s`` (jittered) at most.

    A victim is claimed through :meth:`Probe.doom` first, so a child that already counted its
    completion is never killed, and killed only if it is a child of ``workers``.
    """

    def __init__(self, probe: Probe, workers: ChaosWorkers, seed: int = 0) -> None:
        self.probe = probe
        self.workers = workers
        self.kills = 0
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, kills: int, every_s: float) -> Killer:
        self._thread = threading.Thread(
            target=self._run, args=(kills, every_s), name="chaos-killer", daemon=True
        )
        self._thread.start()
        return self

    def _run(self, kills: int, every_s: float) -> None:
        client = self.probe.client
        while self.kills < kills and not self._stop.is_set():
            inside = [int(p) for p in client.smembers(self.probe.key("inside"))]
            ours = self.workers.children()
            candidates = [p for p in inside if p in ours]
            if not candidates:
                self._stop.wait(0.02)
                continue
            pid = self._rng.choice(candidates)
            if self.probe.doom(pid):
                kill_quietly(pid)
                self.kills += 1
                client.srem(self.probe.key("doomed"), pid)
            self._stop.wait(every_s * self._rng.uniform(0.5, 1.5))

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self.join(10)


class KeptRedisServer(RedisServer):
    """A private redis-server that can go down and come back with its data (a broker outage),
    or restart empty, freeze (SIGSTOP) and be slowed (``DEBUG SLEEP``).

    Example::

        with KeptRedisServer() as broker:
            broker.down()            # SHUTDOWN SAVE: clients are refused
            broker.up()              # same port, same data
    """

    def start(self, timeout: float = 10.0) -> KeptRedisServer:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="celery-fleet-chaos-")
        binary = self.binary or find_binary()
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        options += ["--appendonly", "no", "--dir", self._dir.name, "--daemonize", "no"]
        options += ["--enable-debug-command", "local"]  # DEBUG SLEEP: slow()
        self.proc = subprocess.Popen(
            [binary, *options, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            ok = wait_until(lambda: _pings(client), timeout, 0.05)
        finally:
            client.close()
        if not ok:
            self.stop()
            raise RuntimeError(f"redis-server did not start on port {self.port}")
        return self

    def down(self) -> None:
        """Stop, saving the data set (RDB in the private dir) for :meth:`up`."""
        client = redis.Redis(port=self.port)
        try:
            client.shutdown(save=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        client.close()
        if self.proc is not None:
            self.proc.wait(10)
            self.proc = None

    def up(self) -> None:
        self.start()

    def restart_empty(self) -> None:
        """Kill (no save) and start again on the same port with nothing in it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        if self._dir is not None:
            for name in os.listdir(self._dir.name):
                os.unlink(os.path.join(self._dir.name, name))
        self.start()

    def freeze(self, seconds: float) -> None:
        """SIGSTOP the server for ``seconds`` (connections stay open, nothing answers)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def slow(self, seconds: float) -> None:
        """Block the server for ``seconds`` with ``DEBUG SLEEP`` (returns when it is over)."""
        client = redis.Redis(port=self.port, socket_timeout=seconds + 10)
        try:
            client.execute_command("DEBUG", "SLEEP", seconds)  # type: ignore[no-untyped-call]
        finally:
            client.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return False
