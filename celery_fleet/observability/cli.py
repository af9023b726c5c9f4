"""``celery -A proj fleet ...``: the fleet's state and its operator switches, from Redis only.

Registered through Celery's ``celery.commands`` entry point, so it runs with the app of
``-A`` and needs no worker:

- ``fleet status [LIMIT...] [--json]``: a table per limit: each window's budget left now,
  in flight / cap and the oldest lease's age, the adaptive cap and rate factor, a provider
  pause, the breaker, callers waiting in line, each priority lane's in flight and waiting;
- ``fleet watch [--interval 2] [--count N]``: the same, refreshed;
- ``fleet web [--host 127.0.0.1] [--port 8555] [--auth user:password]``: the same as a live
  page in a browser, with sparklines (:mod:`celery_fleet.observability.web`);
- ``fleet breaker open|close|auto LIMIT``: force the fleet-wide breaker open or closed, or
  give it back to the failure rate (``auto``);
- ``fleet reset LIMIT [--what buckets|adaptive|breaker|all]``: refill the windows, forget
  the adaptive state and pause, reset the breaker;
- ``fleet set-limit LIMIT [--rpm N] [--tpm N] [--max-in-flight N] ...``: change a limit
  fleet-wide without a restart (``fleet.set_limit``); ``fleet reset-limit LIMIT`` goes back
  to the configured values;
- ``fleet history KEY [--json]``: every recorded event of an idempotency key.

An unreachable Redis, an unknown limit or key, or a bad argument is one line on stderr and exit
status 1 (2 for usage errors, as click does), never a traceback.

Celery loads this module in every ``celery`` process (workers, beat, ``celery --help``), so
it imports click and what Celery's command line has already imported, nothing of the
package: the subcommands (:mod:`celery_fleet.observability.commands`, which import the
package, Redis included) load only when ``celery fleet`` itself runs. It also names
``celery inspect fleet`` to Celery's remote control (:func:`register_inspect`), whose
answer (:func:`celery_fleet.observability.metrics.inspect_fleet`) loads when a worker gives it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

__all__ = ["fleet", "LazyGroup", "register_inspect"]

_COMMANDS = "celery_fleet.observability.commands"


class LazyGroup(click.Group):
    """A click group whose subcommands are imported the first time the group is used.

    ``celery --help`` shows the group's one-line help without importing anything;
    ``celery fleet ...`` (or ``--help``, or shell completion) asks for a subcommand, and the
    module named by ``commands_from`` is imported then: its ``COMMANDS`` dict (name to
    ``click.Command``) fills the group.

    Example::

        @click.group(cls=LazyGroup, commands_from="proj.commands", help="Project tools.")
        def tools() -> None: ...
    """

    def __init__(self, *args: Any, commands_from: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands_from = commands_from
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            module = importlib.import_module(self.commands_from)
            for name, command in module.COMMANDS.items():
                self.add_command(command, name)
            self._loaded = True

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)


@click.group(name="fleet", cls=LazyGroup, commands_from=_COMMANDS)
def fleet() -> None:
    """celery-fleet: the fleet's limits, breakers and idempotency keys (reads Redis)."""


def _inspect_fleet(state: Any) -> dict[str, Any]:
    """The slots this worker holds, with their tasks, and each limit's state."""
    from .metrics import inspect_fleet

    return inspect_fleet(state)


_registered = False


def register_inspect() -> None:
    """Add ``fleet`` to Celery's inspect commands, once per process.

    ``celery inspect fleet`` checks the name in its own process before it sends anything,
    and a worker looks the handler up by name: the ``celery`` command line has this module
    loaded (the entry point, registered here at import), and a worker also registers when
    it builds its steps (:class:`~celery_fleet.observability.metrics.InfoStep`), however it
    was started. ``celery.worker.control`` is imported here only, where Celery's command
    line or worker has imported it already.
    """
    global _registered
    if not _registered:
        from celery.worker.control import inspect_command

        inspect_command(name="fleet")(_inspect_fleet)
        _registered = True


if "celery.worker.control" in sys.modules:  # a `celery` process: its inspect checks names
    register_inspect()


def __getattr__(name: str) -> Any:
    # The helpers this module held before the subcommands moved out (``_status``,
    # ``_table``...): imported from here by older code, they load the subcommands.
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module(_COMMANDS), name)
