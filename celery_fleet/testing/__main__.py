"""``python -m celery_fleet.testing``: the provider simulator CLI (as ``...testing.provider``)."""

from .cli import main

raise SystemExit(main())
