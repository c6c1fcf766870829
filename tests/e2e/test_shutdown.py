"""Graceful shutdown, `taskscheduler check`, and the scheduler's and workers' metrics, with real processes."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import CLI, free_port
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e


def create(cluster: Any, headers: dict[str, str] | None = None, **body: Any) -> str:
    response = httpx.post(f"{cluster.url}/tasks", json=body, headers=headers, timeout=10)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def get(cluster: Any, task_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = httpx.get(f"{cluster.url}/tasks/{task_id}", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_status(cluster: Any, task_id: str, *statuses: str, timeout: float = 30, **kw: Any) -> dict[str, Any]:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (t := get(cluster, task_id, **kw))["status"] in statuses and t,
        timeout=timeout,
        what=f"task {task_id} to reach {statuses}",
    )


def check(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "check", *args], env=cluster.env, capture_output=True, text=True, timeout=60, check=False
    )


def test_sigterm_during_a_3s_task_lets_it_finish_succeeded(cluster_factory: Any) -> None:
    cluster = cluster_factory()
    cluster.start_api()
    cluster.start("scheduler")
    worker = cluster.start_worker("default")

    running = create(cluster, name="demo_hang", payload={"sleep_sec": 3}, priority=5, max_retries=0)
    wait_status(cluster, running, "STARTED")
    waiting = create(cluster, name="demo_ok", priority=5)
    wait_status(cluster, waiting, "ENQUEUED")

    worker.popen.send_signal(signal.SIGTERM)  # the worker's main process only, as `docker stop` does
    sent = time.monotonic()
    assert worker.popen.wait(timeout=30) == 0, worker.log()
    assert time.monotonic() - sent < 20

    task = get(cluster, running)
    assert task["status"] == "SUCCEEDED", (task, worker.log())
    assert task["result"] == {"slept_sec": 3.0} and task["attempt"] == 1
    assert "warm shutdown" in worker.log().lower()
    # It took no new task while shutting down; the next worker runs the one left waiting.
    assert get(cluster, waiting)["status"] == "ENQUEUED"
    cluster.start_worker("default")
    assert wait_status(cluster, waiting, "SUCCEEDED")["attempt"] == 1


def test_check_follows_the_processes(cluster_factory: Any) -> None:
    cluster = cluster_factory(PROCESS_HEARTBEAT_SEC="0.5")
    for role in ("scheduler", "worker", "api"):
        result = check(cluster, role)
        assert result.returncode == 1 and f"no {role}" in result.stderr, result.stderr

    api = cluster.start_api()
    scheduler = cluster.start("scheduler")
    worker = cluster.start_worker("low")
    for args in (("api",), ("scheduler",), ("worker",), ("worker", "--queue", "low")):
        wait_until(lambda args=args: check(cluster, *args).returncode == 0, timeout=30, what=f"check {args}")
    ok = check(cluster, "worker", "--queue", "low")
    assert ok.stdout.startswith("ok: worker pid") and not ok.stderr
    assert check(cluster, "worker", "--queue", "high").returncode == 1

    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(timeout=30) == 0
    assert check(cluster, "worker").returncode == 1, "a worker that stopped is not healthy"
    scheduler.popen.send_signal(signal.SIGTERM)  # finishes its batch and exits
    assert scheduler.popen.wait(timeout=15) == 0, scheduler.log()
    assert "scheduler stopped" in scheduler.log()
    assert check(cluster, "scheduler").returncode == 1
    api.popen.send_signal(signal.SIGTERM)
    api.popen.wait(timeout=15)
    assert check(cluster, "api").returncode == 1


def _scrape(port: int, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=5)


def _value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_the_scheduler_and_the_workers_pool_processes_report_their_metrics(cluster_factory: Any) -> None:
    key = "e2e-metrics-key"
    auth = {"Authorization": f"Bearer {key}"}
    cluster = cluster_factory(API_KEYS=key)
    scheduler_port, worker_port = free_port(), free_port()
    cluster.start_api()
    cluster.start("scheduler", env={"METRICS_PORT": str(scheduler_port)})
    worker = cluster.start("worker", "--queues", "high", "--concurrency", "2", env={"METRICS_PORT": str(worker_port)})
    cluster.wait_worker_ready(worker)

    ids = [create(cluster, headers=auth, name="demo_ok", priority=9) for _ in range(4)]
    for task_id in ids:
        wait_status(cluster, task_id, "SUCCEEDED", headers=auth)

    assert _scrape(worker_port, None).status_code == 401
    assert _scrape(scheduler_port, "wrong").status_code == 401
    worker_text = _scrape(worker_port, key).text
    done = {"from_status": "STARTED", "to_status": "SUCCEEDED", "queue": "high"}
    assert _value(worker_text, "taskscheduler_task_transitions_total", **done) == 4, worker_text
    assert _value(worker_text, "taskscheduler_dispatch_lag_seconds_count", queue="high") == 4
    assert _value(worker_text, "taskscheduler_run_time_seconds_count", queue="high", outcome="succeeded") == 4
    scheduler_text = _scrape(scheduler_port, key).text
    enqueued = {"from_status": "PENDING", "to_status": "ENQUEUED", "queue": "high"}
    assert _value(scheduler_text, "taskscheduler_task_transitions_total", **enqueued) == 4
    api_text = httpx.get(f"{cluster.url}/metrics", headers=auth, timeout=5).text
    assert _value(api_text, "taskscheduler_tasks_created_total", queue="high") == 4
    assert _value(api_text, "taskscheduler_tasks_current", status="SUCCEEDED", queue="high") == 4
