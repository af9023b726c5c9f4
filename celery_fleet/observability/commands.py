"""The subcommands of ``celery fleet``: what :mod:`celery_fleet.observability.cli` loads
when the command runs (never when ``celery`` merely starts, so workers, beat and
``celery --help`` do not import the package).

The commands are documented in :mod:`celery_fleet.observability.cli`; each is a plain
``click.Command`` listed in :data:`COMMANDS` by the name an operator types.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import click

from ..distribution import DistributionConfig
from ..distribution.depths import BrokerDepths
from ..distribution.status import QueueStatus, affinity_status
from ..errors import FleetError
from ..fleet import Fleet
from .status import LimitStatus, fields_text, fleet_status, quality_text
from .web import AUTH_ENV, DEFAULT_PORT, FleetPage

__all__ = ["COMMANDS"]

T = TypeVar("T")


class Seconds(click.FloatRange):
    """A finite number of seconds in a range: click's FloatRange lets ``nan`` through
    (every comparison with it is False), and ``time.sleep(nan)`` then raises a traceback."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds.", param, ctx)
        return seconds


def _fleet(ctx: click.Context) -> Fleet:
    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.ClickException("no Celery app: run it as `celery -A proj fleet ...`")
    try:
        return Fleet.for_app(app)
    except FleetError as exc:
        raise click.ClickException(str(exc)) from None


def _guard(action: Callable[[], T]) -> T:
    """Run ``action``; a fleet error (Redis down, unknown limit) becomes one clear line."""
    try:
        return action()
    except FleetError as exc:
        raise click.ClickException(str(exc)) from None


def _table(rows: list[LimitStatus]) -> str:
    out = []
    for s in rows:
        cap = "-" if s.cap is None else str(s.cap)
        oldest = "" if s.oldest_lease_s is None else f", oldest {s.oldest_lease_s:.1f} s"
        lines = [f"{s.limit}", f"  in flight    {s.in_flight}/{cap}{oldest}"]
        lines += [f"  {w.window:<12} {w.left} left now (holds {w.full})" for w in s.windows]
        if s.adaptive_cap is not None:
            factor = f"{s.rate_factor:.2f}" if s.rate_factor is not None else "-"
            lines.append(f"  adaptive     cap {s.adaptive_cap:.2f}, rate factor {factor}")
        if s.discovered is not None:
            found = ", ".join(s.discovered_rates) or "the in-flight cap only"
            most = f"up to {s.discover_up_to:g}x"
            lines.append(f"  discovered   {s.discovered:.2f}x declared: {found} ({most})")
        if s.paused_s > 0:
            lines.append(f"  paused       {s.paused_s:.1f} s more (the provider's Retry-After)")
        if s.breaker is not None:
            forced = f" (forced {s.breaker_forced})" if s.breaker_forced else ""
            retry = f", probe in {s.breaker_retry_s:.1f} s" if s.breaker_retry_s > 0 else ""
            lines.append(f"  breaker      {s.breaker}{forced}{retry}")
        if s.quality is not None:
            lines.append(f"  {quality_text(s.quality)}")
        lines.append(f"  waiting      {s.waiting} in line")
        if s.config_version:
            what = fields_text(s.config_fields) or " (as configured)"
            lines.append(f"  config       version {s.config_version}{what}")
        for x in s.lanes:
            most = "" if x.cap is None else f"/{x.cap}"
            owed = "" if not x.guarantee else f", owed {x.owed if x.owed else f'{x.guarantee:.0%}'}"
            lines.append(
                f"  lane {x.lane:<7} {x.in_flight}{most} in flight, {x.waiting} waiting "
                f"(priority {x.priority}, may use {x.share:.0%}{owed})"
            )
        if s.keys is not None:
            lines.append(f"  busiest keys {'(none)' if not s.keys else ''}".rstrip())
            lines += [
                f"    {k.key or '(no key)'!s:<24.24} {k.in_flight} in flight, {k.waiting} in line"
                for k in s.keys
            ]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _status(fleet: Fleet, limits: tuple[str, ...], as_json: bool) -> str:
    rows = _guard(lambda: fleet_status(fleet, list(limits) or None))
    if as_json:
        return json.dumps([r.as_dict() for r in rows], indent=2)
    text = _table(rows) if rows else "no limits configured (fleet_limits)"
    if fleet.distribution.routes and fleet.app is not None and not limits:
        text += "\n\n" + _affinity_table(_affinity_rows(fleet), fleet.distribution)
    return text


