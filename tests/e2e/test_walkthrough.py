"""The README's walkthroughs with real processes: api, scheduler and the four workers from the CLI."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.helpers import wait_until

pytestmark = pytest.mark.e2e


def create(cluster, **body) -> str:
    r = httpx.post(f"{cluster.url}/tasks", json=body, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def get(cluster, task_id: str) -> dict:
    r = httpx.get(f"{cluster.url}/tasks/{task_id}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def events(cluster, task_id: str) -> list[dict]:
    return httpx.get(f"{cluster.url}/tasks/{task_id}/events", timeout=10).json()


def wait_status(cluster, task_id: str, *statuses: str, timeout: float = 30) -> dict:
    return wait_until(
        lambda: (t := get(cluster, task_id))["status"] in statuses and t,
        timeout=timeout,
        what=f"task {task_id} to reach {statuses}",
    )


@pytest.fixture
def cluster(cluster_factory):
    c = cluster_factory()
    c.start_all()
    return c


def test_task_waits_for_run_at_then_succeeds_on_the_high_queue(cluster):
    run_at = datetime.now(UTC) + timedelta(seconds=3)
    task_id = create(cluster, name="demo_ok", payload={"msg": "hello"}, priority=9, run_at=run_at.isoformat())
    # Until just before run_at it stays PENDING, however often we look.
    while datetime.now(UTC) < run_at - timedelta(seconds=0.5):
        assert get(cluster, task_id)["status"] == "PENDING"
        time.sleep(0.1)
    task = wait_status(cluster, task_id, "SUCCEEDED", timeout=20)
    assert task["queue"] == "high" and task["attempt"] == 1 and task["result"] == {"msg": "hello"}
    assert datetime.fromisoformat(task["started_at"]) >= run_at
    history = events(cluster, task_id)
    assert [e["to_status"] for e in history] == ["PENDING", "ENQUEUED", "STARTED", "SUCCEEDED"]
    assert history[2]["detail"].startswith("high-"), "claimed by the high worker"


def test_failing_task_retries_once_then_dead_with_one_dlq_row(cluster):
    task_id = create(cluster, name="demo_fail", payload={"fail": True}, priority=5, max_retries=1)
    task = wait_status(cluster, task_id, "DEAD")
    assert task["attempt"] == 2 and "asked to fail" in task["last_error"]
    dlq = wait_until(
        lambda: [e for e in httpx.get(f"{cluster.url}/dlq").json() if e["task_id"] == task_id],
        timeout=20,
        what="the dlq_events row",
    )
    assert len(dlq) == 1 and dlq[0]["reason"] == "max_retries_exceeded" and dlq[0]["attempt"] == 2
    assert [e["to_status"] for e in events(cluster, task_id)] == [
        "PENDING", "ENQUEUED", "STARTED", "FAILED", "ENQUEUED", "STARTED", "DEAD",
    ]  # fmt: skip


def test_flaky_task_recovers(cluster):
    task_id = create(cluster, name="demo_flaky", payload={"failures": 1}, priority=2)
    task = wait_status(cluster, task_id, "SUCCEEDED")
    assert task["queue"] == "low" and task["attempt"] == 2
    assert task["result"] == {"succeeded_on_attempt": 2}
    assert "FAILED" in [e["to_status"] for e in events(cluster, task_id)]


def test_hung_task_on_a_killed_worker_is_rescued(cluster):
    task_id = create(cluster, name="demo_hang", payload={"sleep_sec": 9999}, priority=5, max_retries=1)
    wait_status(cluster, task_id, "STARTED")
    (default_worker,) = [p for p in cluster.procs if p.name == "worker-default"]
    default_worker.signal_group(signal.SIGKILL)
    default_worker.popen.wait(10)

    # The sweep notices the silent heartbeat and schedules attempt 2 ...
    wait_until(
        lambda: any(e["from_status"] == "STARTED" and e["to_status"] == "FAILED" for e in events(cluster, task_id)),
        timeout=30,
        what="the stuck sweep to retry the task",
    )
    # ... which a fresh worker picks up; it hangs again and its timeout ends it in the DLQ.
    cluster.start_worker("default")
    task = wait_status(cluster, task_id, "DEAD", timeout=60)
    assert task["attempt"] == 2
    dlq = wait_until(
        lambda: [e for e in httpx.get(f"{cluster.url}/dlq").json() if e["task_id"] == task_id],
        timeout=20,
        what="the dlq_events row",
    )
    assert [(e["reason"], e["attempt"]) for e in dlq] == [("stuck_task_timeout", 2)]
    first_failure = next(e for e in events(cluster, task_id) if e["to_status"] == "FAILED")
    assert "no heartbeat" in first_failure["detail"]
