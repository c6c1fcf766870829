"""The CLI for people (submit, status, list, retry, cancel against a real API over HTTP) and `check <role>`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from tests.harness import CLI, start_process, stop_group
from tests.helpers import cli_run as run
from tests.helpers import free_port, one_line_error, task_row, to_dead, wait_until

from taskscheduler.api import create_app
from taskscheduler.config import Settings, get_settings
from taskscheduler.liveness import ProcessHeartbeat
from taskscheduler.store import db

pytestmark = pytest.mark.usefixtures("restore_logging")


# --- submit, status, list, cancel, retry -----------------------------------------------------------------------


def test_submit_then_status(live_api: Any) -> None:
    result = run("submit", "demo_ok", "--payload", '{"msg": "hi"}', "--priority", "9", "--url", live_api.url)
    assert result.exit_code == 0, result.output
    task_id = result.stdout.strip().splitlines()[0]
    row = task_row(uuid.UUID(task_id))
    assert row["payload"] == {"msg": "hi"} and row["priority"] == 9 and row["queue"] == "high"

    shown = run("status", task_id, "--url", live_api.url)
    assert shown.exit_code == 0, shown.output
    assert task_id in shown.output and "PENDING" in shown.output and '{"msg": "hi"}' in shown.output
    assert "created" in shown.output  # the first event's detail


def test_submit_in_and_at(live_api: Any) -> None:
    before = datetime.now(UTC)
    later = run("submit", "demo_ok", "--in", "1h30m", "--max-retries", "0", "--url", live_api.url)
    assert later.exit_code == 0, later.output
    row = task_row(uuid.UUID(later.stdout.split()[0]))
    assert abs((row["run_at"] - before - timedelta(minutes=90)).total_seconds()) < 10
    assert row["max_retries"] == 0
    at = run("submit", "demo_ok", "--at", "2030-01-01T12:00:00+02:00", "--url", live_api.url)
    assert at.exit_code == 0, at.output
    assert task_row(uuid.UUID(at.stdout.split()[0]))["run_at"] == datetime(2030, 1, 1, 10, tzinfo=UTC)


def test_submit_with_an_idempotency_key_twice_is_one_task(live_api: Any) -> None:
    args = ("submit", "demo_ok", "--idempotency-key", "cli-1", "--url", live_api.url)
    first, second = run(*args), run(*args)
    assert first.exit_code == second.exit_code == 0
    assert first.stdout.split()[0] == second.stdout.split()[0]


def test_list_cancel_retry(live_api: Any) -> None:
    ids = [run("submit", "demo_ok", "--in", "1h", "--url", live_api.url).stdout.split()[0] for _ in range(3)]
    listed = run("list", "--status", "PENDING", "--url", live_api.url)
    assert listed.exit_code == 0, listed.output
    assert all(task_id in listed.output for task_id in ids)

    cancelled = run("cancel", ids[0], "--url", live_api.url)
    assert cancelled.exit_code == 0 and "CANCELLED" in cancelled.output
    only_cancelled = run("list", "--status", "cancelled", "--url", live_api.url)
    assert ids[0] in only_cancelled.output and ids[1] not in only_cancelled.output

    retried = run("retry", ids[0], "--url", live_api.url)
    assert retried.exit_code == 0 and "PENDING" in retried.output
    assert task_row(uuid.UUID(ids[0]))["status"] == "PENDING"

    page = run("list", "--limit", "2", "--url", live_api.url)
    assert "more: --cursor" in page.output
    cursor = page.output.split("--cursor", 1)[1].split()[0]
    rest = run("list", "--limit", "2", "--cursor", cursor, "--url", live_api.url)
    assert rest.exit_code == 0 and "more:" not in rest.output
    shown = [i for i in ids if i in page.output or i in rest.output]
    assert sorted(shown) == sorted(ids)


def test_list_dead_by_name(live_api: Any, settings: Settings) -> None:
    dead = uuid.UUID(run("submit", "demo_fail", "--url", live_api.url).stdout.split()[0])
    to_dead(dead)
    listed = run("list", "--status", "DEAD", "--name", "demo_fail", "--url", live_api.url)
    assert str(dead) in listed.output and "DEAD" in listed.output
    assert "no tasks" in run("list", "--status", "DEAD", "--name", "demo_ok", "--url", live_api.url).output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("submit", "demo_ok", "--payload", "{nope"), "not valid JSON", id="payload-not-json"),
        pytest.param(("submit", "demo_ok", "--payload", "[1]"), "JSON object", id="payload-not-object"),
        pytest.param(("submit", "demo_ok", "--in", "soon"), "invalid duration", id="in-garbage"),
        pytest.param(("submit", "demo_ok", "--in", "1s", "--at", "2030-01-01T00:00:00Z"), "not both", id="in-and-at"),
        pytest.param(("submit", "demo_ok", "--at", "2030-01-01T00:00:00"), "no UTC offset", id="at-naive"),
        pytest.param(("submit", "demo_ok", "--at", "new year"), "not an ISO 8601", id="at-garbage"),
        pytest.param(("status", "not-a-uuid"), "not a task id", id="status-bad-id"),
        pytest.param(("cancel", "42"), "not a task id", id="cancel-bad-id"),
        pytest.param(("list", "--status", "BURIED"), "unknown status", id="list-bad-status"),
    ],
)
def test_bad_input_is_one_clear_line(live_api: Any, args: tuple[str, ...], message: str) -> None:
    line = one_line_error(run(*args, "--url", live_api.url), 2)
    assert message in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("submit", "no_such_handler"), "HTTP 422: name: unknown task name", id="unknown-name"),
        pytest.param(("submit", "demo_ok", "--at", "2001-01-01T00:00:00Z"), "run_at is in the past", id="past"),
        pytest.param(("status", str(uuid.UUID(int=1))), "HTTP 404", id="status-unknown"),
        pytest.param(("retry", str(uuid.UUID(int=1))), "HTTP 404", id="retry-unknown"),
    ],
)
def test_http_errors_are_one_clear_line(live_api: Any, args: tuple[str, ...], message: str) -> None:
    assert message in one_line_error(run(*args, "--url", live_api.url), 1)


def test_conflicts_are_one_clear_line(live_api: Any) -> None:
    task_id = run("submit", "demo_ok", "--url", live_api.url).stdout.split()[0]
    line = one_line_error(run("retry", task_id, "--url", live_api.url), 1)
    assert "HTTP 409" in line and "PENDING" in line


def test_an_unreachable_api(settings: Settings) -> None:
    port = free_port()  # nothing listens there
    line = one_line_error(run("list", "--url", f"http://127.0.0.1:{port}"), 1)
    assert "cannot reach the API" in line


def test_api_keys(live_api_factory: Callable[..., Any]) -> None:
    api = live_api_factory(api_keys="cli-key")
    line = one_line_error(run("list", "--url", api.url), 1)
    assert "HTTP 401" in line and "--api-key" in line
    assert "cli-key" not in line
    assert run("list", "--url", api.url, "--api-key", "cli-key").exit_code == 0
    assert run("list", env={"TASKSCHEDULER_URL": api.url, "TASKSCHEDULER_API_KEY": "cli-key"}).exit_code == 0
    submitted = run("submit", "demo_ok", "--url", api.url, "--api-key", "cli-key")
    assert submitted.exit_code == 0, submitted.output


# --- check <role> ---------------------------------------------------------------------------------------------


def _age(process_id: str, seconds: float) -> None:
    with db.transaction() as conn:
        conn.execute(
            text("UPDATE process_heartbeats SET seen_at = now() - make_interval(secs => :s) WHERE id = :id"),
            {"s": seconds, "id": process_id},
        )


def test_check_follows_the_heartbeat(settings: Settings) -> None:
    result = run("check", "scheduler")
    assert result.exit_code == 1 and "no scheduler" in result.output
    heartbeat = ProcessHeartbeat("scheduler", interval_sec=settings.process_heartbeat_sec, database=db.database_for())
    assert heartbeat.beat()
    result = run("check", "scheduler")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: scheduler pid")
    _age(heartbeat.process_id, 3 * settings.process_heartbeat_sec + 1)
    stale = run("check", "scheduler")
    assert stale.exit_code == 1 and "old" in stale.output
    assert run("check", "scheduler", "--max-age", "3600").exit_code == 0
    assert heartbeat.beat()
    assert run("check", "scheduler").exit_code == 0
    heartbeat.stop()  # a clean stop deletes the row: unhealthy at once
    assert run("check", "scheduler").exit_code == 1
    assert run("check", "api").exit_code == 1, "another role's heartbeat does not count"


def test_check_worker_by_queue_and_host(settings: Settings) -> None:
    ProcessHeartbeat("worker", interval_sec=10, detail="high", database=db.database_for()).beat()
    assert run("check", "worker").exit_code == 0
    assert run("check", "worker", "--queue", "high").exit_code == 0
    assert run("check", "worker", "--queue", "low").exit_code == 1
    with db.transaction() as conn:
        conn.execute(text("UPDATE process_heartbeats SET hostname = 'elsewhere'"))
    assert run("check", "worker").exit_code == 1, "a process on another host does not count"
    assert run("check", "worker", "--any-host").exit_code == 0


def test_check_without_a_database(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{port}/nowhere")
    get_settings.cache_clear()
    result = run("check", "worker")
    assert result.exit_code == 1 and "cannot read the heartbeats from the database" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_api_heartbeats_while_it_runs(settings: Settings) -> None:
    with TestClient(create_app(settings)):
        assert run("check", "api").exit_code == 0
    assert run("check", "api").exit_code == 1


def test_check_rejects_unknown_roles(settings: Settings) -> None:
    assert run("check", "dispatcher").exit_code == 2


def test_status_output_is_not_rich_markup(live_api: Any) -> None:
    payload = json.dumps({"text": "[bold red]not markup[/]"})
    task_id = run("submit", "demo_ok", "--payload", payload, "--url", live_api.url).stdout.split()[0]
    shown = run("status", task_id, "--url", live_api.url)
    assert "[bold red]not markup[/]" in shown.output


# --- `taskscheduler api`: where it listens, what it says ------------------------------------------------------------


def _server_env(settings: Settings, **changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("API_HOST", "API_KEYS", "METRICS_HOST", "FAULT_POINT")}
    env.update(DATABASE_URL=settings.database_url, REDIS_URL=settings.redis_url, LOG_LEVEL="INFO")
    env.update(changes)
    return env


@contextlib.contextmanager
def _started(args: list[str], env: dict[str, str], log_path: Path) -> Iterator[Callable[[], str]]:
    proc = start_process(args[0], [CLI, *args], log_path=log_path, env=env)
    try:
        yield proc.log
    finally:
        proc.stop(20)


def test_the_api_listens_on_loopback_by_default_and_does_not_warn(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    with _started(["api", "--port", str(port)], _server_env(settings), tmp_path / "api.log") as log:
        wait_until(lambda: f"running on http://127.0.0.1:{port}" in log(), timeout=90, what="the API to listen")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        assert "API_KEYS is empty" not in log(), log()


def test_the_api_beyond_loopback_without_keys_warns_at_start_up(settings: Settings, tmp_path: Path) -> None:
    # A database that never answers keeps the process from ever binding: nothing listens beyond
    # loopback during the test, and the warning comes first, from the settings alone.
    closed = free_port()
    env = _server_env(settings, API_HOST="0.0.0.0", DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/x")
    with _started(["api", "--port", str(free_port())], env, tmp_path / "api.log") as log:
        wait_until(lambda: "waiting for the database" in log(), timeout=60, what="the API to start")
        warnings = [line for line in log().splitlines() if "API_KEYS is empty" in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0] and "0.0.0.0" in warnings[0], log()
    env["API_KEYS"] = "k-1"
    with _started(["api", "--port", str(free_port())], env, tmp_path / "api-keys.log") as log:
        wait_until(lambda: "waiting for the database" in log(), timeout=60, what="the API to start")
        assert "API_KEYS is empty" not in log(), log()


@pytest.mark.parametrize("role", [["api"], ["scheduler"], ["worker", "--queues", "low"], ["migrate"]])
def test_an_api_key_that_could_never_match_is_refused_at_start_up(
    settings: Settings, tmp_path: Path, role: list[str]
) -> None:
    env = _server_env(settings, API_KEYS="good-key,bäd-key")
    proc = subprocess.Popen(
        [CLI, *role], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stop_group(proc, 20)  # a role that started after all must not outlive the test
    assert proc.returncode == 2, stdout + stderr
    assert "configuration error" in stderr and "API_KEYS: key 2 of 2 holds a non-ASCII character" in stderr
    assert "bäd-key" not in stderr + stdout and "good-key" not in stderr + stdout
