"""Django settings: django-celery-beat's models in an SQLite file (``FLEET_DJANGO_DB``)."""

from __future__ import annotations

import os

SECRET_KEY = "celery-fleet-tests-only"
INSTALLED_APPS = ["django_celery_beat"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("FLEET_DJANGO_DB", ":memory:"),
        # beat writes last_run_at while the test process reads: wait for the lock a while
        "OPTIONS": {"timeout": 30},
    }
}
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
