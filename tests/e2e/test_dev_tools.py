"""Reaching a running `taskscheduler dev` from its directory: `env`, `psql` and `check` find it."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import CLI
from tests.e2e.test_dev import SERVER_ENV_NAMES, Dev

pytestmark = pytest.mark.e2e

# The dev tests' settings kept out too: these commands must find the instance without them.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in (*SERVER_ENV_NAMES, "TASKSCHEDULER_URL")}
# The CLI beside the test's interpreter, also for `bash -c`.
CLEAN_ENV["PATH"] = f"{Path(CLI).parent}{os.pathsep}{CLEAN_ENV.get('PATH', '')}"


def _run(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True, timeout=timeout)


class DevIn(Dev):
    """A `taskscheduler dev` that remembers its data dir."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        super().__init__(data_dir, log_path)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevIn]:
    """One `taskscheduler dev` for the module, in a folder of its own with the default data dir."""
    # Not under pytest's basetemp (see test_dev.data_dir): the embedded PostgreSQL's account must reach it.
    folder = Path(tempfile.mkdtemp(prefix="taskscheduler-devtools-test-"))
    instance = DevIn(folder / ".taskscheduler", tmp_path_factory.mktemp("devtools") / "dev.log")
    try:
        instance.wait_ready()
        yield instance
    finally:
        if instance.popen.poll() is None:
            instance.popen.send_signal(signal.SIGTERM)
            try:
                instance.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(instance.popen.pid, signal.SIGKILL)
                instance.popen.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def empty_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="taskscheduler-devtools-empty-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_env_prints_exports_that_point_the_cli_and_check_at_dev(dev: DevIn) -> None:
    cwd = dev.data_dir.parent
    result = _run([CLI, "env"], cwd)
    assert result.returncode == 0, result.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines())
    values = {name: shlex.split(value)[0] for name, value in exports.items()}
    assert set(values) == {"DATABASE_URL", "REDIS_URL", "TASKSCHEDULER_URL"}
    assert values["TASKSCHEDULER_URL"] == dev.url
    # The form psql and every libpq client accept, not SQLAlchemy's postgresql+psycopg://.
    assert values["DATABASE_URL"].startswith("postgresql://postgres:")
    secret = (dev.data_dir / "secret").read_text().strip()
    assert secret in values["DATABASE_URL"] and secret in values["REDIS_URL"]

    # Evaluated in a shell: the CLI's commands reach this dev instance from any directory.
    script = 'cd / && eval "$(cd "$1" && taskscheduler env)" && taskscheduler check api && taskscheduler list'
    task_id = dev.create(name="demo_ok", payload={})
    shell = _run(["bash", "-c", script, "bash", str(cwd)], cwd)
    assert shell.returncode == 0, shell.stdout + shell.stderr
    assert shell.stdout.startswith("ok: api pid ")
    assert task_id in shell.stdout


def test_psql_opens_the_dev_database_without_the_password_on_its_command_line(dev: DevIn) -> None:
    cwd = dev.data_dir.parent
    result = _run([CLI, "psql", "--", "-At", "-c", "select count(*) from tasks"], cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().isdigit(), result.stdout

    # psql replaced the CLI's process: its shell escape's parent is psql, whose argv we read.
    show_argv = r"""\! tr '\0' ' ' < /proc/$PPID/cmdline"""
    argv = _run([CLI, "psql", "--", "-At", "-c", show_argv], cwd)
    assert argv.returncode == 0, argv.stderr
    assert "psql" in argv.stdout and "host=" in argv.stdout
    assert (dev.data_dir / "secret").read_text().strip() not in argv.stdout


def test_check_beside_dev_needs_no_database_url(dev: DevIn) -> None:
    result = _run([CLI, "check", "scheduler"], dev.data_dir.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: scheduler pid ")
    # From elsewhere, naming the data dir.
    elsewhere = _run([CLI, "check", "worker", "--queue", "dlq", "--data-dir", str(dev.data_dir)], Path("/"))
    assert elsewhere.returncode == 0, elsewhere.stderr


@pytest.mark.parametrize(
    "command",
    [["env"], ["psql", "--", "-c", "select 1"], ["check", "api"]],
    ids=["env", "psql", "check"],
)
def test_without_a_dev_instance_each_says_how_in_one_line(empty_dir: Path, command: list[str]) -> None:
    result = _run([CLI, *command], empty_dir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert f"no `taskscheduler dev` runs in {empty_dir / '.taskscheduler'}" in lines[0]
    assert result.stdout == ""


def test_find_running_wants_both_servers_listening(empty_dir: Path) -> None:
    from taskscheduler.embedded import find_running

    # What a data dir looks like to a reader while its owner lives but the servers are not up:
    # a secret and a lock naming a live process (this one), no sockets.
    data_dir = empty_dir / ".taskscheduler"
    data_dir.mkdir(mode=0o700)
    (data_dir / "secret").write_text("s3cret\n")
    (data_dir / "secret").chmod(0o600)
    (data_dir / "embedded.lock").write_text(f"{os.getpid()}\n")
    assert find_running(data_dir) is None
