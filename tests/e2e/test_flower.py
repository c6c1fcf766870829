"""Celery's own tools against our workers, as the README's "Using Flower" runs them: the app that
`celery -A taskscheduler` finds talks to REDIS_URL alone, and Flower lists the workers and the tasks
that ran, under their handler names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskscheduler.broker import configure_celery
from taskscheduler.config import Settings
from tests.e2e.conftest import Proc
from tests.helpers import free_port, new_task, task_row, wait_until

pytestmark = pytest.mark.e2e

CELERY = shutil.which("celery", path=str(Path(sys.executable).parent)) or "celery"
FLOWER_AUTH = ("flower", "secret")


def broker_env(cluster: Any) -> dict[str, str]:
    """The environment of a shell with REDIS_URL (and the run's REDIS_KEY_PREFIX) only: no
    DATABASE_URL, no other setting of ours."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["REDIS_URL"] = cluster.services.redis_url
    env["REDIS_KEY_PREFIX"] = cluster.services.redis_key_prefix
    return env


def start_flower(cluster: Any, port: int) -> Proc:
    argv = [CELERY, "-A", "taskscheduler", "flower", f"--port={port}", "--address=127.0.0.1",
            f"--basic-auth={':'.join(FLOWER_AUTH)}"]  # fmt: skip
    return cluster.start_process("flower", argv, env=broker_env(cluster), cwd=cluster.tmp)  # stopped with the cluster


def flower_get(port: int, path: str, **params: Any) -> Any:
    response = httpx.get(f"http://127.0.0.1:{port}{path}", params=params, auth=FLOWER_AUTH, timeout=10)
    response.raise_for_status()
    return response.json()


def _get_or_none(port: int, path: str, **params: Any) -> Any:
    try:
        return flower_get(port, path, **params)
    except httpx.HTTPError:
        return None


def test_flower_lists_the_worker_and_the_tasks_that_ran_under_their_handler_names(cluster_factory: Any) -> None:
    cluster = cluster_factory(TASK_EVENTS="true")
    cluster.start("scheduler")
    worker = cluster.start_worker("default")
    port = free_port()
    flower = start_flower(cluster, port)

    def worker_online() -> bool:
        assert flower.popen.poll() is None, flower.log()
        # status=true reads Flower's event state: the worker is alive there once its heartbeats
        # reach Flower, so Flower's event receiver is up before the tasks run.
        status = _get_or_none(port, "/api/workers", status="true") or {}
        return any(name.startswith("default-") and alive for name, alive in status.items())

    wait_until(worker_online, timeout=90, what="Flower to see the worker's heartbeats")
    workers = flower_get(port, "/api/workers", refresh="true")  # over the broker: `inspect`
    (name,) = [name for name in workers if name.startswith("default-")]
    assert workers[name]["stats"]["broker"]["transport"] == "redis"

    ok = new_task(name="demo_ok", payload={"n": 1})
    failing = new_task(name="demo_fail", payload={"fail": True}, max_retries=0)
    wait_until(lambda: task_row(ok)["status"] == "SUCCEEDED", timeout=60, what="demo_ok to succeed")
    wait_until(lambda: task_row(failing)["status"] == "DEAD", timeout=60, what="demo_fail to die")

    def flower_tasks() -> dict[str, str]:
        tasks = _get_or_none(port, "/api/tasks") or {}
        return {task["name"]: task["state"] for task in tasks.values() if task.get("worker") == name}

    # The message succeeds even when its task fails: the failure is the task's, recorded in PostgreSQL.
    wait_until(
        lambda: flower_tasks() == {"demo_ok": "SUCCESS", "demo_fail": "SUCCESS"},
        timeout=30,
        what=f"Flower to list both tasks under their handler names (has {flower_tasks()})",
    )
    # The message's arguments still name the task and its attempt, to find it in the API.
    tasks = flower_get(port, "/api/tasks")
    assert any(str(ok) in task["args"] for task in tasks.values() if task["name"] == "demo_ok")
    assert worker.popen.poll() is None

    ping = subprocess.run(
        [CELERY, "-A", "taskscheduler", "inspect", "ping", f"--destination={name}", "--timeout=10"],
        env=broker_env(cluster),
        cwd=cluster.tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "pong" in ping.stdout


def test_a_worker_with_task_events_sends_heartbeats(cluster_factory: Any, settings: Settings) -> None:
    # Without them a monitor sees the worker only through its task events, and Flower shows it
    # offline two minutes after its last task.
    cluster = cluster_factory(TASK_EVENTS="true")
    cluster.start_worker("default")
    app = configure_celery(settings)
    seen: list[dict[str, Any]] = []

    def on_heartbeat(event: dict[str, Any]) -> None:
        seen.append(event)
        receiver.should_stop = True

    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"worker-heartbeat": on_heartbeat})
        receiver.capture(limit=None, timeout=30, wakeup=False)
    assert seen and seen[0]["hostname"].startswith("default-")


def test_celery_report_shows_the_redis_transport_with_redis_url_alone(cluster_factory: Any) -> None:
    cluster = cluster_factory()
    report = subprocess.run(
        [CELERY, "-A", "taskscheduler", "report"],
        env=broker_env(cluster),
        cwd=cluster.tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    assert "transport:redis" in report.stdout


def test_celery_a_taskscheduler_without_redis_url_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    report = subprocess.run(
        [CELERY, "-A", "taskscheduler", "report"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert report.returncode != 0
    assert "REDIS_URL not set" in report.stderr
    assert "amqp" not in report.stdout
