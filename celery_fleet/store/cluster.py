"""Redis Cluster for the fleet's store: a client whose failures are all Redis errors, and the
combiner's interface routed by hash slot.

:class:`FleetCluster` is ``RedisCluster`` with every cluster failure turned into a
``redis.RedisError`` the store translates; :class:`ClusterCombiner` stands in for
:class:`~celery_fleet.store.combiner.Combiner` on a cluster, where raw bytes cannot be
written to one
connection when calls belong to different nodes. How a cluster is asked for (the
``redis+cluster://`` scheme) is :mod:`celery_fleet.store.connect`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

__all__ = ["FleetCluster", "ClusterCombiner", "cluster_error", "new_cluster", "unpack"]

log = logging.getLogger("celery_fleet")


class FleetCluster(RedisCluster):
    """``RedisCluster`` whose failures are all ``redis.RedisError``s.

    redis-py raises some cluster failures as ``RedisClusterException``, which is not a
    ``RedisError`` (a slot no node serves after a primary died, an unreachable cluster), and
    reports a cluster that is failing over as ``CLUSTERDOWN``/``TRYAGAIN`` replies: here all of
    those are ``redis.ConnectionError`` (the store makes it
    :class:`~celery_fleet.errors.StoreUnavailable`), any other cluster exception a
    ``redis.RedisError``.
    """

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
        except (RedisClusterException, ClusterDownError, TryAgainError) as exc:
            raise cluster_error(exc) from exc


def cluster_error(exc: BaseException) -> redis.RedisError:
    """A cluster failure as a redis error the store translates (see :class:`FleetCluster`)."""
    text = f"Redis Cluster: {type(exc).__name__}: {exc}"
    if isinstance(exc, (SlotNotCoveredError, ClusterDownError, TryAgainError)):
        return redis.ConnectionError(text)
    if isinstance(exc, RedisClusterException) and "cannot be connected" in str(exc):
        return redis.ConnectionError(text)
    if isinstance(exc, redis.RedisError):
        return exc
    return redis.RedisError(text)


def new_cluster(
    nodes: list[ClusterNode], options: Mapping[str, Any], safe_url: str, **extra: Any
) -> FleetCluster:
    try:
        return FleetCluster(startup_nodes=nodes, **options, **extra)
    except RedisClusterException as exc:
        raise redis.ConnectionError(
            f"cannot reach the Redis Cluster at {safe_url}: {exc}"
        ) from None


# -- the cluster's combiner ----------------------------------------------------------------


def unpack(packed: bytes) -> list[bytes]:
    """The arguments of one RESP command (``*N\\r\\n$len\\r\\narg\\r\\n...``), as
    :class:`~celery_fleet.store.combiner.Packed` writes it."""
    end = packed.index(b"\r\n")
    count = int(packed[1:end])
    pos = end + 2
    args = []
    for _ in range(count):
        end = packed.index(b"\r\n", pos)
        start = end + 2
        stop = start + int(packed[pos + 1 : end])
        args.append(packed[start:stop])
        pos = stop + 2
    return args


class ClusterCombiner:
    """:class:`~celery_fleet.store.combiner.Combiner`'s interface for a Redis Cluster client.

    Raw bytes cannot be written to one connection when the calls belong to different nodes,
    so each packed EVALSHA is unpacked and sent through the cluster client to the primary of
    its keys' slot (all keys of a fleet script share one hash tag): one round trip per call,
    ``MOVED`` followed by redis-py, ``NOSCRIPT`` answered by loading the script on that node
    and sending the call again. Calls of one :meth:`send` that map to one node (a release and
    the next admission of a limit, ``slot.next()``) go in one pipelined round trip. Nothing
    is sent twice after a connection error (an admission must not be charged twice).

    :meth:`post` sends at once and waits for the reply in the caller's thread: a release on a
    cluster costs the caller a round trip (Redis applies it as early as the combiner would).
    ``load(node_client, script)`` loads a script's source on one node's ``redis.Redis``.
    """

    def __init__(self, client: Callable[[], Any], load: Callable[[Any, str], None]) -> None:
        self._client = client
        self._load = load

    def send(self, commands: list[tuple[str, bytes]]) -> list[Any]:
        """Run ``(script, packed)`` commands; their replies in order, each a value or a
        ``redis.RedisError`` instance."""
        if not commands:
            return []
        try:
            client = self._client()
        except redis.RedisError as exc:
            return [exc] * len(commands)
        calls = [(script, unpack(packed)) for script, packed in commands]
        if len(calls) > 1:
            try:
                nodes = {self._node(client, args).name for _s, args in calls}
            except (redis.RedisError, RedisClusterException):
                nodes = set()  # a slot no node serves: each call reports it
            if len(nodes) == 1:
                return self._pipelined(client, calls)
        return [self._one(client, script, args) for script, args in calls]

    def post(
        self, commands: list[tuple[str, bytes]], callback: Callable[[list[Any]], None]
    ) -> bool:
        """Run ``commands`` now and hand their replies to ``callback`` (see the class)."""
        replies = self.send(commands)
        try:
            callback(replies)
        except Exception:  # as the Combiner: a reply's handler never fails the caller
            log.exception("celery-fleet: handling a posted reply failed")
        return True

    def pending(self) -> float:
        """0: no posted call is ever left unread."""
        return 0.0

    def drain(self) -> None:
        """Nothing to read: :meth:`post` reads its replies itself."""

    @staticmethod
    def _node(client: Any, args: list[bytes]) -> Any:
        return client.get_node_from_key(args[3]) if int(args[2]) else client.get_random_node()

    def _one(self, client: Any, script: str, args: list[bytes]) -> Any:
        command = ("EVALSHA", *args[1:])
        for attempt in (1, 2):
            try:
                # A target node: redis-py follows MOVED but sends nothing again after a
                # connection error (it does refresh its slot map for the next call).
                node = self._node(client, args)
                return client.execute_command(*command, target_nodes=node)
            except NoScriptError as exc:
                if attempt == 2:
                    return exc
                try:
                    self._load(client.get_redis_connection(self._node(client, args)), script)
                except (redis.RedisError, RedisClusterException) as error:
                    return cluster_error(error)
            except (redis.RedisError, RedisClusterException) as exc:
                return cluster_error(exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def _pipelined(self, client: Any, calls: list[tuple[str, list[bytes]]]) -> list[Any]:
        try:
            node = self._node(client, calls[0][1])
            pipe = client.get_redis_connection(node).pipeline(transaction=False)
            for _script, args in calls:
                pipe.execute_command("EVALSHA", *args[1:])
            replies = pipe.execute(raise_on_error=False)
        except (redis.RedisError, RedisClusterException) as exc:
            error = cluster_error(exc)
            if isinstance(error, redis.ConnectionError):
                _refresh(client)
            return [error] * len(calls)
        # A slot that moved (MOVED/ASK: not run there) or a script the node lacks: again,
        # one by one, through the cluster client.
        return [
            self._one(client, script, args)
            if isinstance(reply, (NoScriptError, redis.exceptions.AskError))
            else (cluster_error(reply) if isinstance(reply, BaseException) else reply)
            for (script, args), reply in zip(calls, replies, strict=True)
        ]


def _refresh(client: Any) -> None:
    """Re-read the cluster's slot map after a node failed under a pipelined call."""
    try:
        client.nodes_manager.initialize()
    except (redis.RedisError, RedisClusterException):
        log.debug("celery-fleet: could not refresh the Redis Cluster slot map", exc_info=True)
