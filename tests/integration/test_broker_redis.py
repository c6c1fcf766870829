"""Our Celery app against the real Redis: what the broker keeps of a message a worker has fetched."""

from __future__ import annotations

import redis
from tests.harness import Services

from taskscheduler.broker import configure_celery
from taskscheduler.config import Settings


def test_a_fetched_message_leaves_no_unacked_copy_in_redis(
    settings: Settings, redis_client: redis.Redis, services: Services
):
    # Kombu's ack emulation would hold the message in an `unacked` hash until the ack (two Redis
    # round trips per message) and give it back only after an hour; a lost message is published
    # again from the database instead, so our consumers fetch without that bookkeeping.
    app = configure_celery(settings)
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("ack-emulation-probe")
        try:
            queue.put({"probe": 1})
            message = queue.get(timeout=5)
            assert message.payload == {"probe": 1}
            assert not list(redis_client.scan_iter(match=f"{services.redis_key_prefix}unacked*"))
            message.ack()
        finally:
            queue.close()
