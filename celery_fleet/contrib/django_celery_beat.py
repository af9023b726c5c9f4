"""django-celery-beat's ``DatabaseScheduler`` with celery-fleet's beat jitter.

django-celery-beat keeps beat entries as ``PeriodicTask`` rows and can store only crontab,
interval, solar and clocked schedules: a ``jittered(...)`` entry of ``beat_schedule`` was
dropped at start ("Cannot convert schedule type", the task never ran), and a
``fleet_jitter`` option (``jitter_options(...)``) was silently lost, publish options not
modelled by ``PeriodicTask`` being discarded.

:class:`JitteredDatabaseScheduler` keeps the jitter where the Django admin shows and edits
it: a ``fleet_jitter`` key (seconds) in the task's **headers** JSON
(``{"fleet_jitter": 600}``). Each entry with one runs on a
:class:`~celery_fleet.celery.beat.Jittered` schedule, exactly as under Celery's default
scheduler: at a deterministic offset in ``[0, fleet_jitter)`` after each nominal time, once
per nominal time, and the entries on the same schedule with the same jitter share the
window evenly. A ``jittered()`` schedule or ``fleet_jitter`` option in ``beat_schedule`` is
stored as the wrapped schedule plus that header, so nothing is dropped.

Run it with ``celery -A proj beat -S
celery_fleet.contrib.django_celery_beat:JitteredDatabaseScheduler`` (or ``beat_scheduler``
set to that path). Needs ``pip install celery-fleet[django-celery-beat]``
and, like django-celery-beat itself, a configured Django (``django.setup()``) before import.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from ..celery.beat import Jittered, bind_entry_names
from ..celery.stagger import JITTER_OPTION, check_jitter
from ..errors import ConfigError

try:
    from django_celery_beat.clockedschedule import clocked
    from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "celery_fleet.contrib.django_celery_beat needs django-celery-beat: "
        "pip install celery-fleet[django-celery-beat]"
    ) from exc

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "JITTER_HEADER",
    "JITTER_KEY_HEADER",
    "JitteredDatabaseScheduler",
    "JitteredModelEntry",
    "stored_entry",
]

log = logging.getLogger("celery_fleet")

#: The key of a ``PeriodicTask``'s headers JSON that holds its jitter, in seconds.
JITTER_HEADER = JITTER_OPTION
#: The key holding ``jittered(key=...)``: offsets keyed by it, not by the task's name.
JITTER_KEY_HEADER = "fleet_jitter_key"

_reported: set[tuple[str, str]] = set()  # (task name, headers) whose bad jitter was logged


def stored_entry(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The form of a ``beat_schedule`` entry that a ``PeriodicTask`` row can hold.

    A ``jittered(inner, max_delay)`` schedule becomes ``inner`` with ``fleet_jitter:
    max_delay`` in the headers; a ``fleet_jitter`` option moves to the headers too. An
    explicit header wins over the option, which wins over ``jittered()``. Raises
    :class:`~celery_fleet.ConfigError` for a jitter that is not a number of seconds in
    ``[0, a year]``. Entries without jitter come back unchanged.

    Example::

        stored_entry("digest", {"task": "t", "schedule": jittered(crontab(hour=2), 600)})
        # {"task": "t", "schedule": <crontab ...>, "options": {"headers": {"fleet_jitter": 600.0}}}
    """
    sched = fields.get("schedule")
    options = dict(fields.get("options") or {})
    if not isinstance(sched, Jittered) and JITTER_OPTION not in options:
        return fields
    headers = dict(options.get("headers") or {})
    jitter = options.pop(JITTER_OPTION, None)
    if isinstance(sched, Jittered):
        jitter = sched.max_delay if jitter is None else jitter
        if sched.key is not None:
            headers.setdefault(JITTER_KEY_HEADER, sched.key)
        sched = sched.inner
    headers.setdefault(JITTER_HEADER, jitter)
    headers[JITTER_HEADER] = check_jitter(
        headers[JITTER_HEADER], f"beat_schedule entry {name!r} {JITTER_HEADER}"
    )
    return {**fields, "schedule": sched, "options": {**options, "headers": headers}}


