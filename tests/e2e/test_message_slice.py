"""A message of several tasks, with real worker processes: a slow task does not hold up the rest."""

from __future__ import annotations

from typing import Any

import pytest

from taskscheduler import worker
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
    worker.configure_celery(settings)
    worker._publish_message(items, queue="default", time_limit_sec=90)  # one message carries all 20

    wait_until(lambda: task_row(slow)["status"] == "STARTED", timeout=30, what="the slow task to start")
    # The slice is 1 s; the other worker then runs the 19 in well under a second, unless loaded.
    wait_until(
        lambda: [task_row(task_id)["status"] for task_id in short] == ["SUCCEEDED"] * 19,
        timeout=5,
        what="the 19 short tasks to succeed while the slow one runs",
    )
    assert task_row(slow)["status"] == "STARTED"
