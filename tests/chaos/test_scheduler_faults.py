"""The scheduler: killed between commit and publish, running twice, with a wrong clock; jittered retries."""

from __future__ import annotations

import statistics
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from taskscheduler.scheduler.dispatch import FAULT_AFTER_COMMIT
from taskscheduler.store import db
from tests.chaos.conftest import assert_invariants, settle
from tests.conftest import REQUIRE_SERVICES
from tests.harness import insert_tasks
from tests.helpers import backdate, new_task, task_row, to_started, wait_until


def test_scheduler_killed_between_commit_and_publish_loses_nothing(clean_db, make_cluster, tmp_path: Path):
    runs = tmp_path / "runs"
    insert_tasks(clean_db.database_url, 50, name="chaos_record", payload=f'{{"path": "{runs}"}}')
    cluster = make_cluster(clean_db)
    cluster.start_worker("default")
    doomed = cluster.start("scheduler", env={"FAULT_POINT": FAULT_AFTER_COMMIT})
    assert doomed.popen.wait(60) == 17, doomed.log()
    with db.transaction(clean_db.database_url) as conn:
        stranded = conn.execute(text("SELECT count(*) FROM tasks WHERE status = 'ENQUEUED'")).scalar_one()
    assert stranded == 50  # committed as ENQUEUED, never published

    cluster.start("scheduler")  # the lost-message sweep publishes them again, same attempt
    counts = settle(clean_db.database_url, timeout=90)
    assert counts == {"SUCCEEDED": 50}
    assert len(runs.read_text().splitlines()) == 50  # each ran exactly once
    with db.transaction(clean_db.database_url) as conn:
        assert conn.execute(text("SELECT max(attempt) FROM tasks")).scalar_one() == 1
    assert_invariants(clean_db.database_url)


def test_two_schedulers_claim_each_task_attempt_once(clean_db, make_cluster):
    insert_tasks(clean_db.database_url, 2000)
    # A long enqueue timeout: the backlog takes longer to drain than the default test setting, and
    # we want to see the dispatch race alone, not lost-message re-publishing.
    cluster = make_cluster(clean_db, ENQUEUE_TIMEOUT_SEC="300", DISPATCH_BATCH_SIZE="100")
    schedulers = [cluster.start("scheduler"), cluster.start("scheduler")]
    for _ in range(2):
        cluster.start("worker", "--queues", "default")
    counts = settle(clean_db.database_url, timeout=240)
    assert counts == {"SUCCEEDED": 2000}
    with db.transaction(clean_db.database_url) as conn:
        per_attempt = conn.execute(
            text(
                "SELECT count(*) FROM task_events WHERE to_status = 'ENQUEUED'"
                " GROUP BY task_id, attempt HAVING count(*) > 1"
            )
        ).all()
        attempts = conn.execute(text("SELECT DISTINCT attempt FROM tasks")).scalars().all()
    assert per_attempt == [] and attempts == [1]
    dispatched = [p.log().count("-> ENQUEUED") for p in schedulers]
    assert sum(dispatched) == 2000 and all(dispatched), dispatched
    assert_invariants(clean_db.database_url)


@pytest.mark.skipif(
    not Path("/usr/bin/faketime").exists() and not REQUIRE_SERVICES,
    reason="faketime not installed (apt-get install faketime; .ci/run installs it)",
)
def test_a_scheduler_clock_an_hour_ahead_runs_nothing_early(clean_db, make_cluster):
    assert subprocess.run(["faketime", "-f", "+1h", "true"], check=False).returncode == 0
    running = new_task(max_retries=0)
    to_started(running)  # (dispatches every task due within a day: do it before the next one exists)
    backdate(running, started_at=timedelta(seconds=1))
    future = new_task(run_at=datetime.now(UTC) + timedelta(seconds=4))
    cluster = make_cluster(clean_db, HEARTBEAT_TIMEOUT_SEC="30", STUCK_AFTER_SEC="30")
    cluster.start_worker("default")
    # The scheduler's host clock is an hour ahead; every decision it makes uses the database's.
    # Only the wall clock is off (as with a wrong NTP setting): libfaketime's fake monotonic clock
    # would also hang every timed wait, which no real host does.
    skewed = cluster.start_with_prefix(
        ["faketime", "-f", "+1h"], "scheduler", env={"FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    )
    wait_until(lambda: "scheduler started" in skewed.log(), timeout=60, what="the skewed scheduler")

    done = wait_until(
        lambda: (t := task_row(future))["status"] == "SUCCEEDED" and t, timeout=60, what="the future task to run"
    )
    with db.transaction(clean_db.database_url) as conn:
        enqueued_at = conn.execute(
            text("SELECT at FROM task_events WHERE task_id = :id AND to_status = 'ENQUEUED'"), {"id": future}
        ).scalar_one()
    assert enqueued_at >= done["run_at"], "dispatched before its run_at"
    # The running task (fresh heartbeat, 30 s limit) was not swept by the skewed clock.
    assert task_row(running)["status"] == "STARTED"


def test_retries_of_many_failing_tasks_are_spread_out(clean_db, make_cluster):
    insert_tasks(clean_db.database_url, 200, name="demo_flaky", payload='{"failures": 1}')
    cluster = make_cluster(clean_db, RETRY_BACKOFF_BASE_SEC="4", RETRY_BACKOFF_MAX_SEC="4")
    cluster.start("scheduler")
    for queue in ("default", "default"):
        cluster.start("worker", "--queues", queue)
    settle(clean_db.database_url, timeout=120)
    with db.transaction(clean_db.database_url) as conn:
        delays = (
            conn.execute(
                text(
                    "SELECT extract(epoch FROM t.run_at - e.at) FROM tasks t"
                    " JOIN task_events e ON e.task_id = t.id AND e.to_status = 'FAILED'"
                )
            )
            .scalars()
            .all()
        )
    delays = [float(d) for d in delays]
    assert len(delays) == 200
    # Full jitter: uniform over [0, 4 s], not everyone at once.
    assert min(delays) >= -0.01 and max(delays) <= 4.01
    assert statistics.pstdev(delays) > 0.8
    buckets = [0] * 8
    for d in delays:
        buckets[min(7, int(d / 0.5))] += 1
    assert max(buckets) < 60, buckets  # no half-second window holds more than 30% of the retries
    assert_invariants(clean_db.database_url)
