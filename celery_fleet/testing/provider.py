"""An OpenAI-compatible fake model provider enforcing RPM, TPM and concurrency like the real one.

Tests, the demo and the benchmarks point ``openai.OpenAI(base_url=sim.base_url)`` at it
to see what a fleet of agents does against a provider's limits, without a network or a
bill: every 429 carries OpenAI's headers and error body, phases script outages and
capacity cuts, and every request is logged for assertions.

Example::

    from celery_fleet.testing import ProviderSim

    with ProviderSim(rpm=600, tpm=90_000, max_in_flight=8, latency=0.3) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
        client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}])
        print(sim.stats())

From a shell: ``python -m celery_fleet.testing.provider --rpm 600 --port 0`` (see ``--help``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from .chat import CHAT
from .limiter import Limiter
from .messages import MESSAGES
from .phases import Limits, Phase, effective_at
from .records import RequestRecord, summarize
from .server import Response, SimServer
from .serving import serve
from .wire import error_body

__all__ = ["ProviderSim", "RequestRecord", "KEEP"]


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP
"""Sentinel for :meth:`ProviderSim.set_limits`: leave this limit as it is (``None``: unlimited)."""


class ProviderSim:
    """A fake OpenAI provider on a local port, rate limiting like OpenAI, for tests and benchmarks.

    Example::

        with ProviderSim(rpm=60, tpm=None, max_in_flight=2, latency=0.05, seed=1) as sim:
            httpx.post(f"{sim.base_url}/chat/completions", json={"messages": [...]})
            assert sim.stats()["ok"] == 1

    Parameters (all keyword-only; ``None`` for a limit means unlimited):

    - ``rpm``, ``tpm``: per-minute budgets, each a token bucket of capacity
      ``limit * burst_s / 60`` refilled at ``limit / 60`` per second. A request costs one
      request and ``ceil(prompt chars / 4) + max_tokens`` tokens (``max_completion_tokens``
      also accepted, ``default_max_tokens`` when absent), charged on arrival.
    - ``max_in_flight``: a request arriving while this many are served gets a 429 at once,
      with a fixed ``retry-after-ms`` hint of ``concurrency_retry_ms`` (nobody knows when a
      slot frees, so the hint is only a polite suggestion).
    - ``latency``, ``latency_sigma``: service time is log-normal with this median (seconds)
      and shape; ``seed`` makes it (and ``completion_tokens``) reproducible.
    - ``phases``: a timeline of :class:`Phase` (seconds since :meth:`start`): capacity
      changes (possibly above what a user declares: the headers report the real limit),
      outages, and garbage kinds in a share of answers.
    - ``rate_limit_headers``: False sends no ``x-ratelimit-*`` (nor Anthropic's) headers,
      like providers that keep their limits to themselves: then only 429s tell the truth.
    - ``clock``: monotonic seconds; inject one to drive buckets and phases in tests.

    A request refused by any limit consumes nothing. 503 phases answer before admission
    (nothing charged, nothing in flight); garbage phases are admitted and charged.
    """

    def __init__(
        self,
        *,
        rpm: float | None = 600,
        tpm: float | None = 90_000,
        max_in_flight: int | None = 8,
        latency: float = 0.3,
        latency_sigma: float = 0.25,
        burst_s: float = 60.0,
        phases: Sequence[Phase] = (),
        seed: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        concurrency_retry_ms: int = 100,
        default_max_tokens: int = 256,
        rate_limit_headers: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not burst_s > 0:
            raise ValueError(f"burst_s must be > 0, got {burst_s!r}")
        if latency < 0 or latency_sigma < 0:
            raise ValueError(
                f"latency and latency_sigma must be >= 0, got {latency!r}, {latency_sigma!r}"
            )
        if concurrency_retry_ms < 1 or default_max_tokens < 1:
            raise ValueError("concurrency_retry_ms and default_max_tokens must be >= 1")
        self.burst_s = burst_s
        self.latency = latency
        self.latency_sigma = latency_sigma
        self.default_max_tokens = default_max_tokens
        self.rate_limit_headers = rate_limit_headers
        self.phases = tuple(phases)
        for phase in self.phases:
            Limits(phase.rpm, phase.tpm, phase.max_in_flight).check(burst_s, f"phase {phase}")
        self._base = Limits(rpm, tpm, max_in_flight)
        self._base.check(burst_s)
        self._address = (host, port)
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._log: list[RequestRecord] = []
        self._served = 0
        self._limiter = Limiter(burst_s=burst_s, concurrency_retry_s=concurrency_retry_ms / 1000)
        self._stopping = threading.Event()
        self._server: SimServer | None = None
        self._thread: threading.Thread | None = None
        self._t0 = clock()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ProviderSim:
        """Bind the port and serve on a daemon thread; the timeline starts now. Returns ``self``."""
        if self._server is not None or self._stopping.is_set():
            raise RuntimeError("a ProviderSim can be started once")
        self._server = SimServer(self._address, self)
        self._t0 = self._clock()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="provider-sim",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections and wake requests sleeping in simulated latency."""
        self._stopping.set()
        if self._server is not None and self._thread is not None:
            self._server.close()
            self._thread.join(timeout=5)

    def __enter__(self) -> ProviderSim:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server (``/stats`` lives here)."""
        if self._server is None:
            raise RuntimeError("ProviderSim is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``.../v1``) to give ``openai.OpenAI(base_url=...)``."""
        return f"{self.url}/v1"

    def elapsed_s(self) -> float:
        """Seconds since :meth:`start` on the simulator's clock (the phases' timeline)."""
        return self._clock() - self._t0

    # -- limits ----------------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        """The base limits (before phases), as set at construction or by :meth:`set_limits`."""
        with self._lock:
            return self._base

    def effective_limits(self) -> Limits:
        """The limits in force now, phases applied."""
        return effective_at(self.elapsed_s(), self.limits, self.phases).limits

    def set_limits(
        self,
        *,
        rpm: float | None | _Keep = KEEP,
        tpm: float | None | _Keep = KEEP,
        max_in_flight: int | None | _Keep = KEEP,
    ) -> None:
        """Change the base capacity at runtime (``None``: unlimited; omitted: unchanged).

        Takes effect from the next request; phases still override it while active.

        Example::

            sim.set_limits(max_in_flight=2)   # the provider cuts concurrency
        """
        with self._lock:
            new = Limits(
                self._base.rpm if rpm is KEEP else rpm,
                self._base.tpm if tpm is KEEP else tpm,
                self._base.max_in_flight if max_in_flight is KEEP else max_in_flight,
            )
            new.check(self.burst_s)
            self._base = new

    def schedule(self, phases: Sequence[Phase]) -> None:
        """Replace the timeline with ``phases`` counted from now rather than from start.

        Benchmarks start the simulator, then their workers, and only then want the clock
        of the scenario to begin.

        Example::

            sim.schedule([Phase(start=10, end=25, max_in_flight=4)])  # 10 s from now
        """
        offset = self.elapsed_s()
        shifted = tuple(
            dataclasses.replace(p, start=p.start + offset, end=p.end + offset) for p in phases
        )
        with self._lock:
            self.phases = shifted

    def min_makespan_s(self, n_requests: int, tokens_per_request: float) -> float:
        """A floor on the time to serve ``n_requests`` of that cost on a fresh sim, phases ignored.

        The larger of: the RPM and TPM bucket drain times (``(total - capacity) / rate``,
        strict bounds) and the concurrency bound ``n * mean_latency / max_in_flight``
        (an expectation: latency is random, mean = median * exp(sigma^2 / 2)).
        Benchmarks divide the measured makespan by it to report efficiency.
        """
        limits, floor = self.limits, 0.0
        for limit, total in (
            (limits.rpm, n_requests),
            (limits.tpm, n_requests * tokens_per_request),
        ):
            if limit is not None:
                floor = max(floor, (total - limit * self.burst_s / 60) / (limit / 60))
        if limits.max_in_flight is not None:
            mean_latency = self.latency * math.exp(self.latency_sigma**2 / 2)
            floor = max(floor, n_requests * mean_latency / limits.max_in_flight)
        return floor

    # -- observation -----------------------------------------------------------------------

    @property
    def log(self) -> list[RequestRecord]:
        """A copy of the request log, in arrival order."""
        with self._lock:
            return list(self._log)

    def stats(self) -> dict[str, Any]:
        """Counters over the log since start or :meth:`reset_stats` (also ``GET /stats``)."""
        stats = summarize(self.log)
        stats["in_flight"] = self._limiter.in_flight
        stats["elapsed_s"] = round(self.elapsed_s(), 3)
        stats["limits"] = asdict(self.effective_limits())
        return stats

    def reset_stats(self, *, refill: bool = False) -> None:
        """Clear the log (so the counters); ``refill=True`` also starts the buckets full again."""
        with self._lock:
            self._log.clear()
        if refill:
            self._limiter.refill()

    # -- serving ---------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response:
        """Answer one HTTP request (called by the server's handler threads)."""
        if (method, path) == ("POST", "/v1/chat/completions"):
            return serve(self, CHAT, headers, body)
        if (method, path) == ("POST", "/v1/messages"):
            return serve(self, MESSAGES, headers, body)  # Anthropic's API, same limits
        if (method, path) == ("GET", "/stats"):
            stats = self.stats()
            if query.get("log", ["0"])[-1] not in ("", "0", "false"):
                stats["log"] = [asdict(r) for r in self.log]
            return Response(200, stats)
        if (method, path) == ("POST", "/stats/reset"):
            self.reset_stats(refill=query.get("refill", ["0"])[-1] not in ("", "0", "false"))
            return Response(200, {"reset": True})
        return Response(
            404, error_body(f"Unknown request URL: {method} {path}.", "invalid_request_error")
        )

    def _append(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)


if __name__ == "__main__":
    from .cli import main

    raise SystemExit(main())
