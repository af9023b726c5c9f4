"""The SDK adapters of issue 22 against a herd: each adapter plain vs through the fleet.

For each adapter, a herd of ``--threads`` threads, each making one chat call at the same
moment, against a :class:`~celery_fleet.testing.ProviderSim` that allows ``--cap`` calls
in flight (no request or token budget, ``--latency`` s a call), twice in the same run:

- **plain**: the SDK client (or model, or LiteLLM) as it is without celery-fleet, its
  own retries off (``max_retries=0``), so each provider 429 is a failed call;
- **fleet**: the same call through the adapter, written as the docs write it, on a fleet
  limit of ``--cap`` in flight with a day token window (so reservations are settled).

Adapters: ``openai-transport`` (the openai SDK over ``celery_fleet.httpx.FleetTransport``),
``anthropic-transport`` (the anthropic SDK over ``celery_fleet.httpx2.FleetTransport``),
``wrap-openai`` / ``wrap-anthropic`` (``fleet.wrap(client, limit=...)``), ``langchain``
(``with_fleet(ChatOpenAI(...), fleet, limit)``) and ``litellm``
(``litellm.callbacks = [FleetHook(fleet)]``). An adapter whose SDK is not installed is
skipped, and says so.

Reported per run: calls completed, provider 429s, the most calls in flight at the
provider (vs the cap), wall time; for the fleet runs the tokens the fleet's day window
was charged (``full - left``, after settling) against the sum of the ``usage`` the
provider's responses reported (the window refills ~12 tokens/s meanwhile: ``charged``
may fall short of ``usage`` by that much times the run's seconds).

One Redis DB (``--db``, default 4), keys under a fresh ``bench-adapters-<uuid>``
namespace, deleted at the end.

Usage::

    .venv/bin/python benchmarks/adapters.py [--threads 40] [--cap 3] [--latency 0.05]
        [--only openai-transport,litellm] [--db 4] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
os.environ.setdefault("LITELLM_TELEMETRY", "False")

HERE = Path(__file__).resolve().parent
DB = 4
#: The fleet's day token window: large enough never to bind, small enough that it
#: refills only ~12 tokens a second during a run.
DAY_TOKENS = 1_000_000
ADAPTERS = (
    "openai-transport",
    "anthropic-transport",
    "wrap-openai",
    "wrap-anthropic",
    "langchain",
    "litellm",
)

#: A call: thread index -> the tokens the provider's response reported.
Call = Callable[[int], int]


@dataclass
class Run:
    adapter: str
    mode: str
    threads: int
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    provider_429: int = 0
    max_in_flight: int = 0
    wall_s: float = 0.0
    usage: int = 0
    charged: int | None = None
    left_in_flight: int | None = None


def _prompt(i: int) -> str:
    return f"question {i}: how does a token bucket refill? " * 3


def _openai_transport(sim: Any, fleet: Any, limit: str) -> Call:
    import httpx
    import openai

    if fleet is None:
        client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
    else:
        from celery_fleet.httpx import FleetTransport

        client = openai.OpenAI(
            base_url=sim.base_url,
            api_key="x",
            http_client=httpx.Client(transport=FleetTransport(fleet, limit)),
        )

    def call(i: int) -> int:
        r = client.chat.completions.create(
            model="sim", max_tokens=200, messages=[{"role": "user", "content": _prompt(i)}]
        )
        return int(r.usage.total_tokens)

    return call


def _anthropic_usage(message: Any) -> int:
    return int(message.usage.input_tokens + message.usage.output_tokens)


def _anthropic_transport(sim: Any, fleet: Any, limit: str) -> Call:
    import anthropic

    if fleet is None:
        client = anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=0)
    else:
        import httpx2

        from celery_fleet.httpx2 import FleetTransport

        client = anthropic.Anthropic(
            base_url=sim.url,
            api_key="x",
            http_client=httpx2.Client(transport=FleetTransport(fleet, limit)),
        )

    def call(i: int) -> int:
        m = client.messages.create(
            model="sim", max_tokens=200, messages=[{"role": "user", "content": _prompt(i)}]
        )
        return _anthropic_usage(m)

    return call


def _wrap_openai(sim: Any, fleet: Any, limit: str) -> Call:
    import openai

    client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
    if fleet is not None:
        client = fleet.wrap(openai.OpenAI(base_url=sim.base_url, api_key="x"), limit=limit)

    def call(i: int) -> int:
        r = client.chat.completions.create(
            model="sim", max_tokens=200, messages=[{"role": "user", "content": _prompt(i)}]
        )
        return int(r.usage.total_tokens)

    return call


def _wrap_anthropic(sim: Any, fleet: Any, limit: str) -> Call:
    import anthropic

    client = anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=0)
    if fleet is not None:
        client = fleet.wrap(anthropic.Anthropic(base_url=sim.url, api_key="x"), limit=limit)

    def call(i: int) -> int:
        m = client.messages.create(
            model="sim", max_tokens=200, messages=[{"role": "user", "content": _prompt(i)}]
        )
        return _anthropic_usage(m)

    return call


def _langchain(sim: Any, fleet: Any, limit: str) -> Call:
    from langchain_openai import ChatOpenAI

    model: Any = ChatOpenAI(
        model="sim", base_url=sim.base_url, api_key="x", max_tokens=200, max_retries=0
    )
    if fleet is not None:
        from celery_fleet.contrib.langchain import with_fleet

        model = with_fleet(model, fleet, limit)

    def call(i: int) -> int:
        return int(model.invoke(_prompt(i)).usage_metadata["total_tokens"])

    return call


def _litellm(sim: Any, fleet: Any, limit: str) -> Call:
    import litellm

    litellm.suppress_debug_info = True  # a banner on stdout for each 429 of the plain run
    if fleet is None:
        litellm.callbacks = []
    else:
        from celery_fleet.contrib.litellm import FleetHook

        litellm.callbacks = [FleetHook(fleet)]  # the fleet's only limit

    def call(i: int) -> int:
        r = litellm.completion(
            model="openai/sim",
            api_base=sim.base_url,
            api_key="x",
            max_tokens=200,
            max_retries=0,
            messages=[{"role": "user", "content": _prompt(i)}],
        )
        return int(r.usage.total_tokens)

    return call


BUILDERS: dict[str, tuple[Callable[[Any, Any, str], Call], tuple[str, ...]]] = {
    "openai-transport": (_openai_transport, ("openai", "httpx")),
    "anthropic-transport": (_anthropic_transport, ("anthropic", "httpx2")),
    "wrap-openai": (_wrap_openai, ("openai",)),
    "wrap-anthropic": (_wrap_anthropic, ("anthropic",)),
    "langchain": (_langchain, ("langchain_openai",)),
    "litellm": (_litellm, ("litellm",)),
}


def missing(adapter: str) -> list[str]:
    """The modules ``adapter`` needs that are not installed."""
    import importlib.util

    return [m for m in BUILDERS[adapter][1] if importlib.util.find_spec(m) is None]


def herd(call: Call, threads: int) -> tuple[list[int], list[str], float]:
    """``threads`` threads, released together, one call each: (usages, errors, wall s)."""
    used: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)

    def agent(i: int) -> None:
        start.wait()
        try:
            tokens = call(i)
        except Exception as exc:  # the provider's 429, as the SDK raises it
            with lock:
                errors.append(type(exc).__name__)
            return
        with lock:
            used.append(tokens)

    pool = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.monotonic()
    for t in pool:
        t.join()
    return used, errors, time.monotonic() - t0


def run(opts: argparse.Namespace, adapter: str, mode: str, url: str, namespace: str) -> Run:
    from celery_fleet import Fleet
    from celery_fleet.observability.status import limit_status
    from celery_fleet.testing import ProviderSim

    limit = "llm"
    fleet = None
    if mode == "fleet":
        fleet = Fleet(
            limits={limit: {"max_in_flight": opts.cap, "tokens": f"{DAY_TOKENS}/day", "burst": 1}},
            redis_url=url,
            namespace=f"{namespace}-{adapter}",
            max_wait=600,
        )
    sim = ProviderSim(rpm=None, tpm=None, max_in_flight=opts.cap, latency=opts.latency, seed=7)
    with sim:
        call = BUILDERS[adapter][0](sim, fleet, limit)
        used, errors, wall = herd(call, opts.threads)
        stats = sim.stats()
    result = Run(adapter, mode, opts.threads, ok=len(used), errors=errors, wall_s=wall)
    result.provider_429 = sum(stats["rate_limited"].values())
    result.max_in_flight = stats["max_in_flight_observed"]
    result.usage = sum(used)
    if fleet is not None:
        status = limit_status(fleet, limit)
        (window,) = [w for w in status.windows if "tokens" in w.window]
        result.charged = int(window.full - window.left)
        result.left_in_flight = status.in_flight
    if adapter == "litellm":
        import litellm

        litellm.callbacks = []
    return result


def table(opts: argparse.Namespace, runs: list[Run], skipped: dict[str, list[str]]) -> str:
    lines = [
        f"{opts.threads} threads, one call each, released together, against ProviderSim "
        f"allowing {opts.cap} in flight ({opts.latency * 1000:.0f} ms a call, no rate or "
        f"token budget); plain: the SDK's own retries off; fleet: a limit of "
        f"max_in_flight={opts.cap} with a {DAY_TOKENS:,}/day token window.",
        "",
        "| adapter | mode | completed | provider 429s | max in flight (cap) | wall s "
        "| usage reported | fleet charged | in flight after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        charged = "" if r.charged is None else f"{r.charged:,}"
        after = "" if r.left_in_flight is None else str(r.left_in_flight)
        lines.append(
            f"| {r.adapter} | {r.mode} | {r.ok}/{r.threads} | {r.provider_429} "
            f"| {r.max_in_flight} ({opts.cap}) | {r.wall_s:.2f} | {r.usage:,} | {charged} "
            f"| {after} |"
        )
    for adapter, mods in skipped.items():
        lines.append(f"\n{adapter}: skipped, not installed: {', '.join(mods)}")
    other = sorted({e for r in runs for e in r.errors if not e.endswith("RateLimitError")})
    if other:
        lines.append(f"\nErrors other than a 429 (the SDKs' RateLimitError): {', '.join(other)}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="adapters.py", description=(__doc__ or "").split("\n\n")[0]
    )
    default_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    parser.add_argument("--redis-url", default=default_url, help="%(default)s (see --db)")
    parser.add_argument("--db", type=int, default=DB, help="the Redis DB (%(default)s)")
    parser.add_argument("--threads", type=int, default=40, help="the herd (%(default)s)")
    parser.add_argument("--cap", type=int, default=3, help="in flight allowed (%(default)s)")
    parser.add_argument("--latency", type=float, default=0.05, help="s a call (%(default)s)")
    parser.add_argument(
        "--only", default=",".join(ADAPTERS), help="adapters, comma-separated (all)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(argv)
    opts.adapters = [a for a in opts.only.split(",") if a]
    unknown = [a for a in opts.adapters if a not in BUILDERS]
    if unknown:
        parser.error(f"unknown adapter(s) {unknown}; known: {', '.join(ADAPTERS)}")
    if opts.threads < 1 or opts.cap < 1 or opts.latency < 0:
        parser.error("need --threads >= 1, --cap >= 1, --latency >= 0")
    return opts


def main(argv: list[str] | None = None) -> int:
    import logging

    import redis

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from results import append_section, on_db

    logging.getLogger("LiteLLM").setLevel(logging.ERROR)
    opts = parse_args(argv)
    url = on_db(opts.redis_url, opts.db)
    client = redis.Redis.from_url(url, socket_timeout=10)
    client.ping()
    namespace = f"bench-adapters-{uuid.uuid4().hex[:8]}"
    runs: list[Run] = []
    skipped: dict[str, list[str]] = {}
    try:
        for adapter in opts.adapters:
            absent = missing(adapter)
            if absent:
                skipped[adapter] = absent
                continue
            for mode in ("plain", "fleet"):
                print(f"adapters: {adapter} {mode} ...", file=sys.stderr, flush=True)
                runs.append(run(opts, adapter, mode, url, namespace))
    finally:
        for key in client.scan_iter(f"*{namespace}*", count=1000):
            client.delete(key)
    body = table(opts, runs, skipped)
    print(body)
    if not opts.no_write:
        append_section(client, body, "SDK adapters: a herd plain vs through the fleet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
