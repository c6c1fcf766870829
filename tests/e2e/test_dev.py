"""`taskscheduler dev` with no server URLs: embedded servers, every role, clean stop, data kept."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.harness import CLI, start_process
from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.e2e

SERVER_ENV_NAMES = ("DATABASE_URL", "REDIS_URL", "REDIS_KEY_PREFIX", "TEST_DATABASE_URL", "TEST_REDIS_URL")


class Dev:
    def __init__(self, data_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_NAMES}
        env.update({"RETRY_BACKOFF_BASE_SEC": "0.2", "RETRY_BACKOFF_MAX_SEC": "1", **(extra_env or {})})
        argv = [CLI, "dev", "--port", str(self.port), "--data-dir", str(data_dir)]
        self.proc = start_process("dev", argv, log_path=log_path, env=env, cwd=data_dir.parent)
        self.popen = self.proc.popen

    def log(self) -> str:
        return self.proc.log()

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.popen.poll() is None, self.log()
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=90, what="taskscheduler dev to be ready")
        # dev says so once every role (the four workers too) has recorded its process heartbeat.
        wait_until(lambda: "[dev] ready in" in self.log(), timeout=60, what="every role to be up")

    def child_pids(self) -> dict[str, int]:
        """The latest pid of each role, from dev's "started"/"restarted <role> (pid N)" lines."""
        return {m[1]: int(m[2]) for m in re.finditer(r"\[dev\] (?:re)?started (.+?) \(pid (\d+)\)", self.log())}

    def processes(self) -> list[psutil.Process]:
        """dev and everything it started, the servers included (they may be re-parented)."""
        root = psutil.Process(self.popen.pid)
        procs = [root, *root.children(recursive=True)]
        return procs

    def create(self, **body: object) -> str:
        r = httpx.post(f"{self.url}/tasks", json=body, timeout=10)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def task(self, task_id: str) -> dict:
        return httpx.get(f"{self.url}/tasks/{task_id}", timeout=10).json()


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _server_processes(data_dir: Path) -> list[psutil.Process]:
    """The embedded PostgreSQL and Valkey processes that serve `data_dir` (they run in its subfolders)."""
    found = []
    for p in psutil.process_iter(["cwd"]):
        cwd = p.info["cwd"] or ""
        if cwd.startswith(str(data_dir)):
            found.append(p)
    return found


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's basetemp, which a concurrent pytest session (as root) makes unreachable
    # for the embedded PostgreSQL's own user.
    folder = Path(tempfile.mkdtemp(prefix="taskscheduler-dev-test-"))
    yield folder / "state"
    shutil.rmtree(folder, ignore_errors=True)


