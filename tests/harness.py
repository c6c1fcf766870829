"""The harness the tests and the benchmarks share: a private database and Redis key prefix on the
given servers, processes started in a process group of their own, polling for a condition.

It imports no pytest, so that the benchmarks (`python -m benchmarks.x` from the project root) can
use it as the tests do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
from sqlalchemy.engine import make_url

from taskscheduler.config import normalize_database_url, redis_client_url
from taskscheduler.store.db import libpq_url

CLI = shutil.which("taskscheduler", path=str(Path(sys.executable).parent)) or "taskscheduler"
LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"


def given_server_urls() -> tuple[str | None, str | None]:
    """The servers the environment names: TEST_DATABASE_URL / TEST_REDIS_URL, else DATABASE_URL / REDIS_URL."""
    database_url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL") or None
    redis_url = os.environ.get("TEST_REDIS_URL") or os.environ.get("REDIS_URL") or None
    return database_url, redis_url


@dataclass(frozen=True)
class Services:
    database_url: str  # SQLAlchemy URL of a private database
    redis_url: str
    redis_key_prefix: str

    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "REDIS_KEY_PREFIX": self.redis_key_prefix,
        }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------ servers


@contextlib.contextmanager
def private_database(admin_url: str, name: str, *, migrate: bool = True) -> Iterator[str]:
    """Database `name`, created on the server of `admin_url` and migrated; dropped on exit whoever
    is still connected. Yields its SQLAlchemy URL."""
    admin = libpq_url(admin_url)
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(normalize_database_url(admin_url)).set(database=name).render_as_string(False)
    try:
        if migrate:
            from taskscheduler.migrations import run_migrations

            run_migrations(url)
        yield url
    finally:
        from taskscheduler.store import db

        db.dispose_engines()
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_client_url(redis_url), socket_connect_timeout=5)


def delete_redis_keys(redis_url: str, prefix: str) -> int:
    assert prefix, "refusing to delete every key"
    client = redis_client(redis_url)
    deleted = 0
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            deleted += client.delete(key)
    finally:
        client.close()
    return deleted


@contextlib.contextmanager
def private_redis_prefix(redis_url: str, prefix: str) -> Iterator[str]:
    """`prefix` for every key of a run (REDIS_KEY_PREFIX); its keys are deleted on exit."""
    try:
        yield prefix
    finally:
        delete_redis_keys(redis_url, prefix)


def insert_tasks(
    database_url: str,
    count: int,
    *,
    name: str = "demo_ok",
    payload: str = "{}",
    priority: int = 5,
    queue: str = "default",
    max_retries: int = 3,
    per_second: float | None = None,
    lead_sec: float = 0.0,
) -> None:
    """`count` PENDING tasks with their 'created' events in one statement: all due `lead_sec` from
    now, or, with `per_second`, one due every 1/`per_second` seconds from then on."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(
            """
            WITH created AS (
                INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, max_retries)
                SELECT gen_random_uuid(), %(name)s, %(payload)s::jsonb, %(priority)s, %(queue)s, 'PENDING',
                       now() + make_interval(secs => %(lead)s + (i - 1) * %(gap)s), %(max_retries)s
                FROM generate_series(1, %(count)s) AS i
                RETURNING id
            )
            INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
            SELECT id, NULL, 'PENDING', 0, 'created' FROM created
            """,
            {
                "name": name,
                "payload": payload,
                "priority": priority,
                "queue": queue,
                "max_retries": max_retries,
                "count": count,
                "lead": float(lead_sec),
                "gap": 1.0 / per_second if per_second else 0.0,
            },
        )


# ---------------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A process started in a session of its own (`start_process`), so it can be signalled whole."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.time)  # time.time() just before it was started

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal the whole process group (Celery's pool children included)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM to the group, SIGKILL after `timeout`; then SIGKILL to any child left behind."""
        return stop_group(self.popen, timeout)

    def kill(self) -> None:
        """SIGKILL to the group, as a crash."""
        self.signal_group(signal.SIGKILL)
        self.popen.wait(10)

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def start_process(
    name: str, argv: Sequence[str], *, log_path: Path, env: Mapping[str, str], cwd: Path | None = None
) -> Proc:
    """`argv` in a new session (its own process group), stdout and stderr to `log_path`."""
    started_at = time.time()
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Proc(name=name, popen=popen, log_path=log_path, started_at=started_at)


def stop_group(popen: subprocess.Popen[Any], timeout: float = 15) -> int | None:
    """Stop a process started with `start_new_session=True` and everything in its group."""

    def signal_group(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, sig)

    if popen.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            popen.wait(5)
    signal_group(signal.SIGKILL)  # pool children left behind, if any
    return popen.returncode


def wait_worker_ready(proc: Proc, *, timeout: float = 90, log_level: str = "INFO") -> None:
    """Until a `taskscheduler worker` consumes. Celery says "ready." at INFO; above INFO there is no
    such line: wait for its pool processes, then give it a moment to connect."""
    if log_level.upper() in ("DEBUG", "INFO"):
        wait_until(lambda: "ready." in proc.log() or not proc.alive(), timeout=timeout, what=f"{proc.name} ready")
    else:
        wait_until(lambda: len(proc.tree()) > 1 or not proc.alive(), timeout=timeout, what=f"{proc.name} pool")
        time.sleep(3.0)
    assert proc.alive(), proc.log()


def stop_all(procs: Sequence[Proc]) -> None:
    for proc in reversed(procs):
        proc.stop()


def dump_logs(procs: Iterable[Proc], tail: int = 4000) -> str:
    return "\n".join(f"===== {p.name} (pid {p.pid}) =====\n{p.log()[-tail:]}" for p in procs)
