"""What celery-fleet makes other processes import (issue 26).

Celery loads the ``celery.commands`` entry point in every ``celery`` process (workers, beat,
``celery --help``): it must add the entry point's module and nothing else of the package.
``import celery_fleet`` and the Quick start's import must leave the worker's machinery, the
metrics and the command's modules unloaded until something uses them. Each check runs in a
fresh interpreter, where ``sys.modules`` holds what the import itself brought.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import click
import pytest
from click.testing import CliRunner

from celery_fleet.observability.cli import LazyGroup, fleet

# Runs `celery ARGS` as the console script does, optionally without celery-fleet's entry
# points, and prints the modules the process imported to stderr at exit.
LAUNCHER = """
import atexit, importlib.metadata as md, json, sys
if sys.argv[1] == "without":
    _all = md.entry_points
    def entry_points(**params):
        found = _all(**params)
        if "group" not in params:
            return found
        return md.EntryPoints(e for e in found if not e.value.startswith("celery_fleet"))
    md.entry_points = entry_points
atexit.register(lambda: print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["celery", *sys.argv[2:]]
from celery.__main__ import main
main()
"""

#: What the entry point may add to a `celery` process.
ENTRY_POINT_MODULES = {
    "celery_fleet",
    "celery_fleet.observability",
    "celery_fleet.observability.cli",
}

#: Loaded by a worker or by the command when they need it, never by the import itself.
NOT_AT_IMPORT = [
    "celery.worker",  # the worker's machinery: a process that only publishes needs none
    "celery.worker.control",
    "celery.worker.request",
    "celery_fleet.observability.metrics",  # the worker's steps and Prometheus
    "celery_fleet.observability.status",
    "celery_fleet.observability.commands",  # `celery fleet ...`
    "celery_fleet.observability.web",
    "prometheus_client",
]


def _celery(side: str, *args: str) -> tuple[str, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, side, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stderr.rsplit("MODULES ", 1)[1])
    return done.stdout, set(modules)


def _imported(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def test_the_entry_point_is_the_light_module() -> None:
    found = [e for e in metadata.entry_points(group="celery.commands") if e.name == "fleet"]
    assert [e.value for e in found] == ["celery_fleet.observability.cli:fleet"]


@pytest.mark.slow
def test_celery_help_imports_only_the_entry_point() -> None:
    """`celery --help` with the package installed imports three small modules of it more
    than without, and still lists `fleet`."""
    listed, loaded = _celery("with", "--help")
    unlisted, plain = _celery("without", "--help")
    assert any(line.split()[:1] == ["fleet"] for line in listed.splitlines())
    assert not any(line.split()[:1] == ["fleet"] for line in unlisted.splitlines())
    assert loaded - plain == ENTRY_POINT_MODULES


def test_celery_fleet_help_lists_every_subcommand() -> None:
    """The real `celery` group, with the entry point loaded: `celery fleet --help` loads the
    subcommands and lists each with its help."""
    from celery.bin.celery import celery

    from celery_fleet.observability.commands import COMMANDS

    result = CliRunner().invoke(celery, ["fleet", "--help"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line}
    assert listed == set(COMMANDS) and len(COMMANDS) >= 8


@pytest.mark.fast
def test_the_group_loads_its_subcommands_only_when_asked() -> None:
    group = LazyGroup(name="tools", commands_from="celery_fleet.observability.commands")
    assert group.commands == {}
    assert group.get_short_help_str(80) == ""  # no help given, and nothing loaded for it
    assert group.commands == {}
    ctx = click.Context(group)
    assert "status" in group.list_commands(ctx)
    assert group.get_command(ctx, "set-limit") is not None
    assert fleet.get_short_help_str(80).startswith("celery-fleet: the fleet's limits")


def test_import_celery_fleet_imports_nothing_else() -> None:
    loaded = _imported("import celery_fleet")
    assert {m for m in loaded if m.startswith("celery_fleet")} == {"celery_fleet"}
    assert not {"celery", "redis", "kombu"} & loaded


def test_the_quick_start_import_leaves_the_worker_and_the_command_unloaded() -> None:
    loaded = _imported("from celery import Celery\nfrom celery_fleet import Fleet, fleet_task")
    assert "celery_fleet.celery.task" in loaded  # the check would pass on a broken import
    assert not set(NOT_AT_IMPORT) & loaded, sorted(set(NOT_AT_IMPORT) & loaded)


def test_inspect_fleet_is_registered_by_the_command_line_and_by_a_worker() -> None:
    """`celery inspect fleet` needs the name in the `celery` process (the entry point
    registers it there) and in the worker (its InfoStep registers it, however started)."""
    worker = (
        "from types import SimpleNamespace\n"
        "from celery_fleet.observability import metrics\n"
        "from celery.worker.control import Panel\n"
        "before = 'fleet' in Panel.meta\n"
        "metrics.InfoStep(SimpleNamespace())\n"
        "print(before, 'fleet' in Panel.meta)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", worker], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.split() == ["False", "True"], done.stderr
    listed, _ = _celery("with", "inspect", "--list")
    assert any(line.split()[:1] == ["fleet"] for line in listed.splitlines()), listed
