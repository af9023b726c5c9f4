"""``@fleet_task(affinity=...)`` at decoration and publish, with no worker: the key is bound
to the arguments, the task lands in its affinity queue on a real Redis broker, a
rescheduled copy's routing is recomputed, an explicit queue wins, and bad keys are
ConfigErrors before anything is published."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_fleet import ConfigError, Fleet, fleet_task
from celery_fleet.celery.affinity import route
from celery_fleet.distribution import DistributionConfig, queue_of

STEAL = DistributionConfig("steal", 8, namespace="ns")
SHARED = DistributionConfig("shared", 8, namespace="ns")


@pytest.mark.fast
def test_a_keyed_publish_goes_to_its_affinity_queue() -> None:
    options: dict[str, Any] = {}
    route(STEAL, "customer:42", options)
    assert options == {"queue": f"ns.affinity.{queue_of('customer:42', 8)}"}


@pytest.mark.fast
def test_a_rescheduled_copys_routing_is_recomputed() -> None:
    # signature_from_request copies the delivery info: exchange and routing key
    options: dict[str, Any] = {"exchange": "ns.affinity.5", "routing_key": "ns.affinity.5"}
    route(STEAL, "customer:42", options)
    assert options == {"queue": f"ns.affinity.{queue_of('customer:42', 8)}"}
    options = {"exchange": "ns.affinity.5", "routing_key": "ns.affinity.5", "priority": 3}
    route(SHARED, "customer:42", options)
    assert options == {"priority": 3}  # shared: back to the task's ordinary queue


@pytest.mark.fast
def test_an_explicit_queue_wins() -> None:
    options: dict[str, Any] = {"queue": "urgent"}
    route(STEAL, "customer:42", options)
    assert options == {"queue": "urgent"}
    options = {"queue": "other.affinity.1"}  # another fleet's affinity queue: not ours
    route(STEAL, "customer:42", options)
    assert options == {"queue": "other.affinity.1"}


@pytest.mark.fast
@pytest.mark.parametrize("spec", [5, "", "customer:{0}", "customer:{"])
def test_a_bad_affinity_option_fails_at_decoration(spec: Any) -> None:
    with pytest.raises(ConfigError, match="affinity"):
        fleet_task(affinity=spec)


@pytest.fixture
def broker_app(redis_url: str, namespace: str) -> Iterator[tuple[Celery, redis.Redis]]:
    broker = redis_url.rsplit("/", 1)[0] + "/12"
    app = Celery("aff", broker=broker, set_as_current=False)
    app.conf.update(
        fleet_redis_url=redis_url,
        fleet_namespace=namespace,
        fleet_distribution="dedicated",
        fleet_affinity_queues=8,
        fleet_limits={"llm": {"max_in_flight": 2}},
        task_default_queue=f"{namespace}-default",
    )
    Fleet(app)
    client = redis.Redis.from_url(broker)
    yield app, client
    keys = list(client.scan_iter(match=f"*{namespace}*"))
    if keys:
        client.delete(*keys)
    client.close()
    app.close()


def test_a_task_is_published_to_its_affinity_queue(broker_app: tuple[Celery, Any]) -> None:
    app, client = broker_app
    ns = app.conf.fleet_namespace

    @fleet_task(app=app, shared=False, affinity="customer:{customer_id}")
    def handle(customer_id: int, ticket: str = "") -> None: ...

    @fleet_task(app=app, shared=False, affinity=lambda customer_id: f"c{customer_id}")
    def by_callable(customer_id: int) -> None: ...

    handle.delay(42, ticket="t")
    handle.apply_async((42,), queue=f"{ns}-default")  # an explicit queue wins
    by_callable.delay(7)
    assert client.llen(f"{ns}.affinity.{queue_of('customer:42', 8)}") == 1
    assert client.llen(f"{ns}.affinity.{queue_of('c7', 8)}") == 1
    assert client.llen(f"{ns}-default") == 1


def test_a_bad_key_fails_at_publish_and_publishes_nothing(
    broker_app: tuple[Celery, Any],
) -> None:
    app, client = broker_app
    ns = app.conf.fleet_namespace

    @fleet_task(app=app, shared=False, affinity="customer:{customer}")
    def wrong_field(customer_id: int) -> None: ...

    @fleet_task(app=app, shared=False, affinity=lambda customer_id: customer_id)
    def not_a_str(customer_id: int) -> None: ...

    with pytest.raises(ConfigError, match=r"^task .*wrong_field: .*affinity"):
        wrong_field.delay(1)  # the error names the task, as a bad limit or lane does
    with pytest.raises(ConfigError, match=r"^task .*not_a_str: .*affinity"):
        not_a_str.delay(1)
    assert not list(client.scan_iter(match=f"{ns}.affinity.*"))


def test_affinity_works_with_limits_and_idempotency_keys(broker_app: tuple[Celery, Any]) -> None:
    """Affinity decides where, the limit when: a task with both is checked against its
    limit and lands in its affinity queue; a duplicate keyed publish publishes nothing."""
    app, client = broker_app
    ns = app.conf.fleet_namespace

    @fleet_task(
        app=app,
        shared=False,
        limit="llm",
        affinity="customer:{customer_id}",
        idempotency_key="ticket:{ticket}",
    )
    def answer(customer_id: int, ticket: str) -> None: ...

    first = answer.delay(5, "t-1")
    again = answer.delay(5, "t-1")
    assert again.id == first.id
    assert client.llen(f"{ns}.affinity.{queue_of('customer:5', 8)}") == 1
