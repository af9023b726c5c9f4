"""A small agent fleet on celery-fleet: read celeryconfig.py, then tasks.py."""
