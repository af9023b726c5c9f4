"""celery-redbeat stores a ``jittered(...)`` beat entry as its wrapped schedule plus a
``fleet_jitter`` option.

RedBeat writes every entry to Redis as JSON (``redbeat.decoder.RedBeatJSONEncoder``), which
knows interval, crontab and rrule schedules only: a :class:`~celery_fleet.celery.beat.Jittered`
made ``RedBeatScheduler`` crash at start (``Object of type Jittered is not JSON
serializable``). RedBeat also reloads its entries from Redis on every tick, so a jittered
schedule could not keep the entry name that beat start binds to it anyway.

So, once redbeat is imported, its encoder learns one rewrite: an entry definition whose
schedule is jittered is stored as the wrapped schedule, with ``fleet_jitter=max_delay`` in
its options (an explicit ``fleet_jitter`` option wins). Each run is then delayed by a random
forward-only countdown in ``[0, max_delay)`` at publish
(:mod:`celery_fleet.celery.stagger`), exactly as ``"options": jitter_options(max_delay)``
does. What is lost against the pickling schedulers: the offsets are random rather than
deterministic per entry, and entries on one schedule are not split evenly over the window.
The stored entry is plain RedBeat JSON, readable by any RedBeat process.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["redbeat_definition", "teach_redbeat"]

_TAUGHT = "_celery_fleet_jittered"  # marks an encoder class already taught


def redbeat_definition(definition: Any) -> Any:
    """The form RedBeat stores of an entry ``definition`` (the dict its ``save()`` encodes):
    unchanged unless its schedule is jittered, else the wrapped schedule and the jitter as
    the ``fleet_jitter`` option."""
    from .beat import Jittered
    from .stagger import JITTER_OPTION

    if not isinstance(definition, dict) or not isinstance(definition.get("schedule"), Jittered):
        return definition
    sched = definition["schedule"]
    options = {JITTER_OPTION: sched.max_delay, **(definition.get("options") or {})}
    return {**definition, "schedule": sched.inner, "options": options}


def teach_redbeat() -> bool:
    """Teach the imported celery-redbeat's JSON encoder to store jittered entries (once per
    process); returns whether redbeat is imported. Never imports redbeat itself: it is an
    optional dependency, and importing it connects its beat-lock signal handler."""
    decoder = sys.modules.get("redbeat.decoder")
    encoder_cls = getattr(decoder, "RedBeatJSONEncoder", None)
    if encoder_cls is None:
        return False
    if getattr(encoder_cls, _TAUGHT, False):
        return True
    plain_encode = encoder_cls.encode

    def encode(self: Any, o: Any) -> str:
        return str(plain_encode(self, redbeat_definition(o)))

    encoder_cls.encode = encode
    setattr(encoder_cls, _TAUGHT, True)
    return True