def _affinity_rows(fleet: Fleet) -> list[QueueStatus]:
    """Each affinity queue's home and counts (Redis) and depth (the broker; None when the
    broker does not answer)."""
    config = fleet.distribution
    depths: dict[int, int] | None = None
    if fleet.app is not None:
        reader = BrokerDepths(fleet.app)
        try:
            found = reader.depths(config.queue_name(q) for q in range(config.queues))
            depths = {q: found[config.queue_name(q)] for q in range(config.queues)}
        except FleetError:
            depths = None
        finally:
            reader.close()
    return _guard(lambda: affinity_status(fleet.store, config, depths))


def _affinity_table(rows: list[QueueStatus], config: DistributionConfig) -> str:
    threshold = f", steal threshold {config.steal_threshold}" if config.steals else ""
    wide = max((len(r.name) for r in rows), default=5)
    lines = [
        f"affinity queues ({config.mode}{threshold})",
        f"  {'queue':<{wide}} {'home':<28} {'depth':>6} {'local':>8} {'stolen':>8}",
    ]
    for r in rows:
        depth = "?" if r.depth is None else str(r.depth)
        home = r.home or "(none)"
        lines.append(f"  {r.name:<{wide}} {home:<28} {depth:>6} {r.local:>8} {r.stolen:>8}")
    return "\n".join(lines)


@click.command()
@click.argument("limits", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, limits: tuple[str, ...], as_json: bool) -> None:
    """Each limit's state now (default: every limit)."""
    click.echo(_status(_fleet(ctx), limits, as_json))


@click.command()
@click.argument("limits", nargs=-1)
@click.option(
    "--interval",
    type=Seconds(min=0.1, max=3600),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after N.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document per refresh.")
@click.pass_context
def watch(
    ctx: click.Context, limits: tuple[str, ...], interval: float, count: int | None, as_json: bool
) -> None:
    """Each limit's state, as status shows it, refreshed every --interval seconds
    (Ctrl-C stops)."""
    fl, n = _fleet(ctx), 0
    while count is None or n < count:
        if n:
            time.sleep(interval)
        text = _status(fl, limits, as_json)
        if not as_json:
            click.clear()
            text = f"{time.strftime('%H:%M:%S')}\n\n{text}"
        click.echo(text)
        n += 1


@click.command()
@click.argument("limits", nargs=-1)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback lets others on the network read it.",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
    help="TCP port (0: any free one; the URL is printed).",
)  # fmt: skip
@click.option(
    "--auth",
    envvar=AUTH_ENV,
    metavar="USER:PASSWORD",
    help=f"Ask for HTTP basic authentication (default: ${AUTH_ENV}, which keeps it out of ps).",
)
@click.option(
    "--interval", type=Seconds(min=0.1, max=3600), default=1.0, show_default=True,
    help="Seconds between two readings of Redis (one round trip per limit).",
)  # fmt: skip
@click.option(
    "--history", type=Seconds(min=1, max=86_400), default=300.0, show_default=True,
    help="Seconds of readings the sparklines show.",
)  # fmt: skip
@click.pass_context
def web(
    ctx: click.Context,
    limits: tuple[str, ...],
    host: str,
    port: int,
    auth: str | None,
    interval: float,
    history: float,
) -> None:
    """A live, read-only page of each limit's state (default: every limit), with sparklines.

    Serves it and its JSON (/api/status: the rows of `status --json`, recent readings) on
    http://127.0.0.1:8555/ until Ctrl-C. It reads Redis every --interval seconds however
    many browsers watch, and says "Redis unreachable" while Redis is away.
    """
    fl = _fleet(ctx)
    page = _guard(
        lambda: FleetPage(fl, list(limits) or None, host=host, port=port, auth=auth or None,
                          interval_s=interval, history_s=max(history, interval))
    )  # fmt: skip
    if page.auth is None and not page.loopback:
        click.echo(
            f"warning: serving on {host} without --auth: anyone who reaches this port reads "
            "the fleet's state",
            err=True,
        )
    click.echo(f"celery-fleet: the fleet page is on {page.url} (Ctrl-C stops)")
    try:
        page.serve_forever()
    except KeyboardInterrupt:
        pass


@click.command()
@click.argument("action", type=click.Choice(["open", "close", "auto"]))
@click.argument("limit")
@click.option("--json", "as_json", is_flag=True, help="The breaker's new state as JSON.")
@click.pass_context
def breaker(ctx: click.Context, action: str, limit: str, as_json: bool) -> None:
    """Force LIMIT's fleet-wide breaker open or closed, or back to automatic."""
    fl = _fleet(ctx)
    b = _guard(lambda: fl.breaker(limit))
    op = {"open": b.force_open, "close": b.force_closed, "auto": b.unforce}[action]
    state = _guard(op)
    if as_json:
        click.echo(json.dumps(asdict(state)))
    else:
        forced = f" (forced {state.forced})" if state.forced else " (automatic)"
        click.echo(f"{limit}: breaker {state.state}{forced}")


