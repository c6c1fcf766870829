"""A message of several tasks, with real worker processes: a slow task does not hold up the rest."""

from __future__ import annotations

import signal
import uuid
from typing import Any

import pytest

from taskscheduler import broker
from taskscheduler.config import Settings
from tests.helpers import dispatch_all, new_task, task_row, wait_until

pytestmark = pytest.mark.e2e


def test_a_slow_first_task_does_not_hold_up_the_other_tasks_of_its_message(
    cluster_factory: Any, settings: Settings
) -> None:
    # No scheduler: the lost-message sweep would republish the held tasks after ENQUEUE_TIMEOUT_SEC
    # and hide the hold-up this test is about.
    cluster = cluster_factory()
    workers = [cluster.start("worker", "--queues", "default") for _ in range(2)]
    for proc in workers:
        cluster.wait_worker_ready(proc)

    slow = new_task(name="demo_hang", payload={"sleep_sec": 10}, timeout_sec=60, max_retries=0)
    short = [new_task() for _ in range(19)]
    attempts = {item.id: item.attempt for item in dispatch_all()}
    items = [(task_id, attempts[task_id]) for task_id in [slow, *short]]
    broker.configure_celery(settings)
    broker.publish_message(items, queue="default", time_limit_sec=90)  # one message carries all 20

    wait_until(lambda: task_row(slow)["status"] == "STARTED", timeout=30, what="the slow task to start")
    # The slice is 1 s; the other worker then runs the 19 in well under a second, unless loaded.
    wait_until(
        lambda: [task_row(task_id)["status"] for task_id in short] == ["SUCCEEDED"] * 19,
        timeout=5,
        what="the 19 short tasks to succeed while the slow one runs",
    )
    assert task_row(slow)["status"] == "STARTED"


def _enqueued(task_id: uuid.UUID) -> list[tuple[uuid.UUID, int]]:
    (item,) = [item for item in dispatch_all() if item.id == task_id]
    return [(item.id, item.attempt)]


def test_a_worker_busy_with_a_task_leaves_the_next_message_to_an_idle_worker(
    cluster_factory: Any, settings: Settings
) -> None:
    # What the hand-off above relies on: the message it sends back reaches an idle worker rather
    # than waiting in the buffer of a worker whose only pool process is busy.
    cluster = cluster_factory()
    busy = cluster.start_worker("default")
    slow = new_task(name="demo_hang", payload={"sleep_sec": 30}, timeout_sec=60, max_retries=0)
    broker.configure_celery(settings)
    broker.publish_message(_enqueued(slow), queue="default", time_limit_sec=90)
    wait_until(lambda: task_row(slow)["status"] == "STARTED", timeout=30, what="the slow task to start")

    short = new_task()
    broker.publish_message(_enqueued(short), queue="default", time_limit_sec=90)
    cluster.start_worker("default")  # started after the message was published: the busy one had it first
    wait_until(lambda: task_row(short)["status"] == "SUCCEEDED", timeout=10, what="the idle worker to run it")
    assert task_row(slow)["status"] == "STARTED"
    busy.signal_group(signal.SIGKILL)  # rather than wait for the slow task at teardown
