"""Jittered beat schedules: entries on the same crontab stop firing in the same second.

``jittered(crontab(hour=2, minute=0), max_delay=600)`` is a Celery schedule whose every due
time is the wrapped schedule's, shifted forward by an offset in ``[0, max_delay)``. The
offset is a hash of the entry's name and the nominal due time
(:func:`~celery_fleet.admission.backoff.offset`), so it is:

- *deterministic*: a beat restarted inside the window computes the same due time again,
  so it neither re-rolls nor fires twice;
- *per entry*: when beat starts (the ``beat_init`` signal) it names each entry's schedule
  and the ``n`` entries on the same schedule share the window: each owns one n-th of it,
  at a random point inside, in an order rotated per due time, so they never collide and
  arrive at a steady rate. ``key=`` opts an entry out: its offset is a hash of the key
  and the due time alone;
- *forward only* and shorter than the gap to the next nominal time, so a run never moves
  before its time (negative jitter on crons double-runs) nor past the following one.

Interval schedules (``timedelta``, seconds, ``schedule``) are aligned to the Unix epoch
(every ``run_every`` since 1970, as Temporal's interval specs are) instead of counting from
the last run: counting from a jittered run would add half the jitter to every period.

It pickles, so Celery's default ``PersistentScheduler`` stores it. celery-redbeat, which
stores entries as JSON, stores it as the wrapped schedule plus a ``fleet_jitter`` option
(:mod:`celery_fleet.celery.redbeat_codec`): a random forward-only countdown at publish
(:mod:`celery_fleet.celery.stagger`), without the deterministic, evenly shared offsets.
Other JSON schedulers cannot keep it: put the jitter in the entry's options
(``"options": jitter_options(600)``).
"""

from __future__ import annotations

import datetime as dt
import numbers
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.schedules import BaseSchedule, crontab, schedstate, schedule

