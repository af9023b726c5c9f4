"""The admission benchmark's peers: the same job as `fleet.try_acquire`, built by hand.

The job (every build, the same budgets): admit one call of ``TOKENS`` tokens against a
requests-per-minute budget, a tokens-per-minute budget and an in-flight cap, and give the
in-flight place back on release. ``acquire()`` returns a lease (None: refused); ``release``
takes it back. Keys live under the run's ``bench-<uuid>`` prefix (the benchmark deletes them).

- :class:`Lean`: what a strong engineer writes by hand in one sitting: one ~15-line Lua script
  (GCRA for both budgets, one hash for both TATs, a lease zset for the cap; all or nothing, on
  Redis TIME), one EVALSHA per acquire, one ZREM per release. No line, no breaker, no adaptive
  cap, no holders hash, no lease renewal, no waits: the floor of a correct decision.
- :class:`LimitsIncr`: off-the-shelf `limits` (two SlidingWindowCounter hits: RPM, and TPM
  with ``cost=tokens``) plus a lock-free in-flight counter: INCR, and DECR back when over.
- :class:`LimitsLock`: the same two hits plus a counter under a redis-py ``Lock`` (polled every
  1 ms): the build this benchmark used to compare against, kept as a labelled strawman.

The `limits` builds are not all or nothing (a refused TPM hit leaves the RPM hit spent) and
have no lease expiry (a killed worker's in-flight place is never given back).
"""

from __future__ import annotations

import os
import socket
from typing import cast

import limits
import redis
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

LIMIT, TOKENS = "llm", 100
BUDGETS = {"rpm": 10**9, "tpm": 10**12, "max_in_flight": 10**6}
WINDOW_MS, BURST, LEASE_MS = 60_000, 0.1, 60_000  # ours' defaults: a tenth of a minute at once

LEAN_LUA = """
-- lean admission: GCRA on requests and on tokens, then the in-flight cap; all or nothing.
-- KEYS[1] hash  r, t -> theoretical arrival time (ms) of the request and the token window
-- KEYS[2] zset  lease id -> expiry (ms)
-- ARGV    lease id, tokens, T (ms per request), tau (ms), T (ms per token), tau (ms),
--         max in flight, lease TTL (ms)
-- Reply: 1 admitted, 0 refused (nothing consumed). Time unit: ms, Redis TIME.
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local tat = redis.call('HMGET', KEYS[1], 'r', 't')
local r = math.max(tonumber(tat[1]) or 0, now) + ARGV[3]
local k = math.max(tonumber(tat[2]) or 0, now) + ARGV[2] * ARGV[5]
if r - now > tonumber(ARGV[4]) or k - now > tonumber(ARGV[6]) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then return 0 end
redis.call('HSET', KEYS[1], 'r', r, 't', k)
redis.call('ZADD', KEYS[2], now + ARGV[8], ARGV[1])
return 1
"""


class Build:
    """One way to do the job: ``acquire() -> lease | None`` and ``release(lease)``."""

    label = "?"

    def acquire(self) -> str | None:
        raise NotImplementedError

    def release(self, lease: str) -> None:
        raise NotImplementedError

    def cycle(self) -> None:
        """A worker's cycle, acquire + release; the budgets are so large nothing is refused."""
        lease = self.acquire()
        if lease is None:
            raise RuntimeError(f"the benchmark budget refused a {self.label} request")
        self.release(lease)


