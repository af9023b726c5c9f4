"""The Celery app of the Django project: what ``celery -A ... beat`` runs in the tests.

Its broker and queue come from ``FLEET_DJ_BROKER`` and ``FLEET_DJ_QUEUE``; its
``beat_schedule`` holds one ``jittered()`` entry (the one django-celery-beat used to drop)
and one with ``jitter_options()`` (whose option it used to lose).
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import django
from celery import Celery

from celery_fleet import jitter_options, jittered

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.integration.djproject.settings")
django.setup()

#: The beat_schedule's period and jitters, in seconds (the test reads them from here).
EVERY_S = 10
CONFIG_JITTER_S = 6
OPTION_JITTER_S = 4


def beat_schedule() -> dict[str, Any]:
    every = dt.timedelta(seconds=EVERY_S)
    return {
        "from-config-jittered": {
            "task": "dj.ping",
            "schedule": jittered(every, CONFIG_JITTER_S),
            "kwargs": {"entry": "from-config-jittered"},
        },
        "from-config-option": {
            "task": "dj.ping",
            "schedule": every,
            "kwargs": {"entry": "from-config-option"},
            "options": jitter_options(OPTION_JITTER_S),
        },
    }


def make_app(broker: str, queue: str) -> Celery:
    app = Celery("djproject", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        timezone="UTC",
        enable_utc=True,
        result_expires=None,  # no celery.backend_cleanup entry
        beat_schedule=beat_schedule(),
    )
    return app


app = make_app(
    os.environ.get("FLEET_DJ_BROKER", "redis://127.0.0.1:6379/9"),
    os.environ.get("FLEET_DJ_QUEUE", "dj-beat"),
)
app.set_current()