from ..admission.backoff import offset
from ..checks import MAX_SECONDS, number
from ..errors import ConfigError

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Jittered", "jittered", "bind_entry_names"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class Jittered(BaseSchedule):  # type: ignore[misc]
    """A Celery schedule: ``inner``'s due times, each shifted by a deterministic offset.

    Build it with :func:`jittered`. ``key`` names the offsets' sequence (default: the beat
    entry's name, set when beat starts).
    """

    def __init__(
        self,
        inner: BaseSchedule,
        max_delay: float,
        key: str | None = None,
        name: str | None = None,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        super().__init__(nowfun=None, app=getattr(inner, "_app", None))
        self.inner = inner
        self.max_delay = max_delay
        self.key = key
        self.name = name  # the entry's name, bound at beat start
        # (rank, size) among the beat's entries with the same schedule and max_delay
        self.share = share

    # -- Celery's schedule interface --------------------------------------------------

    @property
    def app(self) -> Celery:
        return self.inner.app

    @app.setter
    def app(self, app: Celery) -> None:
        # maybe_schedule() sets the entry's app: the wrapped schedule needs it (timezone).
        self.inner.app = app
        # An entry is being built, maybe by celery-redbeat, about to store it as JSON.
        from .redbeat_codec import teach_redbeat

        teach_redbeat()

    def now(self) -> dt.datetime:
        now: dt.datetime = self.inner.now()
        return now

    def is_due(self, last_run_at: dt.datetime) -> schedstate:
        """``(due, seconds to the next check)``: due once the jittered time after
        ``last_run_at`` has come; then the next check is the jittered time after now."""
        now = self.now()
        due = self.due_after(last_run_at)
        if now < due:
            return schedstate(False, (due - now).total_seconds())
        return schedstate(True, max(0.0, (self.due_after(now) - now).total_seconds()))

    def remaining_estimate(self, last_run_at: dt.datetime) -> dt.timedelta:
        return self.due_after(last_run_at) - self.now()

    # -- the jitter -------------------------------------------------------------------

    @property
    def offset_key(self) -> str:
        """What the offsets hash besides the due time: ``key``, else the entry's name."""
        return self.key or self.name or repr(self.inner)

    def nominal_after(self, moment: dt.datetime) -> dt.datetime:
        """The wrapped schedule's first due time strictly after ``moment`` (aware)."""
        inner = self.inner
        moment = inner.maybe_make_aware(moment)
        if type(inner) is schedule:
            every = inner.run_every.total_seconds()
            since = (moment - _EPOCH).total_seconds()
            return _EPOCH + dt.timedelta(seconds=(since // every + 1) * every)
        if isinstance(inner, crontab):
            start, delta, _ = inner.remaining_delta(moment)
            nominal: dt.datetime = inner.maybe_make_aware(start + delta)
            return nominal
        # solar and any other schedule: its own estimate, rounded up to the second (never
        # before the event), and strictly after ``moment``.
        for start in (moment, moment + dt.timedelta(seconds=1)):
            now = self.now()
            at: dt.datetime = inner.maybe_make_aware(now + inner.remaining_estimate(start))
            at = at.replace(microsecond=0) + dt.timedelta(seconds=1 if at.microsecond else 0)
            if at > moment:
                break
        return at

    def due_after(self, moment: dt.datetime) -> dt.datetime:
        """The jittered due time of the first nominal time after ``moment``."""
        nominal = self.nominal_after(moment)
        gap = (self.nominal_after(nominal) - nominal).total_seconds()
        window = min(self.max_delay, max(0.0, gap) * 0.999)  # never reach the next one
        at = nominal.timestamp()
        rank, size = self.share
        if size > 1:
            # Entries on the same schedule take turns: each owns one n-th of the window, in
            # an order rotated per due time, and a random point inside it.
            turn = (rank + int(offset(f"{self.inner!r}/{size}", at, size))) % size
            shift = (turn + offset(self.offset_key, at, 1.0)) * window / size
        else:
            shift = offset(self.offset_key, at, window)
        return nominal + dt.timedelta(seconds=shift)

    def named(self, name: str, share: tuple[int, int] = (0, 1)) -> Jittered:
        """A copy whose offsets are keyed by the entry ``name`` (unless ``key`` was given),
        holding share ``(rank, size)`` of the window with its schedule's other entries."""
        return Jittered(self.inner, self.max_delay, self.key, name, share)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Jittered, (self.inner, self.max_delay, self.key, self.name, self.share))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Jittered):
            return NotImplemented
        return (self.inner, self.max_delay, self.offset_key) == (
            other.inner,
            other.max_delay,
            other.offset_key,
        )

    def __hash__(self) -> int:
        return hash((repr(self.inner), self.max_delay, self.offset_key))

    def __repr__(self) -> str:
        return f"<jittered {self.inner!r} by [0, {self.max_delay:g}) s>"


def jittered(sched: object, max_delay: float, *, key: str | None = None) -> Jittered:
    """Wrap a Celery schedule so each due time is shifted by a deterministic offset in
    ``[0, max_delay)`` seconds, per entry and per due time (see the module docstring).

    ``sched``: a ``crontab``, ``solar``, ``schedule``, ``timedelta`` or a number of seconds.
    ``key``: the name offsets are keyed by (default: the beat entry's name).
    Raises :class:`~celery_fleet.ConfigError` for a negative, NaN or infinite ``max_delay``,
    an unknown schedule type or a non-string key.

    Example::

        app.conf.beat_schedule = {
            "nightly-digest": {
                "task": "proj.tasks.digest",
                "schedule": jittered(crontab(hour=2, minute=0), max_delay=600),
            },
        }
    """
    delay = number(max_delay, "jittered(max_delay=...)", lo=0.0, hi=MAX_SECONDS)
    if key is not None and (not isinstance(key, str) or not key):
        raise ConfigError(f"jittered(key=...) must be a non-empty string or None, got {key!r}")
    if isinstance(sched, Jittered):
        raise ConfigError("jittered() got a schedule that is already jittered")
    if isinstance(sched, numbers.Real) and not isinstance(sched, bool):
        sched = dt.timedelta(seconds=number(sched, "jittered(schedule)", lo_open=0.0))
    if isinstance(sched, dt.timedelta):
        if sched.total_seconds() <= 0:
            raise ConfigError(f"jittered() needs a positive interval, got {sched!r}")
        sched = schedule(sched)
    if not isinstance(sched, BaseSchedule):
        raise ConfigError(
            "jittered() wraps a Celery schedule (crontab, solar, schedule, timedelta or "
            f"seconds), got {type(sched).__name__}: {sched!r}"
        )
    return Jittered(sched, delay, key)


def bind_entry_names(schedule_entries: Any) -> int:
    """Key every jittered schedule of a beat's entries by the entry's name, and share the
    window among the entries on the same schedule (same wrapped schedule and max_delay).

    Each entry gets its own copy, so one ``jittered(...)`` object shared by two entries
    still gives them different offsets; ``n`` entries on one crontab each own one n-th of
    the window (in name order, rotated per due time), so none collide. Returns how many
    entries it named.
    """
    groups: dict[tuple[str, float], list[str]] = {}
    for name, entry in list(schedule_entries.items()):
        sched = getattr(entry, "schedule", None)
        if isinstance(sched, Jittered) and sched.key is None:
            groups.setdefault((repr(sched.inner), sched.max_delay), []).append(name)
    share = {
        name: (rank, len(names))
        for names in groups.values()
        for rank, name in enumerate(sorted(names))
    }
    named = 0
    for name, entry in list(schedule_entries.items()):
        sched = getattr(entry, "schedule", None)
        if isinstance(sched, Jittered):
            wanted = share.get(name, (0, 1))
            if sched.name != name or sched.share != wanted:
                entry.schedule = sched.named(name, wanted)
                named += 1
    return named


@signals.beat_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_beat_init(sender: Any = None, **_: Any) -> None:
    """Name the jittered schedules of the beat that is starting (``celery beat`` and ``-B``)."""
    scheduler = getattr(sender, "scheduler", None)
    entries = getattr(scheduler, "schedule", None)
    if hasattr(entries, "items"):
        bind_entry_names(entries)
    from .stagger import check_entry_options

    check_entry_options(entries, getattr(scheduler, "app", None))
