"""The embedded servers' processes: is one alive, which ones work in a directory, signal and wait,
and wait for a starting server to serve."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen

import psutil

from taskscheduler.embedded.errors import EmbeddedError

START_TIMEOUT_SEC = 30.0
STOP_TIMEOUT_SEC = 30.0


def pid_alive(pid: int) -> bool:
    try:
        return running(psutil.Process(pid))
    except psutil.Error:
        return False


def running(proc: psutil.Process) -> bool:
    """Alive, and the same process (psutil checks the creation time). A zombie has exited."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def wait_exited(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until the processes have exited; return those still running at the timeout.

    An exited server that is not our child stays a zombie until init reaps it, which can take a
    while (here ~1.5 s) or never happen (a container whose pid 1 does not reap), so a zombie counts
    as exited: it holds no sockets, files or memory any more.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.01)


def working_in(directory: Path, name: str) -> list[psutil.Process]:
    """Live processes called ``name`` whose working directory is ``directory``.

    PostgreSQL's postmaster and backends chdir to their data directory, and we start Valkey in its
    own, so this finds the servers of a data dir whatever their pid files or sockets say.
    """
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == name and proc.status() != psutil.STATUS_ZOMBIE and proc.cwd() == str(directory):
                found.append(proc)
        except psutil.Error:  # gone, or not ours to inspect (then not ours at all)
            continue
    return found


def signal_and_wait(procs: list[psutil.Process], first: int, last: int) -> None:
    """Send ``first``, wait for the processes to exit, then ``last`` to those still alive."""
    for sig, timeout in ((first, STOP_TIMEOUT_SEC), (last, 10.0)):
        for proc in procs:
            with contextlib.suppress(psutil.Error):  # psutil refuses to signal a reused pid
                proc.send_signal(sig)
        procs = wait_exited(procs, timeout)
        if not procs:
            return


def wait_serving(
    proc: Popen[bytes], name: str, log_path: Path, log_offset: int, serving: Callable[[], bool], poll_sec: float
) -> bool:
    """Ask ``serving`` every ``poll_sec`` until it says yes (True) or START_TIMEOUT_SEC has passed
    (False). Raises EmbeddedError, with the server's output of this start, if the server exits first."""
    deadline = time.monotonic() + START_TIMEOUT_SEC
    while True:
        if proc.poll() is not None:
            raise EmbeddedError(
                f"{name} exited with code {proc.returncode} during startup; log {log_path}:\n"
                + _read_from(log_path, log_offset)
            )
        if serving():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_sec)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""
