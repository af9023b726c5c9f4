"""LiteLLM's global callback lists, saved and put back around a test (a FleetHook left in
them would outlive the test and its closed fleet)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

NAMES = (
    "callbacks",
    "input_callback",
    "success_callback",
    "failure_callback",
    "_async_success_callback",
    "_async_failure_callback",
)


@contextmanager
def kept(litellm: Any) -> Iterator[None]:
    """Put ``litellm``'s callback lists back as they were when the block ends."""
    saved = {name: list(getattr(litellm, name)) for name in NAMES}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(litellm, name, value)
