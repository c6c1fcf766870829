"""The `dev` supervisor: the roles as child processes, each logging to its own file, restarted when
they die.

A child that dies is started again, as compose's `restart: unless-stopped` would, so the stuck-task
walkthrough (kill a worker) works under `dev` too. A restart cannot fix everything, though: a child
that exits with code 2 (the CLI's code for a configuration error, such as a TASK_MODULES entry that
cannot be imported) or dies CRASH_LOOP_DEATHS times within CRASH_LOOP_WINDOW_SEC stops `dev`, with
that child's last output shown once.
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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

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
