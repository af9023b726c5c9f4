"""Command line for the provider simulator: ``python -m celery_fleet.testing.provider``.

Prints ``listening http://HOST:PORT`` as the first line of stdout (flushed) so a parent
process can read the bound port, then serves until SIGTERM or SIGINT and exits 0,
writing the final ``/stats`` as one JSON line to stderr. When it cannot bind the port (taken,
or not its to bind) it writes one ``error: ...`` line to stderr and exits 2.

Example::

    python -m celery_fleet.testing.provider --rpm 600 --tpm 90000 --max-in-flight 8 \\
        --latency 0.3 --port 0 --phase 30:40:status=503
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .phases import parse_phase
from .provider import ProviderSim

__all__ = ["build_parser", "main"]


def _limit(kind: type) -> Any:
    def parse(text: str) -> float | int | None:
        if text.lower() in ("none", "unlimited"):
            return None
        try:
            return kind(text)  # type: ignore[no-any-return]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _phase(text: str) -> Any:
    try:
        return parse_phase(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its ``--help`` documents every option)."""
    parser = argparse.ArgumentParser(
        prog="python -m celery_fleet.testing.provider",
        description="An OpenAI-compatible fake provider enforcing RPM, TPM and max in-flight.",
    )
    add = parser.add_argument
    add(
        "--rpm",
        type=_limit(float),
        default=600,
        help="requests per minute, or 'none' (default 600)",
    )
    add(
        "--tpm",
        type=_limit(float),
        default=90_000,
        help="tokens per minute, or 'none' (default 90000)",
    )
    add(
        "--max-in-flight",
        type=_limit(int),
        default=8,
        help="concurrent requests, or 'none' (default 8)",
    )
    add("--latency", type=float, default=0.3, help="median service time in seconds (default 0.3)")
    add(
        "--latency-sigma",
        type=float,
        default=0.25,
        help="log-normal shape of the latency (default 0.25)",
    )
    add(
        "--burst-s",
        type=float,
        default=60.0,
        help="bucket capacity in seconds of budget (default 60)",
    )
    add(
        "--concurrency-retry-ms",
        type=int,
        default=100,
        help="retry-after-ms hint of concurrency 429s",
    )
    add("--seed", type=int, default=None, help="seed of the latency / output-length RNG")
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, default=0, help="port to bind; 0 picks a free one (default 0)")
    add(
        "--phase",
        type=_phase,
        action="append",
        default=[],
        metavar="START:END:KEY=VAL[,KEY=VAL]",
        help="a timeline phase, repeatable: keys rpm, tpm, max_in_flight, status, garbage "
        "(1 or a kind: empty, truncated, refusal, invalid_json, repetition), share "
        "(e.g. 10:25:max_in_flight=4, 30:40:status=503, 40:45:garbage=refusal,share=0.2)",
    )
    add(
        "--no-rate-limit-headers",
        dest="rate_limit_headers",
        action="store_false",
        help="send no x-ratelimit-* headers (only 429s tell the limits)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGTERM/SIGINT; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        sim = ProviderSim(
            rpm=args.rpm,
            tpm=args.tpm,
            max_in_flight=args.max_in_flight,
            latency=args.latency,
            latency_sigma=args.latency_sigma,
            burst_s=args.burst_s,
            phases=args.phase,
            seed=args.seed,
            host=args.host,
            port=args.port,
            concurrency_retry_ms=args.concurrency_retry_ms,
            rate_limit_headers=args.rate_limit_headers,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        sim.start()
    except OSError as exc:  # the port is taken, or the host is not ours to bind
        reason = exc.strerror or str(exc)
        print(f"error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 2
    with sim:
        print(f"listening {sim.url}", flush=True)
        while not stop.wait(0.2):
            pass
    print(json.dumps(sim.stats()), file=sys.stderr, flush=True)
    return 0