def test_dev_runs_everything_stops_cleanly_and_keeps_its_data(tmp_path: Path, data_dir: Path) -> None:
    dev = Dev(data_dir, tmp_path / "dev-1.log")
    try:
        dev.wait_ready()
        # A short start-up block: the addresses, the masked URLs, how to point tools at it, where the
        # logs are; the roles' own output (Celery banners, root warnings) goes to the log files.
        startup = dev.log().split("[dev] ready in")[0].splitlines()
        assert len(startup) < 30, dev.log()
        assert f"http://127.0.0.1:{dev.port}/docs" in dev.log()
        assert 'eval "$(taskscheduler env' in dev.log()
        assert f"{data_dir}/logs/<role>.log" in dev.log()
        assert "SecurityWarning" not in dev.log() and "celery@" not in dev.log()
        assert "ready." in (data_dir / "logs" / "worker-high.log").read_text()
        assert oct((data_dir / "logs").stat().st_mode & 0o777) == "0o700"
        assert oct((data_dir / "logs" / "api.log").stat().st_mode & 0o777) == "0o600"

        ok_id = dev.create(name="demo_ok", payload={"msg": "hi"}, priority=9)
        fail_id = dev.create(name="demo_fail", payload={"fail": True}, max_retries=1)
        wait_until(lambda: dev.task(ok_id)["status"] == "SUCCEEDED", timeout=30, what="demo_ok to succeed")
        wait_until(lambda: dev.task(fail_id)["status"] == "DEAD", timeout=30, what="demo_fail to die")
        dlq = wait_until(
            lambda: [e for e in httpx.get(f"{dev.url}/dlq").json() if e["task_id"] == fail_id],
            timeout=30,
            what="the dlq row",
        )
        assert [e["reason"] for e in dlq] == ["max_retries_exceeded"]

        # A second dev on the same data dir is refused while the first runs.
        second = subprocess.run(
            [CLI, "dev", "--port", str(free_port()), "--data-dir", str(data_dir)],
            env={k: v for k, v in os.environ.items() if k not in SERVER_ENV_NAMES},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        assert "in use" in second.stderr and "Traceback" not in second.stderr

        # A second dev on the first one's port stops before starting anything, and says why.
        other_dir = data_dir.parent / "other"
        busy = subprocess.run(
            [CLI, "dev", "--port", str(dev.port), "--data-dir", str(other_dir)],
            env={k: v for k, v in os.environ.items() if k not in SERVER_ENV_NAMES},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert busy.returncode == 1, busy.stderr
        assert f"cannot listen on 127.0.0.1:{dev.port}" in busy.stderr, busy.stderr
        assert "/docs" not in busy.stderr and not other_dir.exists()

        # A killed worker is started again (the stuck-task walkthrough), and dev says so.
        killed = dev.child_pids()["worker high"]
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: "[dev] worker high is up again" in dev.log(), timeout=60, what="the worker to be back")
        assert dev.child_pids()["worker high"] != killed
        assert "[dev] worker high exited with signal SIGKILL; restarting it" in dev.log()

        # The children's URLs carry the servers' secret; nothing dev and its roles print shows it.
        secret = (data_dir / "secret").read_text().strip()
        assert secret and secret not in dev.log()
        assert "DATABASE_URL=postgresql+psycopg://postgres:***@/taskscheduler?host=" in dev.log()

        procs = dev.processes() + _server_processes(data_dir)
        assert len(_alive(procs)) >= 7, "dev, api, scheduler, four workers"
        dev.popen.send_signal(signal.SIGTERM)
        dev.popen.wait(30)
        assert dev.popen.returncode == 0, dev.log()
        wait_until(lambda: not _alive(procs), timeout=10, what="every child and both servers to stop")
        assert not _alive(_server_processes(data_dir))
    finally:
        if dev.popen.poll() is None:
            os.killpg(dev.popen.pid, signal.SIGKILL)

    # The next start finds the tasks of the first. Closing its terminal (SIGHUP) stops it as cleanly.
    again = Dev(data_dir, tmp_path / "dev-2.log")
    try:
        again.wait_ready()
        assert again.task(ok_id)["status"] == "SUCCEEDED"
        assert again.task(fail_id)["status"] == "DEAD"
        procs = again.processes() + _server_processes(data_dir)
        again.popen.send_signal(signal.SIGHUP)
        again.popen.wait(30)
        assert again.popen.returncode == 0, again.log()
        wait_until(lambda: not _alive(procs), timeout=10, what="every child and both servers to stop")
        assert "[dev] SIGHUP received: stopping every role" in again.log()
    finally:
        if again.popen.poll() is None:
            os.killpg(again.popen.pid, signal.SIGKILL)


def test_dev_stops_on_a_handler_module_that_cannot_be_imported(tmp_path: Path, data_dir: Path) -> None:
    dev = Dev(data_dir, tmp_path / "dev.log", extra_env={"TASK_MODULES": "myapp.taks"})
    try:
        try:
            dev.popen.wait(90)
        except subprocess.TimeoutExpired:
            pytest.fail("dev kept restarting a role that cannot import its handlers:\n" + dev.log()[-3000:])
        assert dev.popen.returncode == 2, dev.log()
        log = dev.log()
        # The error itself, once, not buried under restarts.
        assert log.count("cannot import 'myapp.taks'") == 1, log
        assert "Traceback" not in log, log
        assert len(log.splitlines()) < 40, log
        # Every child and both servers are gone.
        pids = dev.child_pids()
        assert len(pids) == 6, log
        assert not _alive([p for p in map(_process, pids.values()) if p is not None]), log
        assert not _alive(_server_processes(data_dir))
    finally:
        if dev.popen.poll() is None:
            os.killpg(dev.popen.pid, signal.SIGKILL)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
