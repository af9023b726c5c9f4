"""The Celery app and its Fleet: ``celery -A example_project.app worker``."""

from celery import Celery
from celery.signals import worker_process_init

from celery_fleet import Fleet

app = Celery("example_project")
app.config_from_object("example_project.celeryconfig")
fleet = Fleet(app)


@worker_process_init.connect
def _warm_up(**_: object) -> None:
    """Open this child's Redis connection and model client before the first agent arrives.

    Cheap (tens of ms) as worker_process_init must be: Celery kills a child whose
    initialisation takes more than 4 s. Also fails the child early when Redis is down.
    """
    from . import model

    model.client()
    fleet.check()
