"""A minimal Django project with django-celery-beat, on SQLite, for the beat tests.

``settings`` reads the database file from ``FLEET_DJANGO_DB``; ``celery_app`` is the Celery
app a real ``celery beat`` process runs (``-A tests.integration.djproject.celery_app``).
"""
