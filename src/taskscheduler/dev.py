"""`taskscheduler dev`: every role on one machine, as child processes, with embedded servers by default.

The children run the very commands compose runs (`taskscheduler api`, `... scheduler`,
`... worker --queues X`); only the servers differ. A child that dies is started again, as compose's
`restart: unless-stopped` would, so the stuck-task walkthrough (kill a worker) works here too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

# Quicker than production so a first run shows retries and rescues in seconds, not minutes.
DEV_DEFAULTS: dict[str, str] = {
    "POLL_INTERVAL_SEC": "0.5",
    "STUCK_AFTER_SEC": "30",
    "HEARTBEAT_SEC": "2",
    "HEARTBEAT_TIMEOUT_SEC": "10",
    "ENQUEUE_TIMEOUT_SEC": "15",
    "RETRY_BACKOFF_BASE_SEC": "1",
    "RETRY_BACKOFF_MAX_SEC": "30",
}

ROLES: tuple[tuple[str, ...], ...] = (
    ("api",),
    ("scheduler",),
    ("worker", "--queues", "high"),
    ("worker", "--queues", "default"),
    ("worker", "--queues", "low"),
    ("worker", "--queues", "dlq"),
)

STOP_GRACE_SEC = 10.0
RESTART_DELAY_SEC = 1.0

# In the data dir, while dev runs on embedded servers: the API's base URL, for `taskscheduler env`.
API_URL_FILE = "api_url"


def dev_api_url(data_dir: Path) -> str | None:
    """The API address that the `dev` of ``data_dir`` last announced (check it still runs first)."""
    try:
        return (data_dir / API_URL_FILE).read_text().strip() or None
    except OSError:
        return None


def dev_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """DEV_DEFAULTS, each unless the environment sets it."""
    return {name: environ.get(name, value) for name, value in DEV_DEFAULTS.items()}


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `dev` itself dies, so no role outlives it (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Child:
    args: tuple[str, ...]
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def name(self) -> str:
        return " ".join(self.args)


@dataclass
class Supervisor:
    env: dict[str, str]
    say: Callable[[str], None]
    children: list[Child] = field(default_factory=lambda: [Child(args) for args in ROLES])
    stopping: threading.Event = field(default_factory=threading.Event)

    def _spawn(self, child: Child) -> None:
        child.popen = subprocess.Popen(
            [sys.executable, "-m", "taskscheduler", *child.args], env=self.env, preexec_fn=_die_with_parent
        )

    def run(self) -> int:
        """Start every role, restart those that die, and stop all on SIGINT/SIGTERM. Returns the exit code."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stopping.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in self.children:
                self._spawn(child)
            while not self.stopping.wait(0.2):
                for child in self.children:
                    assert child.popen is not None
                    code = child.popen.poll()
                    if code is not None and not self.stopping.is_set():
                        self.say(f"{child.name} exited with {code}; starting it again")
                        time.sleep(RESTART_DELAY_SEC)
                        child.restarts += 1
                        self._spawn(child)
            self.say("stopping ...")
            return 0
        finally:
            self._stop_children()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_children(self) -> None:
        running = [c.popen for c in self.children if c.popen is not None and c.popen.poll() is None]
        for popen in running:
            # The role's main process only: it stops its own pool gracefully (Celery's warm shutdown).
            popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SEC
        for popen in running:
            try:
                popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"pid {popen.pid} did not stop in {STOP_GRACE_SEC:g}s; killing it")
        for popen in running:
            # Whole groups: Celery's pool processes too, even if their parent is gone.
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run_dev(*, port: int, data_dir: Path, environ: Mapping[str, str], say: Callable[[str], None]) -> int:
    """Start (or reuse) the servers, migrate, run every role until Ctrl-C or SIGTERM."""
    from taskscheduler.config import Settings
    from taskscheduler.migrations import run_migrations

    env = dict(environ)
    servers = None
    configured = Settings()  # the environment and .env, as every child will read them
    if configured.database_url and configured.redis_url:
        env["DATABASE_URL"] = configured.database_url
        env["REDIS_URL"] = configured.redis_url
        say("using DATABASE_URL and REDIS_URL from the environment")
    else:
        from taskscheduler.embedded import SECRET_FILE, mask_secret, start_embedded

        say(f"starting embedded PostgreSQL and Valkey in {data_dir}/ ...")
        started = time.monotonic()
        servers = start_embedded(data_dir)
        env["DATABASE_URL"] = servers.database_url
        env["REDIS_URL"] = servers.redis_url
        say(f"servers up in {time.monotonic() - started:.1f}s, for this user only:")
        # The URLs carry the password: shown masked, with where to find it.
        for name in ("DATABASE_URL", "REDIS_URL"):
            say(f"  {name}={mask_secret(env[name], servers)}")
        say(f"  password (***) in {data_dir / SECRET_FILE}")
    try:
        run_migrations(env["DATABASE_URL"])
        settings = dev_settings(env)
        env.update(settings)
        env["API_PORT"] = str(port)
        env.setdefault("API_HOST", "127.0.0.1")
        if servers is not None:
            (data_dir / API_URL_FILE).write_text(f"http://127.0.0.1:{port}\n")
        say("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + " (override with the environment)")
        say(f"Swagger UI: http://127.0.0.1:{port}/docs  (Ctrl-C stops everything)")
        return Supervisor(env=env, say=say).run()
    finally:
        if servers is not None:
            servers.stop()
            say("embedded servers stopped")