def _entry_jitter(model: Any) -> tuple[float, str | None] | None:
    """The ``(seconds, key)`` jitter of a ``PeriodicTask`` from its headers, or None
    (none, or a bad one: logged with the task's name and the value, as the admin lets
    anything be typed there)."""
    try:
        headers = json.loads(model.headers or "{}")
    except ValueError:
        return None  # django-celery-beat itself disables the entry and says why
    if not isinstance(headers, dict) or JITTER_HEADER not in headers:
        return None
    try:
        what = f"periodic task {model.name!r} headers {JITTER_HEADER}"
        seconds = check_jitter(headers[JITTER_HEADER], what)
        key = headers.get(JITTER_KEY_HEADER)
        if key is not None and (not isinstance(key, str) or not key):
            raise ConfigError(
                f"periodic task {model.name!r} headers {JITTER_KEY_HEADER} must be a "
                f"non-empty string, got {key!r}"
            )
    except ConfigError as exc:
        # said once per task and value: the entry is built again after every run
        if (model.name, model.headers) not in _reported:
            _reported.add((model.name, model.headers))
            log.error("celery-fleet: %s; it runs without jitter", exc)
        return None
    return seconds, key


class JitteredModelEntry(ModelEntry):  # type: ignore[misc]
    """A ``PeriodicTask`` row as a beat entry, on a jittered schedule when its headers hold
    ``fleet_jitter``. The celery-fleet headers are taken out of the published message's
    headers; a one-off ``clocked`` task gets its jitter as a random countdown at publish
    instead (it has no next time to stay before)."""

    def __init__(self, model: Any, app: Celery | None = None) -> None:
        super().__init__(model, app=app)
        headers = self.options.get("headers")
        if isinstance(headers, dict):
            headers.pop(JITTER_HEADER, None)
            headers.pop(JITTER_KEY_HEADER, None)
        jitter = _entry_jitter(model)
        sched = getattr(self, "schedule", None)
        if jitter is None or sched is None or isinstance(sched, Jittered):
            return
        seconds, key = jitter
        if isinstance(sched, clocked):
            self.options[JITTER_OPTION] = seconds
        else:
            self.schedule = Jittered(sched, seconds, key, self.name)

    def __next__(self) -> JitteredModelEntry:
        # django-celery-beat builds the next entry afresh from the row: keep the share of
        # the window this one was given among the entries on its schedule.
        new: JitteredModelEntry = super().__next__()
        mine, theirs = self.schedule, getattr(new, "schedule", None)
        if isinstance(mine, Jittered) and isinstance(theirs, Jittered):
            new.schedule = theirs.named(self.name, mine.share)
        return new


class JitteredDatabaseScheduler(DatabaseScheduler):  # type: ignore[misc]
    """django-celery-beat's ``DatabaseScheduler``, applying each ``PeriodicTask``'s
    ``fleet_jitter`` header (and storing ``jittered()`` entries of ``beat_schedule``).

    The window is split evenly among the enabled tasks on the same schedule with the same
    jitter, each time the scheduler reads the database (at start, after an admin edit).

    Example::

        # settings.py / celery config
        CELERY_BEAT_SCHEDULER = "celery_fleet.contrib.django_celery_beat:JitteredDatabaseScheduler"
        # then, in the admin, a periodic task's "AMQP Message Headers": {"fleet_jitter": 600}
    """

    Entry = JitteredModelEntry

    def all_as_schedule(self) -> dict[str, Any]:
        entries: dict[str, Any] = super().all_as_schedule()
        bind_entry_names(entries)
        return entries

    def enabled_models(self) -> list[Any]:
        # django-celery-beat leaves out the crontab rows whose hour is more than 2 hours
        # from now (re-read every 5 minutes): a jittered run due later than that would be
        # skipped. The jittered crontab rows are always read.
        models: list[Any] = super().enabled_models()
        seen = {model.pk for model in models}
        jittered_crontabs = self.Model.objects.filter(
            enabled=True, crontab__isnull=False, headers__contains=f'"{JITTER_HEADER}"'
        ).exclude(pk__in=seen)
        return models + list(jittered_crontabs)

    def update_from_dict(self, mapping: dict[str, Any]) -> None:
        # Checked before django-celery-beat's own loop, which logs and skips a bad entry:
        # a bad jitter in the configuration stops beat at start, naming it.
        stored = {name: stored_entry(name, dict(fields)) for name, fields in mapping.items()}
        super().update_from_dict(stored)
        if self._schedule is not None:  # the new entries join their schedule's share
            bind_entry_names(self._schedule)
