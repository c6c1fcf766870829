"""One rule for the CLI's errors: one line on stderr, exit 2 when the command line or the configuration is
wrong, exit 1 when a right command did not succeed (an HTTP error, a server that cannot be reached)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from tests.harness import CLI, free_port, stop_group
from tests.helpers import cli_run as run
from tests.helpers import one_line_error

from taskscheduler.config import Settings

pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("submit", "demo_ok", "--priority", "11"), "'--priority'", id="priority-above-range"),
        pytest.param(("submit", "demo_ok", "--priority", "high"), "'--priority'", id="priority-not-a-number"),
        pytest.param(("submit", "demo_ok", "--max-retries", "-1"), "'--max-retries'", id="max-retries-negative"),
        pytest.param(("submit",), "Missing argument", id="submit-without-name"),
        pytest.param(("submit", "demo_ok", "--colour", "red"), "--colour", id="unknown-option"),
        pytest.param(("list", "--limit", "0"), "'--limit'", id="limit-zero"),
        pytest.param(("list", "--queue", "hi"), "unknown queue 'hi'", id="list-unknown-queue"),
        pytest.param(("list", "--status", "DEADD"), "unknown status 'DEADD'", id="list-unknown-status"),
        pytest.param(("lsit",), "No such command", id="unknown-command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(live_api: Any, args: tuple[str, ...], message: str) -> None:
    url_args = ("--url", live_api.url) if args[0] in ("submit", "list") and len(args) > 1 else ()
    line = one_line_error(run(*args, *url_args), 2)
    assert message in line, line


def test_a_usage_error_from_the_real_command_is_one_line(settings: Settings) -> None:
    proc = subprocess.run(
        [CLI, "submit", "demo_ok", "--priority", "11", "--url", f"http://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: Invalid value for '--priority': Input should be less than or equal to 10"
        " (see: taskscheduler submit --help)"
    ], proc.stderr


def test_an_unreachable_api_says_where_it_looked_and_how_to_change_it(settings: Settings) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(run("list", "--url", url), 1)
    assert f"cannot reach the API at {url}" in line
    assert "taskscheduler dev" in line and "--url" in line and "TASKSCHEDULER_URL" in line


# --- the roles: configuration errors and an unreachable database ----------------------------------------------------


def _role_env(settings: Settings, **changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS", "FAULT_POINT", "TASK_MODULES")}
    env.update(DATABASE_URL=settings.database_url, REDIS_URL=settings.redis_url, LOG_LEVEL="INFO")
    env.update(changes)
    return env


def _run_role(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        stop_group(proc)  # a role that did not stop in time must not outlive the test
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("role", [["api", "--port", "0"], ["scheduler"], ["worker", "--queues", "low"], ["migrate"]])
def test_a_role_waits_db_wait_sec_for_the_database_then_exits_1_with_one_line(
    settings: Settings, role: list[str]
) -> None:
    port = free_port()
    env = _role_env(settings, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/x", DB_WAIT_SEC="1")
    started = time.monotonic()
    done = _run_role(role, env, timeout=45)
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 40  # DB_WAIT_SEC, not the default minute
    output = done.stdout + done.stderr
    assert f"waiting up to 1 s for the database at 127.0.0.1:{port} (DB_WAIT_SEC)" in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[-1]] and f"the database at 127.0.0.1:{port} did not answer within 1 s" in errors[0]
    assert "Traceback" not in output, output


@pytest.mark.parametrize("role", [["api", "--port", "0"], ["worker", "--queues", "low"]])
def test_a_task_module_that_cannot_be_imported_is_one_line_and_exit_2(
    settings: Settings, role: list[str], tmp_path: Path
) -> None:
    done = _run_role(role, _role_env(settings, TASK_MODULES="myapp.taks"), timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: TASK_MODULES: cannot import 'myapp.taks'"), done.stderr
