"""Recurring schedules with several schedulers, one of them SIGKILLed at its fire times between the
insert of a fire's task and the advance of its schedule: still exactly one task per fire time."""

from __future__ import annotations

import subprocess
import time
from datetime import timedelta
from itertools import pairwise

from sqlalchemy import text

from taskscheduler.scheduler.schedules import FAULT_AFTER_INSERT
from taskscheduler.store import db
from taskscheduler.store import schedules as schedule_store

RUN_SEC = 30.0


def test_two_schedulers_one_killed_between_insert_and_advance_make_one_task_per_fire_time(clean_db, make_cluster):
    url = clean_db.database_url
    with db.transaction(url) as conn:
        schedule = schedule_store.create_schedule(
            conn, {"name": "every-second", "task": "demo_ok", "every_sec": 1, "overlap": "allow"}
        )
    cluster = make_cluster(clean_db)
    cluster.start("scheduler")
    doomed = cluster.start("scheduler", env={"FAULT_POINT": FAULT_AFTER_INSERT})
    kills = 0
    deadline = time.monotonic() + RUN_SEC
    while (left := deadline - time.monotonic()) > 0:
        try:
            code = doomed.popen.wait(timeout=left)
        except subprocess.TimeoutExpired:
            break
        assert code == -9, doomed.log()  # SIGKILLed at the fault point, nothing else
        kills += 1
        doomed = cluster.start("scheduler", env={"FAULT_POINT": FAULT_AFTER_INSERT})
    cluster.stop_all()

    with db.transaction(url) as conn:
        times = list(
            conn.execute(
                text("SELECT scheduled_for FROM tasks WHERE schedule_id = :id ORDER BY scheduled_for"),
                {"id": schedule["id"]},
            ).scalars()
        )
        row = schedule_store.get_schedule(conn, schedule["id"])
    assert row is not None
    print(f"fire times: {len(times)}, tasks: {len(times)}, kills: {kills}, misses: {row['misses']}")
    assert kills >= 2, "the doomed scheduler never reached its fault point often enough"
    assert len(times) >= RUN_SEC - 5
    # One task per fire time (the unique index would refuse a second), and none missing between the
    # first and the last: each fire lost with a killed scheduler was made by the other one.
    assert len(set(times)) == len(times)
    assert all(b - a == timedelta(seconds=1) for a, b in pairwise(times)), times
    assert times[0] == schedule["next_fire_at"]
    assert (row["misses"], row["skips"], row["fires"]) == (0, 0, len(times))