class Lean(Build):
    """The hand-written single script: one EVALSHA to acquire, one ZREM to release."""

    label = "lean Lua"

    def __init__(self, url: str, run_id: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.script = self.client.register_script(LEAN_LUA)
        self.keys = [f"{run_id}-lean:{LIMIT}:tat", f"{run_id}-lean:{LIMIT}:leases"]
        per_request, per_token = WINDOW_MS / BUDGETS["rpm"], WINDOW_MS / BUDGETS["tpm"]
        # The TAT hash is not expired: one small key per limit, which a stale TAT leaves right.
        self.tail = [
            per_request,
            max(per_request, BURST * WINDOW_MS),
            per_token,
            BURST * WINDOW_MS,
            BUDGETS["max_in_flight"],
            LEASE_MS,
        ]

    def acquire(self) -> str | None:
        lease = os.urandom(8).hex()
        return lease if self.script(keys=self.keys, args=[lease, TOKENS, *self.tail]) else None

    def release(self, lease: str) -> None:
        self.client.zrem(self.keys[1], lease)


class _Limits(Build):
    """Two `limits` SlidingWindowCounter hits on RedisStorage: RPM, and TPM at cost=tokens."""

    def __init__(self, url: str, run_id: str, kind: str) -> None:
        storage = RedisStorage(url, key_prefix=f"{run_id}-{kind}")
        self.window = SlidingWindowCounterRateLimiter(storage)
        self.rpm = limits.RateLimitItemPerMinute(BUDGETS["rpm"])
        self.tpm = limits.RateLimitItemPerMinute(BUDGETS["tpm"])
        self.client = cast(redis.Redis, storage.get_connection())  # one client, as the others
        self.count_key = f"{run_id}-{kind}:in_flight"

    def hit_windows(self) -> bool:
        if not self.window.hit(self.rpm, LIMIT):
            return False
        # A refusal here leaves the RPM hit spent: the two hits are not atomic.
        return self.window.hit(self.tpm, LIMIT, "tokens", cost=TOKENS)


class LimitsIncr(_Limits):
    """`limits` windows plus a lock-free in-flight counter: INCR (DECR back if over); DECR."""

    label = "limits + INCR"

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(url, run_id, "incr")

    def acquire(self) -> str | None:
        if not self.hit_windows():
            return None
        if self.client.incr(self.count_key) > BUDGETS["max_in_flight"]:
            self.client.decr(self.count_key)
            return None
        return self.count_key

    def release(self, lease: str) -> None:
        self.client.decr(lease)


class LimitsLock(_Limits):
    """The strawman: `limits` windows plus a counter under a redis-py ``Lock``.

    Acquire: lock, GET, compare, INCR, unlock; release: lock, DECR, unlock. The lock polls
    every 1 ms (redis-py's default 100 ms would make it look worse than a tuned deployment).
    """

    label = "limits + Lock (strawman)"

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(url, run_id, "lock")
        self.lock = self.client.lock(f"{run_id}-lock:lock", timeout=5, sleep=0.001)

    def acquire(self) -> str | None:
        if not self.hit_windows():
            return None
        with self.lock:
            if int(self.client.get(self.count_key) or 0) >= BUDGETS["max_in_flight"]:
                return None
            self.client.incr(self.count_key)
        return self.count_key

    def release(self, lease: str) -> None:
        with self.lock:
            self.client.decr(lease)


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


class LeanOneTrip(Lean):
    """The lean script with one round trip per decision: its release (the ZREM) is not sent
    on its own but with the next acquire, in one write of packed RESP, and both replies are
    read together. What a strong engineer builds when a worker makes decisions back to back.
    The commands are packed once (only the lease varies) and written on one of redis-py's
    connections, whose parser reads the replies (hiredis when installed, as for ours); with
    ``raw`` on a plain socket, replies read as lines: the floor of a Python client. (The last
    release of a run waits for a next acquire: ``flush()`` sends it.)"""

    label = "lean Lua, release with the next acquire"

    def __init__(self, url: str, run_id: str, raw: bool = False) -> None:
        super().__init__(url, run_id)
        sha = self.client.script_load(LEAN_LUA)
        self.raw = raw
        if raw:
            kwargs = self.client.connection_pool.connection_kwargs
            self.sock = socket.create_connection((kwargs.get("host", "127.0.0.1"), kwargs["port"]))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            db = int(kwargs.get("db") or 0)
            self._send_read(b"*2\r\n$6\r\nSELECT\r\n" + _bulk(b"%d" % db), 1)
        else:
            self.conn = self.client.connection_pool.get_connection()
        tail = [repr(x).encode() for x in self.tail]
        keys = [k.encode() for k in self.keys]
        self.head = b"*%d\r\n" % (3 + 2 + 2 + len(tail)) + b"".join(
            map(_bulk, [b"EVALSHA", sha.encode(), b"2", *keys])
        )
        self.tokens = _bulk(str(TOKENS).encode())
        self.rest = b"".join(map(_bulk, tail))
        self.zrem = b"*3\r\n$4\r\nZREM\r\n" + _bulk(keys[1])
        self.owed: bytes | None = None  # the lease whose ZREM rides with the next acquire

    def _send_read(self, data: bytes, replies: int) -> list[object]:
        if not self.raw:
            self.conn.send_packed_command([data])
            return [self.conn.read_response() for _ in range(replies)]
        self.sock.sendall(data)
        buf = b""
        while buf.count(b"\r\n") < replies:  # integer or status replies: one line each
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            buf += chunk
        lines = buf.split(b"\r\n")[:replies]
        if any(line[:1] == b"-" for line in lines):
            raise RuntimeError(f"lean one-trip peer: {lines!r}")
        return [int(line[1:]) if line[:1] == b":" else line for line in lines]

    def acquire(self) -> str | None:
        lease = os.urandom(8).hex().encode()
        data = self.head + _bulk(lease) + self.tokens + self.rest
        if self.owed is None:
            (reply,) = self._send_read(data, 1)
        else:
            _zrem, reply = self._send_read(self.zrem + _bulk(self.owed) + data, 2)
            self.owed = None
        return lease.decode() if reply == 1 else None

    def release(self, lease: str) -> None:
        if self.owed is not None:
            self.flush()
        self.owed = lease.encode()

    def flush(self) -> None:
        """Send the release still waiting for an acquire."""
        if self.owed is not None:
            self._send_read(self.zrem + _bulk(self.owed), 1)
            self.owed = None


class LeanOneTripRaw(LeanOneTrip):
    """:class:`LeanOneTrip` on a plain socket, replies read as lines (no RESP parser)."""

    label = "lean Lua, 1 round trip, raw socket"

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(url, run_id, raw=True)