@click.command()
@click.argument("limit")
@click.option(
    "--what",
    type=click.Choice(["buckets", "adaptive", "breaker", "all"]),
    default="all",
    show_default=True,
    help="What to reset: the windows (buckets), the adaptive state and pause, the breaker.",
)
@click.pass_context
def reset(ctx: click.Context, limit: str, what: str) -> None:
    """Refill LIMIT's windows, forget its adaptive state and pause, reset its breaker."""
    fl = _fleet(ctx)
    cfg = _guard(lambda: fl.admission.limit(limit))
    done = []
    if what in ("buckets", "all"):
        _guard(lambda: fl.reset_buckets(limit))
        done.append("windows refilled")
    if what in ("adaptive", "all"):
        _guard(lambda: fl.reset_adaptive(limit))
        done.append("adaptive state and pause forgotten")
    if what in ("breaker", "all") and cfg.breaker is not None:
        _guard(lambda: fl.breaker(limit).reset())
        done.append("breaker reset")
    elif what == "breaker":
        raise click.ClickException(f"limit {limit!r} has no breaker")
    click.echo(f"{limit}: " + ", ".join(done))


def _rate(value: str | None) -> int | str | None:
    """A ``--requests``/``--tokens`` value: a bare number is per minute, as in fleet_limits."""
    return int(value) if value is not None and value.strip().isdigit() else value


@click.command("set-limit")
@click.argument("limit")
@click.option("--rpm", type=int, help="Requests per minute.")
@click.option("--tpm", type=int, help="Tokens per minute.")
@click.option("--rate", help="Requests as rates, e.g. '500/minute;10000/day'.")
@click.option("--requests", help="Requests as rates (same as --rate).")
@click.option("--tokens", help="Tokens as rates, e.g. '200000/minute;5000000/day'.")
@click.option("--max-in-flight", type=int, help="Calls at once, fleet-wide.")
@click.option("--headroom", type=float, help="The share of every budget left unused (0-1).")
@click.option("--burst", type=float, help="The share of a window that may go at once (0-1].")
@click.option("--json", "as_json", is_flag=True, help="The version and fields as JSON.")
@click.pass_context
def set_limit(ctx: click.Context, /, limit: str, as_json: bool, **options: Any) -> None:
    """Change LIMIT fleet-wide, without a restart: every process applies it within a second.

    Only the options given change (over what an earlier set-limit set); they are checked
    as fleet_limits is, and a bad value changes nothing. `fleet reset-limit` undoes it.
    """
    fields = {k: v for k, v in options.items() if v is not None}
    for key in ("rate", "requests", "tokens"):
        if key in fields:
            fields[key] = _rate(fields[key])
    fl = _fleet(ctx)
    version = _guard(lambda: fl.set_limit(limit, **fields))
    applied = fl.admission.runtime.applied(limit)
    if as_json:
        click.echo(json.dumps({"limit": limit, "version": version, "fields": applied.fields}))
    else:
        click.echo(
            f"{limit}: version {version}{fields_text(applied.fields)}; every process "
            f"applies it within a second"
        )


@click.command("reset-limit")
@click.argument("limit")
@click.pass_context
def reset_limit(ctx: click.Context, limit: str) -> None:
    """Undo every set-limit of LIMIT: the values of fleet_limits again, fleet-wide."""
    fl = _fleet(ctx)
    version = _guard(lambda: fl.reset_limit(limit))
    click.echo(
        f"{limit}: version {version}, as configured; every process applies it within a second"
    )


@click.command()
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="The record and its events as JSON.")
@click.pass_context
def history(ctx: click.Context, key: str, as_json: bool) -> None:
    """Every recorded event of idempotency key KEY, oldest first, and its record."""
    fl = _fleet(ctx)
    events: list[dict[str, Any]] = _guard(lambda: fl.history(key))
    record = _guard(lambda: fl.key_record(key))
    if not record and not events:
        raise click.ClickException(
            f"no record of key {key!r} (never published, or expired: fleet_dedupe_ttl)"
        )
    if as_json:
        click.echo(json.dumps({"key": key, "record": record, "events": events}, indent=2))
        return
    click.echo(f"{key}: {record.get('state', '?')}, {record.get('attempts', '0')} attempt(s)")
    for e in events:
        at = time.strftime("%H:%M:%S", time.gmtime(int(e.get("at", "0")) / 1000))
        extra = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("id", "event", "at"))
        click.echo(f"  {at}Z  {e.get('event', '?'):<11} {extra}".rstrip())


#: Every subcommand of ``celery fleet``, by the name an operator types.
COMMANDS: dict[str, click.Command] = {
    command.name or "": command
    for command in (status, watch, web, breaker, reset, set_limit, reset_limit, history)
}
