"""`taskscheduler dev`: every role on one machine, as child processes, with embedded servers by default.

The children run the very commands compose runs (`taskscheduler api`, `... scheduler`,
`... worker --queues X`); only the servers differ. A child that dies is started again, as compose's
`restart: unless-stopped` would, so the stuck-task walkthrough (kill a worker) works here too. A
restart cannot fix everything, though: a child that exits with code 2 (the CLI's code for a
configuration error, such as a TASK_MODULES entry that cannot be imported) or dies
CRASH_LOOP_DEATHS times within CRASH_LOOP_WINDOW_SEC stops `dev`, with that child's last output
shown once. The children's output goes to one log file per role in `<data_dir>/logs/`, so the
terminal shows only what `dev` itself says: where things are, and each child's state changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
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
# The CLI exits 2 for bad settings or handler modules that cannot be imported: restarting repeats it.
CONFIG_ERROR_EXIT = 2
# A child that dies this often this quickly fails for a reason a restart does not remove. A worker
# killed by hand (the stuck-task walkthrough) dies once, and is restarted.
CRASH_LOOP_DEATHS = 3
CRASH_LOOP_WINDOW_SEC = 30.0
ERROR_TAIL_LINES = 20
READY_POLL_SEC = 0.5


class DevError(RuntimeError):
    """`dev` cannot start (the message says why, in one line); `exit_code` 2 for bad settings."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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


