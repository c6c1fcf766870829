"""The watchdog: a small process that stops the servers if their owner dies without ``stop()``
(SIGKILL, OOM), so they never outlive it. It holds the data dir's lock (and the staged programs'
lock) until it is done."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

from taskscheduler.embedded.datadir import WATCHDOG_LOG
from taskscheduler.embedded.processes import STOP_TIMEOUT_SEC

# Runs as `python -c` with argv: owner pid, then (pid, first signal, last signal) per server. It waits
# for EOF on stdin, which comes when the owner closes the pipe in stop() (after writing "stopped") or
# when the owner dies. In the second case it stops the servers. psutil's identity check (pid plus
# creation time) keeps it from signalling a pid that has since been reused.
_SOURCE = """
import sys, time
import psutil

def log(msg):
    print(time.strftime("%Y-%m-%d %H:%M:%S"), "watchdog of pid", sys.argv[1] + ":", msg, flush=True)

def running(proc):  # a zombie has exited (init may be slow to reap it, or never do)
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

args = [int(a) for a in sys.argv[2:]]
targets = []
for i in range(0, len(args), 3):
    try:
        targets.append((psutil.Process(args[i]), args[i + 1], args[i + 2]))
    except psutil.NoSuchProcess:
        pass
if sys.stdin.buffer.read() == b"stopped":
    sys.exit(0)
log("owner exited without stop(); stopping its servers %s" % [t[0].pid for t in targets])
for stage, timeout in ((1, 60), (2, 10)):
    for proc, *sigs in targets:
        try:
            proc.send_signal(sigs[stage - 1])
        except psutil.Error:
            pass
    deadline = time.monotonic() + timeout
    while targets and time.monotonic() < deadline:
        targets = [t for t in targets if running(t[0])]
        time.sleep(0.01)
    if not targets:
        break
log("done" if not targets else "could not stop %s" % [t[0].pid for t in targets])
"""


def start(
    data_dir: Path, owner_pid: int, targets: list[tuple[int, int, int]], keep_fds: tuple[int, ...]
) -> subprocess.Popen[bytes]:
    """The watchdog of ``owner_pid``: ``targets`` are (pid, first signal, last signal) per server;
    ``keep_fds`` (the locks) stay open in it until it exits."""
    args = [str(int(value)) for target in targets for value in target]
    with open(data_dir / WATCHDOG_LOG, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", _SOURCE, str(owner_pid), *args],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            pass_fds=keep_fds,
            start_new_session=True,  # no terminal signals; it must outlive us to be of any use
        )


def dismiss(watchdog: subprocess.Popen[bytes], clean: bool) -> None:
    """Tell the watchdog we stopped the servers (or, if not ``clean``, let it try) and wait for it."""
    assert watchdog.stdin is not None
    with contextlib.suppress(OSError):
        if clean:
            watchdog.stdin.write(b"stopped")
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=10 if clean else 2 * STOP_TIMEOUT_SEC + 20)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()
