"""The `dev` supervisor with tiny real child processes: what it restarts, what stops it, what it shows."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil
import pytest
from tests.helpers import wait_until

from taskscheduler.dev import DevError, check_port_free, supervisor
from taskscheduler.dev.supervisor import Child, Supervisor


def _child(tmp_path: Path, name: str, source: str) -> Child:
    return Child(name=name, argv=("-c", source), log_path=tmp_path / f"{name}.log")


def _run(supervisor: Supervisor) -> tuple[list[int], threading.Thread]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run()), daemon=True)
    thread.start()
    return result, thread


@pytest.fixture
def main_thread_signals(monkeypatch: pytest.MonkeyPatch) -> None:
    # Supervisor.run installs signal handlers, which only the main thread may do.
    monkeypatch.setattr(supervisor.signal, "signal", lambda sig, handler: signal.SIG_DFL)


def test_a_configuration_error_stops_at_once_and_shows_the_error_once(tmp_path: Path) -> None:
    said: list[str] = []
    bad = _child(tmp_path, "worker", "import sys; print('TASK_MODULES: cannot import x', file=sys.stderr); sys.exit(2)")
    steady = _child(tmp_path, "api", "import time; time.sleep(60)")
    code = Supervisor(env=dict(os.environ), say=said.append, children=[steady, bad]).run()

    assert code == 2
    assert sum("cannot import x" in line for line in said) == 1, said
    assert not any("restart" in line and "cannot fix" not in line for line in said), said
    assert steady.popen is not None and steady.popen.returncode is not None  # stopped with dev


def test_a_crash_loop_stops_after_the_third_death_in_the_window(tmp_path: Path) -> None:
    said: list[str] = []
    crashing = _child(tmp_path, "api", "import sys; print('boom: port in use s3cret', file=sys.stderr); sys.exit(1)")
    redact = lambda text: text.replace("s3cret", "***")  # noqa: E731
    code = Supervisor(env=dict(os.environ), say=said.append, children=[crashing], redact=redact).run()

    assert code == 1
    assert sum(line.startswith("restarted api") for line in said) == supervisor.CRASH_LOOP_DEATHS - 1, said
    assert sum("boom: port in use ***" in line for line in said) == 1, said
    assert not any("s3cret" in line for line in said)
    # The log file keeps every run's output; only the last one is shown.
    assert (tmp_path / "api.log").read_text().count("boom: port in use") == supervisor.CRASH_LOOP_DEATHS


def test_a_killed_child_is_restarted(tmp_path: Path, main_thread_signals: None) -> None:
    said: list[str] = []
    child = _child(tmp_path, "worker high", "import time; time.sleep(60)")
    supervisor = Supervisor(env=dict(os.environ), say=said.append, children=[child])
    result, thread = _run(supervisor)
    try:
        wait_until(lambda: child.popen is not None, timeout=10, what="the child to start")
        assert child.popen is not None
        first = child.popen.pid
        os.kill(first, signal.SIGKILL)
        wait_until(
            lambda: child.popen is not None and child.popen.pid != first and child.popen.poll() is None,
            timeout=10,
            what="the child to be restarted",
        )
        assert "worker high exited with signal SIGKILL; restarting it" in said
    finally:
        supervisor.stopping.set()
        thread.join(30)
    assert result == [0]
    assert not psutil.pid_exists(child.popen.pid) or psutil.Process(child.popen.pid).status() == psutil.STATUS_ZOMBIE


def test_a_busy_port_is_found_before_anything_starts() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DevError, match=f"cannot listen on 127.0.0.1:{port}: .*--port"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again