def check_port_free(host: str, port: int) -> None:
    """Raise DevError if the API could not listen on host:port now, before anything is started.

    Bound as uvicorn binds (SO_REUSEADDR), so a port in TIME_WAIT is not reported as busy."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise DevError(f"API_HOST {host!r}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise DevError(
                f"the API cannot listen on {host}:{port}: {exc.strerror} (another taskscheduler dev?);"
                " choose another port with --port"
            ) from None


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `dev` itself dies, so no role outlives it (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"code {code}"


@dataclass
class Child:
    """One supervised process: `sys.executable *argv`, its output in `log_path` (None: the terminal)."""

    name: str
    argv: tuple[str, ...]
    log_path: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    log_offset: int = 0  # where the current run's output starts in log_path
    restart_at: float | None = None
    ready: bool = False
    deaths: deque[float] = field(default_factory=deque)


def role_children(log_dir: Path | None) -> list[Child]:
    """The six roles, each logging to `log_dir/<role>.log` (`worker-high.log`, ...) unless None."""
    children = []
    for args in ROLES:
        name = " ".join(a for a in args if not a.startswith("--"))
        log_path = log_dir / f"{name.replace(' ', '-')}.log" if log_dir is not None else None
        children.append(Child(name=name, argv=("-m", "taskscheduler", *args), log_path=log_path))
    return children


def prepare_log_dir(log_dir: Path, names: list[str]) -> None:
    """A private folder for the children's logs; the previous run's logs are kept as `<role>.log.1`."""
    log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(log_dir, 0o700)
    for name in names:
        current = log_dir / name
        if current.exists():
            current.replace(log_dir / f"{name}.1")


@dataclass
class Supervisor:
    env: dict[str, str]
    say: Callable[[str], None]
    children: list[Child]
    #: Which of these pids are up (have recorded a process heartbeat); None: readiness is not reported.
    ready_pids: Callable[[list[int]], set[int]] | None = None
    #: Applied to a child's output before it is shown (it must not show the servers' secret).
    redact: Callable[[str], str] = lambda text: text
    stopping: threading.Event = field(default_factory=threading.Event)
    stop_signal: str = ""

    def _spawn(self, child: Child) -> None:
        out: int | None = None
        if child.log_path is not None:
            out = os.open(child.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(out, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} taskscheduler dev starts {child.name}\n".encode())
            child.log_offset = os.lseek(out, 0, os.SEEK_END)
        try:
            child.popen = subprocess.Popen(
                [sys.executable, *child.argv],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=_die_with_parent,
            )
        finally:
            if out is not None:
                os.close(out)
        child.restart_at = None
        child.ready = False

    def run(self) -> int:
        """Start every child, restart those that die, stop all on SIGINT/SIGTERM/SIGHUP (0) or when a
        child cannot be kept running (its exit code if a configuration error, else 1)."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop_signal = signal.Signals(signum).name
            self.stopping.set()

        # SIGHUP: the terminal was closed. The children are in their own sessions, so only we hear it.
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, on_signal) for s in signals}
        started = time.monotonic()
        all_ready = False
        next_ready_check = 0.0
        try:
            for child in self.children:
                self._spawn(child)
                self.say(f"started {child.name} (pid {self._pid(child)})")
            while not self.stopping.wait(0.2):
                failure = self._tend()
                if failure is not None:
                    return failure
                if self.ready_pids is not None and time.monotonic() >= next_ready_check:
                    next_ready_check = time.monotonic() + READY_POLL_SEC
                    newly = self._check_ready()
                    if not all_ready and all(c.ready for c in self.children):
                        all_ready = True
                        self.say(f"ready in {time.monotonic() - started:.1f}s: every role is up")
                    elif all_ready:
                        for child in newly:
                            self.say(f"{child.name} is up again (pid {self._pid(child)})")
            self.say(f"{self.stop_signal or 'stop'} received: stopping every role")
            return 0
        finally:
            self._stop_children()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @staticmethod
    def _pid(child: Child) -> int:
        assert child.popen is not None
        return child.popen.pid

    def _tend(self) -> int | None:
        """Restart the children that died, or the exit code for dev if one cannot be kept running."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._spawn(child)
                    self.say(f"restarted {child.name} (pid {self._pid(child)})")
                continue
            assert child.popen is not None
            code = child.popen.poll()
            if code is None or self.stopping.is_set():
                continue
            if code == CONFIG_ERROR_EXIT:
                self.say(
                    f"{child.name} exited with {_describe_exit(code)}, a configuration error; a restart cannot fix it:"
                )
                self._show_output(child)
                self.say("stopping every role")
                return CONFIG_ERROR_EXIT
            child.deaths.append(now)
            while child.deaths and child.deaths[0] < now - CRASH_LOOP_WINDOW_SEC:
                child.deaths.popleft()
            if len(child.deaths) >= CRASH_LOOP_DEATHS:
                self.say(
                    f"{child.name} exited with {_describe_exit(code)}, {len(child.deaths)} times in"
                    f" {CRASH_LOOP_WINDOW_SEC:g}s; a restart does not help:"
                )
                self._show_output(child)
                self.say("stopping every role")
                return 1
            self.say(f"{child.name} exited with {_describe_exit(code)}; restarting it")
            child.restart_at = now + RESTART_DELAY_SEC
        return None

    def _check_ready(self) -> list[Child]:
        """Mark the children whose pid has a heartbeat as up; return those that just came up."""
        assert self.ready_pids is not None
        pending = [c for c in self.children if not c.ready and c.restart_at is None and c.popen is not None]
        if not pending:
            return []
        try:
            up = self.ready_pids([self._pid(c) for c in pending])
        except Exception:  # the database is briefly away: the next poll asks again
            return []
        newly = [c for c in pending if self._pid(c) in up]
        for child in newly:
            child.ready = True
        return newly

    def _show_output(self, child: Child) -> None:
        """The last lines the child wrote in its latest run (its error), once."""
        if child.log_path is None:  # --verbose: already on the terminal
            return
        try:
            with child.log_path.open("rb") as log:
                log.seek(child.log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return
        lines = [line for line in self.redact(text).splitlines() if line.strip()][-ERROR_TAIL_LINES:]
        for line in lines or ["(no output)"]:
            self.say(f"  | {line}")
        self.say(f"  (all of it in {child.log_path})")

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
        for child in self.children:
            if child.popen is not None:
                # Whole groups: Celery's pool processes too, even if their parent is gone.
                _signal_group(child.popen.pid, signal.SIGKILL)
                child.popen.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _heartbeat_reader(database_url: str) -> Callable[[list[int]], set[int]]:
    from taskscheduler.store import db
    from taskscheduler.store import processes as process_store

    hostname = socket.gethostname()

    def ready_pids(pids: list[int]) -> set[int]:
        with db.transaction(database_url) as conn:
            return process_store.beating_pids(conn, hostname=hostname, pids=pids)

    return ready_pids


def run_dev(
    *, port: int, data_dir: Path, environ: Mapping[str, str], say: Callable[[str], None], verbose: bool = False
) -> int:
    """Check the port, start (or reuse) the servers, migrate, run every role until Ctrl-C, SIGTERM,
    SIGHUP or a child that cannot be kept running. Raises DevError if it cannot start."""
    from kombu.utils.url import maybe_sanitize_url
    from pydantic import ValidationError
    from sqlalchemy.engine import make_url

    from taskscheduler.config import Settings
    from taskscheduler.migrations import run_migrations

    env = dict(environ)
    env.setdefault("API_HOST", "127.0.0.1")
    check_port_free(env["API_HOST"], port)
    try:
        configured = Settings()  # the environment and .env, as every child will read them
    except ValidationError as exc:
        raise DevError(f"configuration error: {exc}", CONFIG_ERROR_EXIT) from None
    servers = None
    redact: Callable[[str], str] = lambda text: text  # noqa: E731
    if configured.database_url and configured.redis_url:
        env["DATABASE_URL"] = configured.database_url
        env["REDIS_URL"] = configured.redis_url
        shown = {
            "DATABASE_URL": make_url(configured.database_url).render_as_string(hide_password=True),
            "REDIS_URL": maybe_sanitize_url(configured.redis_url, mask="***"),
        }
        where = "from the environment"
    else:
        from taskscheduler.embedded import SECRET_FILE, mask_secret, start_embedded

        say(f"starting embedded PostgreSQL and Valkey in {data_dir}/ ...")
        servers = start_embedded(data_dir)
        env["DATABASE_URL"] = servers.database_url
        env["REDIS_URL"] = servers.redis_url
        embedded = servers

        def redact(text: str) -> str:
            return mask_secret(text, embedded)

        # The URLs carry the password: shown masked, with where to find it.
        shown = {name: redact(env[name]) for name in ("DATABASE_URL", "REDIS_URL")}
        where = f"embedded, this user only; password (***) in {data_dir / SECRET_FILE}"
    try:
        run_migrations(env["DATABASE_URL"])
        settings = dev_settings(env)
        env.update(settings)
        env["API_PORT"] = str(port)
        log_dir = None if verbose else data_dir / "logs"
        children = role_children(log_dir)
        if log_dir is not None:
            prepare_log_dir(log_dir, [c.log_path.name for c in children if c.log_path is not None])
        api = f"http://{env['API_HOST']}:{port}"
        if servers is not None:
            (data_dir / API_URL_FILE).write_text(f"{api}\n")
        env_command = 'eval "$(taskscheduler env)"'
        if data_dir != Path(".taskscheduler").resolve():
            env_command = f'eval "$(taskscheduler env --data-dir {data_dir})"'
        for line in (
            f"API      {api}   Swagger UI {api}/docs",
            f"servers  {where}:",
            f"         DATABASE_URL={shown['DATABASE_URL']}",
            f"         REDIS_URL={shown['REDIS_URL']}",
            f"for the CLI, check, psql and Flower: {env_command}",
            f"logs     {log_dir}/<role>.log" if log_dir is not None else "logs     here (--verbose)",
            "unlike production: servers embedded unless DATABASE_URL/REDIS_URL are set, API on"
            f" {env['API_HOST']}, quicker timings (override with the environment):",
            "         " + " ".join(f"{k}={v}" for k, v in settings.items()),
            "Ctrl-C stops everything",
        ):
            say(line)
        ready_pids = _heartbeat_reader(env["DATABASE_URL"])
        return Supervisor(env=env, say=say, children=children, ready_pids=ready_pids, redact=redact).run()
    finally:
        if servers is not None:
            servers.stop()
            say("embedded servers stopped")
