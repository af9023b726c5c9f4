"""Private highly available Redis deployments for tests: a Cluster and a Sentinel set.

Both start real ``redis-server`` processes on free loopback ports (never the shared Redis
on 6379), stop them by pid on exit, and can kill, pause or resume one of them to stage a
failure.

Example::

    with LocalCluster(masters=3) as cluster:
        fleet = Fleet(redis_url=cluster.url, limits={...})     # redis+cluster://...

    with SentinelSet(master_name="fleet") as ha:
        fleet = Fleet(redis_url=ha.url, limits={...})
        ... fleet.store.transport_options={"master_name": "fleet"} ...
        ha.kill_master(); ha.wait_for_failover()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import redis

from .redis_server import NoRedisServer, RedisServer, answers, find_binary, free_port, stop_process

__all__ = ["LocalCluster", "SentinelSet", "find_cli", "free_port_pair"]

#: Redis Cluster's bus port is the client port + 10000.
BUS_OFFSET = 10_000


def find_cli(server_binary: str | None = None) -> str:
    """Path of ``redis-cli`` (beside ``redis-server`` or on PATH); NoRedisServer if none."""
    binary = server_binary or find_binary(install=False)
    beside = os.path.join(os.path.dirname(binary), "redis-cli")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("redis-cli")
    if found:
        return found
    raise NoRedisServer("no redis-cli binary (needed to create a Redis Cluster)")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + BUS_OFFSET < 65_536 and _port_free(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _wait(check: object, timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def _ask(client: redis.Redis, command: str, name: str) -> Any:
    """A SENTINEL command's parsed reply. Not redis-py's sentinel_* methods: on a plain
    client, 6.x hands their return_responses option to the reply parser (TypeError)."""
    return client.execute_command(command, name)  # type: ignore[no-untyped-call]


def _signal(server: RedisServer | _Sentinel, sig: signal.Signals) -> None:
    proc = server.proc
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, sig)


class LocalCluster:
    """A Redis Cluster of ``masters`` primaries (no replicas), created with
    ``redis-cli --cluster create`` and ready (``cluster_state:ok`` on every node).

    :attr:`url` is ``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...``.
    """

    def __init__(self, masters: int = 3, node_timeout_ms: int = 2000) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.servers: list[RedisServer] = []

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (for checks: CLUSTER INFO, SCRIPT FLUSH...)."""
        return redis.Redis(port=port, socket_timeout=5)

    def start(self, timeout: float = 30.0) -> LocalCluster:
        binary = find_binary(install=False)
        cli = find_cli(binary)
        try:
            for _ in range(self.masters):
                args = [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                ]  # fmt: skip
                server = RedisServer(port=free_port_pair(), binary=binary, args=args)
                self.servers.append(server.start())
            nodes = [f"127.0.0.1:{p}" for p in self.ports]
            subprocess.run(
                [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout,
            )
            for port in self.ports:
                client = self.node(port)
                try:
                    _wait(
                        lambda c=client: c.execute_command("CLUSTER INFO")["cluster_state"] == "ok",
                        timeout,
                        f"cluster_state:ok on port {port}",
                    )
                finally:
                    client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            _signal(server, signal.SIGCONT)
            server.stop()
        self.servers = []

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Sentinel:
    """One ``redis-server --sentinel`` with its own config file (sentinels rewrite it)."""

    def __init__(self, binary: str, port: int, lines: Sequence[str]) -> None:
        self.port = port
        self._dir = tempfile.TemporaryDirectory(prefix="celery-fleet-sentinel-")
        conf = os.path.join(self._dir.name, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(f"port {port}\nbind 127.0.0.1\ndir {self._dir.name}\n")
            f.write("".join(f"{line}\n" for line in lines))
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [binary, conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        self._dir.cleanup()


class SentinelSet:
    """One master, ``replicas`` replicas and ``sentinels`` sentinels (quorum ``quorum``)
    watching them as ``master_name``, with short failure detection for tests.

    :attr:`url` is kombu's syntax, ``sentinel://127.0.0.1:s1;sentinel://127.0.0.1:s2;...``;
    the master name goes in the transport options (``{"master_name": ha.master_name}``).
    """

    def __init__(
        self,
        master_name: str = "fleet-master",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.master_name = master_name
        self.n_replicas = replicas
        self.n_sentinels = sentinels
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers: list[RedisServer] = []  # master first, at start
        self.sentinels: list[_Sentinel] = []

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels)

    @property
    def transport_options(self) -> dict[str, object]:
        return {"master_name": self.master_name}

    def start(self, timeout: float = 30.0) -> SentinelSet:
        binary = find_binary(install=False)
        # Redis 7 waits 5 s before a diskless full sync: a replica would have no data yet.
        fast_sync = ["--repl-diskless-sync-delay", "0"]
        try:
            master = RedisServer(binary=binary, args=fast_sync).start()
            self.servers.append(master)
            for _ in range(self.n_replicas):
                args = [*fast_sync, "--replicaof", "127.0.0.1", str(master.port)]
                self.servers.append(RedisServer(binary=binary, args=args).start())
            for replica in self.servers[1:]:
                client = redis.Redis(port=replica.port, socket_timeout=5)
                try:
                    _wait(
                        lambda c=client: c.info("replication")["master_link_status"] == "up",
                        timeout,
                        f"replica {replica.port} to sync",
                    )
                finally:
                    client.close()
            name = self.master_name
            lines = [
                f"sentinel monitor {name} 127.0.0.1 {master.port} {self.quorum}",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1",
            ]
            for _ in range(self.n_sentinels):
                self.sentinels.append(_Sentinel(binary, free_port(), lines))
            for s in self.sentinels:
                _wait(lambda s=s: answers(f"redis://127.0.0.1:{s.port}"), timeout, "a sentinel")
            _wait(self._settled, timeout, "the sentinels to see each other and the replicas")
        except BaseException:
            self.stop()
            raise
        return self

    def _settled(self) -> bool:
        for s in self.sentinels:
            client = redis.Redis(port=s.port, socket_timeout=2)
            try:
                state = _ask(client, "SENTINEL MASTER", self.master_name)
            finally:
                client.close()
            if state["num-other-sentinels"] < self.n_sentinels - 1:
                return False
            if state["num-slaves"] < self.n_replicas:
                return False
        return True

    def master_address(self) -> tuple[str, int]:
        """The master as the first sentinel that answers sees it now."""
        for s in self.sentinels:
            client = redis.Redis(port=s.port, socket_timeout=2)
            try:
                address = _ask(client, "SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name)
                host, port = address
                return host.decode() if isinstance(host, bytes) else str(host), int(port)
            except (redis.RedisError, TypeError):
                continue
            finally:
                client.close()
        raise RuntimeError("no sentinel answers")

    def server(self, port: int) -> RedisServer:
        """The data server (master or replica) listening on ``port``."""
        return next(s for s in self.servers if s.port == port)

    def master(self) -> RedisServer:
        return self.server(self.master_address()[1])

    def kill(self, server: RedisServer) -> None:
        """SIGKILL ``server`` (no shutdown, nothing saved)."""
        _signal(server, signal.SIGKILL)
        if server.proc is not None:
            server.proc.wait(10)

    def pause(self, server: RedisServer) -> None:
        """SIGSTOP ``server``: its sockets stay open and nothing answers."""
        _signal(server, signal.SIGSTOP)

    def resume(self, server: RedisServer) -> None:
        _signal(server, signal.SIGCONT)

    def wait_for_failover(self, old_port: int, timeout: float = 30.0) -> tuple[str, int]:
        """Wait until every sentinel names a master other than ``old_port`` and it takes
        writes; return its address."""

        def moved() -> bool:
            for s in self.sentinels:
                client = redis.Redis(port=s.port, socket_timeout=2)
                try:
                    address = _ask(client, "SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name)
                finally:
                    client.close()
                port = address[1]
                if int(port) == old_port:
                    return False
            new = redis.Redis(port=int(port), socket_timeout=2)
            try:
                return bool(new.info("replication")["role"] == "master")
            finally:
                new.close()

        _wait(moved, timeout, f"a failover away from port {old_port}", step=0.1)
        return self.master_address()

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        self.sentinels = []
        for server in self.servers:
            _signal(server, signal.SIGCONT)
            server.stop()
        self.servers = []

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
