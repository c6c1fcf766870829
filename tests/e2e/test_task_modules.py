"""TASK_MODULES is imported from the working directory by every role, as `celery -A` and `python -m` do."""

from __future__ import annotations

import textwrap
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import CLI, Cluster, Proc
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e

HANDLERS = """
import os

from taskscheduler.handlers import task


@task("myapp_echo")
def echo(payload: dict) -> dict:
    return {"echo": payload, "pid": os.getpid()}
"""


def _start_in(cluster: Cluster, cwd: Path, *args: str) -> Proc:
    env = {**cluster.env, "TASK_MODULES": "myapp.tasks"}
    return cluster.start_process("-".join(args), [CLI, *args], env=env, cwd=cwd)  # stopped by the fixture


def test_roles_import_task_modules_from_the_working_directory(cluster_factory: type[Cluster], tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "myapp").mkdir(parents=True)
    (project / "myapp" / "__init__.py").write_text("")
    (project / "myapp" / "tasks.py").write_text(textwrap.dedent(HANDLERS))
    cluster = cluster_factory()
    api = _start_in(cluster, project, "api")
    _start_in(cluster, project, "scheduler")
    worker = _start_in(cluster, project, "worker", "--queues", "default", "--concurrency", "2")
    wait_until(lambda: cluster._api_up() or api.popen.poll() is not None, timeout=90, what="the API in the project dir")
    assert api.popen.poll() is None, api.log()
    Cluster.wait_worker_ready(worker)

    created = httpx.post(f"{cluster.url}/tasks", json={"name": "myapp_echo", "payload": {"n": 1}}, timeout=10)
    assert created.status_code == 201, created.text  # the API knows the handler
    task_id = created.json()["id"]

    def finished() -> dict | None:
        task = httpx.get(f"{cluster.url}/tasks/{task_id}", timeout=10).json()
        return task if task["status"] in ("SUCCEEDED", "FAILED", "DEAD") else None

    task = wait_until(finished, timeout=60, what="the task to finish")
    assert task["status"] == "SUCCEEDED", task  # a pool process (forked after the import) ran it
    assert task["result"]["echo"] == {"n": 1}
    pool_pid = task["result"]["pid"]
    assert pool_pid != worker.popen.pid
    started = [
        e for e in httpx.get(f"{cluster.url}/tasks/{task_id}/events", timeout=10).json() if e["to_status"] == "STARTED"
    ]
    # The STARTED event names the worker and the pool process that ran the task (README, walkthrough B).
    assert started[0]["detail"].startswith(f"default-{worker.popen.pid}@") and started[0]["detail"].endswith(
        f" pid {pool_pid}"
    )
