"""The yardstick: a tiny Celery app with a no-op task, on the same Redis as ours.

Worker: `python -m celery -A benchmarks.raw_celery worker --pool=prefork --concurrency=N -Q rawbench`
Publisher: `python -m benchmarks.raw_celery publish COUNT`

Configured from REDIS_URL and REDIS_KEY_PREFIX like ours, with the same serializer and result
settings as our Celery app, but tuned for raw Celery at its best: the prefetch multiplier from
RAW_PREFETCH_MULTIPLIER (default PREFETCH_MULTIPLIER, the fastest measured on the benchmark machine),
prefetch on (no disable_prefetch), no ack emulation (RAW_ACK_EMULATION=1 for Celery's default), no
time limits unless the publisher asks. The no-op's only work
is one Redis INCR, so the benchmark can tell when every message has been run (ours is told by the
database).
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from typing import Any

import redis
from celery import Celery
from kombu.entity import Queue as KombuQueue

from taskscheduler.config import redis_client_url

QUEUE = "rawbench"
NOOP = "rawbench.noop"

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("REDIS_KEY_PREFIX", "")
DONE_KEY = f"{PREFIX}rawbench:done"
# The fastest of 1, 4, 16 and 64 measured with `python -m benchmarks.throughput --skip-ours --raw-prefetch N`
# at 20,000 (BENCHMARKS.md): without ack emulation 1 (1,820-1,900/s, the others 920-1,830 and erratic);
# with it 4, which the issue that asked for this baseline found best too.
PREFETCH_MULTIPLIER = 1
# Kombu's Redis ack emulation (Celery's default) keeps each fetched message in an `unacked` hash
# until it is acked: two synchronous Redis round trips per message in the worker's consumer, which
# roughly halved raw Celery's rate here. Off is its fastest (a crash then loses its prefetched
# messages, as it already loses the running one with early acks); RAW_ACK_EMULATION=1 turns it on.
ACK_EMULATION = os.environ.get("RAW_ACK_EMULATION", "0") == "1"

app = Celery("rawbench", set_as_current=False)
app.conf.update(
    broker_url=REDIS_URL,
    broker_transport_options=({"global_keyprefix": PREFIX} if PREFIX else {}) | {"ack_emulation": ACK_EMULATION},
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    result_backend=None,
    task_queues=[KombuQueue(QUEUE, routing_key=QUEUE)],
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=int(os.environ.get("RAW_PREFETCH_MULTIPLIER") or PREFETCH_MULTIPLIER),
    worker_send_task_events=False,
    enable_utc=True,
)

_client: redis.Redis | None = None
_client_pid = 0


def done_counter() -> redis.Redis:
    """One client per process (prefork children must not share the parent's socket)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(redis_client_url(REDIS_URL))
        _client_pid = os.getpid()
    return _client


@app.task(name=NOOP, ignore_result=True, acks_late=False)
def noop(task_id: str, attempt: int) -> None:
    done_counter().incr(DONE_KEY)


def publish(count: int, *, time_limits: bool = False) -> float:
    """Publish `count` no-op messages over one producer connection, as our scheduler does."""
    extra: dict[str, Any] = {"time_limit": 186.0} if time_limits else {}
    with app.producer_or_acquire() as producer:
        # The benchmark times from here: the process's start-up is not publishing.
        print(f"publishing from {time.time()!r}", flush=True)
        started = time.perf_counter()
        for _ in range(count):
            noop.apply_async((str(uuid.uuid4()), 1), queue=QUEUE, routing_key=QUEUE, producer=producer, **extra)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("count", type=int)
    pub.add_argument("--time-limits", action="store_true", help="carry soft/hard time limits, as ours does")
    args = parser.parse_args()
    seconds = publish(args.count, time_limits=args.time_limits)
    print(f"published {args.count} in {seconds:.3f}s ({args.count / seconds:,.0f}/s)", flush=True)


if __name__ == "__main__":
    main()
