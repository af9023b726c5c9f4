"""Log lines carry their fields as record attributes, not only in the text, so a JSON log
formatter gets them (docs/observability.md, Logs): under the names issue 22 gives
(``limit``, ``reason``, ``wait_ms``, ``task_id``, ``key``, ``state``) and as ``fleet_*``."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_fleet import Fleet, fleet_task
from celery_fleet.admission.config import parse_limits
from celery_fleet.celery.signals import breaker_announcer, slot_watcher
from celery_fleet.errors import StoreUnavailable
from celery_fleet.logfields import log_fields
from celery_fleet.resilience.fallback import StoreDown


@pytest.fixture
def app() -> Iterator[Celery]:
    yield Celery("logs", broker="memory://", backend="cache+memory://", set_as_current=False)


def _record(caplog: pytest.LogCaptureFixture, needle: str) -> logging.LogRecord:
    (record,) = [r for r in caplog.records if needle in r.getMessage()]
    return record


def _bare(record: logging.LogRecord, *names: str) -> None:
    """Each ``fleet_<name>`` field is on the record as ``<name>`` too, with its value."""
    for name in names:
        assert getattr(record, name) == getattr(record, f"fleet_{name}"), name


class _TaskFormatted(logging.Handler):
    """Formats each record as it is logged with Celery's worker TaskFormatter, which sets
    ``task_id`` from the task running in the logging thread."""

    def __init__(self, fmt: str) -> None:
        from celery.app.log import TaskFormatter

        super().__init__()
        self.setFormatter(TaskFormatter(fmt, use_color=False))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_no_bare_field_name_is_a_logrecord_attribute() -> None:
    """``extra=`` may not overwrite a LogRecord attribute (``makeRecord`` raises KeyError):
    none of the bare names is one, so every line can carry them."""
    names = ("limit", "reason", "wait_ms", "task_id", "key", "state")
    assert not set(names) & set(logging.makeLogRecord({}).__dict__)
    logger = logging.getLogger("celery_fleet.test-log-fields")
    record = logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, "m", (), None,
        extra=log_fields(**dict.fromkeys(names, "v")),
    )  # fmt: skip
    _bare(record, *names)


def test_a_reschedule_line_carries_task_limit_reason_and_wait(
    app: Celery, redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    from celery.app.trace import build_tracer

    app.conf.fleet_redis_url = redis_url
    app.conf.fleet_namespace = namespace
    app.conf.fleet_limits = {"once": {"requests": "1/minute"}}
    app.conf.fleet_defer = "countdown"
    Fleet(app)

    @fleet_task(app=app, shared=False, limit="once", max_wait=0, name="logged")
    def once() -> str:
        return "ok"

    assert once() == "ok"  # spends the budget: the worker's run below reschedules
    tracer = build_tracer(once.name, once, app=app, eager=False, propagate=False)
    formatted = _TaskFormatted("%(task_name)s %(task_id)s %(limit)s %(reason)s %(wait_ms)s")
    logger = logging.getLogger("celery_fleet")
    logger.addHandler(formatted)
    try:
        with caplog.at_level(logging.INFO, logger="celery_fleet"):
            tracer("t-log", [], {}, {"id": "t-log", "delivery_info": {}})
    finally:
        logger.removeHandler(formatted)
    record = _record(caplog, "rescheduled task=")
    _bare(record, "task_id", "limit", "reason", "wait_ms")
    # Celery's worker formatter sets task_id from the running task: the same task
    (line,) = [line for line in formatted.lines if " once requests/60s " in line]
    assert line.startswith("logged t-log once requests/60s "), line
    assert record.fleet_task_id == "t-log"  # type: ignore[attr-defined]
    assert record.fleet_limit == "once"  # type: ignore[attr-defined]
    assert record.fleet_reason == "requests/60s"  # type: ignore[attr-defined]
    assert 0 < record.fleet_wait_ms <= 60_000  # type: ignore[attr-defined]
    assert "id=t-log limit=once reason=requests/60s" in record.getMessage()  # text unchanged


def test_breaker_and_provider_pause_lines_carry_the_limit(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        breaker_announcer(app)("openai", "open")
        slot_watcher(app)("pushback", "openai", {"status": 429, "retry_after_ms": 1500})
    breaker = _record(caplog, "breaker limit=openai state=open")
    assert breaker.fleet_limit == "openai"  # type: ignore[attr-defined]
    assert breaker.fleet_state == "open"  # type: ignore[attr-defined]
    _bare(breaker, "limit", "state")
    pause = _record(caplog, "pause limit=openai status=429 retry_after_ms=1500")
    assert pause.fleet_limit == "openai"  # type: ignore[attr-defined]
    assert pause.fleet_reason == "provider 429"  # type: ignore[attr-defined]
    assert pause.fleet_wait_ms == 1500  # type: ignore[attr-defined]
    _bare(pause, "limit", "reason", "wait_ms")


@pytest.mark.parametrize("answered_before", [False, True])
def test_the_store_down_line_says_store_down(
    answered_before: bool, caplog: pytest.LogCaptureFixture
) -> None:
    down = StoreDown("local", parse_limits({"llm": {"rpm": 60}}), lambda: 1)
    down.ever_answered = answered_before
    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        down.failed(StoreUnavailable("redis://127.0.0.1:1/0", "Connection refused"))
    (record,) = [r for r in caplog.records if "fleet's Redis" in r.getMessage()]
    assert record.fleet_reason == "store_down"  # type: ignore[attr-defined]
    _bare(record, "reason")


def test_an_idempotency_key_line_carries_the_key(caplog: pytest.LogCaptureFixture) -> None:
    from celery_fleet.celery.idempotency import encode_result

    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        assert encode_result("order-7", object()) == ""  # JSON cannot hold it
    record = _record(caplog, "key 'order-7' returned a object")
    assert record.fleet_key == "order-7"  # type: ignore[attr-defined]
    _bare(record, "key")


class _HandClock:
    """Monotonic time moved by the test only (the lease keeper's deadlines)."""

    now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_lease_lines_carry_the_limit_and_the_task_holding_it(
    app: Celery, redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A lost lease (ERROR) and a release that finds its lease gone name the limit and
    the task that held the slot, as fields and not only in the text."""
    app.conf.fleet_redis_url = redis_url
    app.conf.fleet_namespace = namespace
    app.conf.fleet_limits = {"llm": {"max_in_flight": 2}}
    clock = _HandClock()
    fleet = Fleet(app, clock=clock)

    @app.task(bind=True, shared=False)
    def call(self: object) -> None:
        with fleet.slot("llm") as slot:
            clock.now += fleet.limits["llm"].lease_s + 1  # stalled past the lease's TTL
            fleet.keeper.renew_due()  # marks it lost, without asking Redis
            assert slot.lost
            # and Redis lost it too: the release finds nothing to release
            fleet.store.call("ZREM", fleet.admission.keys("llm").leases, slot.lease_id)

    with caplog.at_level(logging.WARNING, logger="celery_fleet"):
        result = call.apply()
    result.get()
    fleet.store.drain()  # the release's reply, posted, is read now
    lost = _record(caplog, "was lost (not renewed within its TTL)")
    expired = _record(caplog, "had expired before release")
    for record in (lost, expired):
        assert record.fleet_limit == "llm"  # type: ignore[attr-defined]
        assert record.fleet_task_id == result.id  # type: ignore[attr-defined]
        _bare(record, "limit", "task_id")
