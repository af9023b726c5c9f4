"""The depths the steal loop and ``celery fleet status`` read from the broker: LLEN on the
Redis transport, a passive declare on RabbitMQ (a queue not declared yet is empty)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue

from celery_fleet.distribution.depths import BrokerDepths

AMQP_URL = os.environ.get("FLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _amqp_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    if request.param == "amqp":
        if not _amqp_answers():
            if os.environ.get("CI"):
                pytest.fail("no RabbitMQ on 127.0.0.1:5672")
            pytest.skip("no RabbitMQ on 127.0.0.1:5672")
        yield AMQP_URL
    else:
        yield redis_url.rsplit("/", 1)[0] + "/12"


def test_depths_count_waiting_messages_and_missing_queues_are_empty(broker: str) -> None:
    name = f"t-depth-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name, auto_delete=False)
    app = Celery("depths", broker=broker, set_as_current=False)
    depths = BrokerDepths(app)
    # confirmed publishes: RabbitMQ has queued each message when publish returns (else a
    # passive declare right after may count 2 of 3)
    with Connection(broker, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        producer = Producer(channel, exchange=queue.exchange, routing_key=name)
        queue(channel).declare()
        for i in range(3):
            producer.publish({"n": i}, declare=[queue])
        try:
            missing = f"{name}-never-declared"
            assert depths.depths([name, missing]) == {name: 3, missing: 0}
            assert depths.depths([missing, name]) == {missing: 0, name: 3}  # after a 404
        finally:
            depths.close()
            queue(channel).delete()
            channel.close()
    app.close()
