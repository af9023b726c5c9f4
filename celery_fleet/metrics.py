"""The Prometheus metrics, under the name the README has always used.

They live in :mod:`celery_fleet.observability.metrics`; ``fleet_registry`` is the same
function there and here (needs the ``[prometheus]`` extra).
"""

from .observability.metrics import fleet_registry

__all__ = ["fleet_registry"]
