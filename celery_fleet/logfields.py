"""The ``extra=`` fields of the package's log lines (docs/observability.md, Logs).

Each field rides on the record twice: as ``fleet_<name>`` (the names of the first
releases, kept for formatters and filters that read them) and as the bare ``<name>``
issue 22 names (``limit``, ``reason``, ``wait_ms``, ``task_id``, ``key``, ``state``).
None of the bare names is an attribute of :class:`logging.LogRecord`, so ``extra=`` may
set them. ``task_id`` is also what Celery's ``TaskFormatter`` sets at format time, from
the task running in the logging thread: on every line that carries it, that is the same
task (a line about a task is logged while it runs, or outside any task, where the
formatter keeps the record's value).
"""

from __future__ import annotations

__all__ = ["log_fields"]


def log_fields(**fields: object) -> dict[str, object]:
    """``log_fields(limit="openai")`` -> ``{"fleet_limit": "openai", "limit": "openai"}``."""
    out: dict[str, object] = {}
    for name, value in fields.items():
        out[f"fleet_{name}"] = value
        out[name] = value
    return out
