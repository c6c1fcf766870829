"""Overlap policies with real processes: a 3 s task on a 1 s schedule, run by a scheduler and a worker
with room for several tasks at once."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise
from typing import Any

import pytest
from sqlalchemy import text

from taskscheduler.store import db
from taskscheduler.store import schedules as schedule_store
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e
TASK_SEC = 3


def finished_tasks(url: str, schedule_id: Any) -> list[dict[str, Any]]:
    with db.transaction(url) as conn:
        return [
            dict(r)
            for r in conn.execute(
                text(
                    "SELECT scheduled_for, created_at, started_at, finished_at, status FROM tasks"
                    " WHERE schedule_id = :id ORDER BY scheduled_for"
                ),
                {"id": schedule_id},
            ).mappings()
        ]


@pytest.mark.parametrize("overlap", ["skip", "buffer_one", "allow"])
def test_overlap_policies_with_a_task_longer_than_the_period(cluster_factory, overlap):
    cluster = cluster_factory(WORKER_CONCURRENCY="4")
    url = cluster.services.database_url
    with db.transaction(url) as conn:
        schedule = schedule_store.create_schedule(
            conn,
            {"name": "slow", "task": "demo_hang", "payload": {"sleep_sec": TASK_SEC}, "every_sec": 1,
             "overlap": overlap, "max_retries": 0},
        )  # fmt: skip
    cluster.start_worker("default")
    cluster.start("scheduler")

    def three_finished() -> bool:
        return sum(t["status"] == "SUCCEEDED" for t in finished_tasks(url, schedule["id"])) >= 3

    wait_until(three_finished, timeout=90, interval=0.25, what="three tasks of the schedule to finish")
    with db.transaction(url) as conn:
        conn.execute(text("UPDATE schedules SET paused = true"))
    tasks = finished_tasks(url, schedule["id"])
    with db.transaction(url) as conn:
        row = schedule_store.get_schedule(conn, schedule["id"])
    assert row is not None
    done = [t for t in tasks if t["finished_at"] is not None]

    if overlap == "allow":
        # A task per fire time, every second, whatever runs: several run at once.
        assert all(b["scheduled_for"] - a["scheduled_for"] == timedelta(seconds=1) for a, b in pairwise(tasks))
        assert len(tasks) > len(done)
        assert any(b["started_at"] < a["finished_at"] for a, b in pairwise(done)), done
        assert row["skips"] == 0
        return
    # skip and buffer_one: a task is created only once the one before has finished.
    assert all(b["created_at"] >= a["finished_at"] for a, b in pairwise(tasks)), tasks
    assert row["skips"] >= 2 * (len(done) - 1), dict(row)
    gaps = [b["scheduled_for"] - a["finished_at"] for a, b in pairwise(done)]
    if overlap == "skip":
        # The next fire time after the previous task finished.
        assert all(timedelta(0) <= g <= timedelta(seconds=2) for g in gaps), gaps
    else:
        # The one fire that waited, made when the previous task finished: its fire time is older.
        assert all(g < timedelta(0) for g in gaps), gaps
