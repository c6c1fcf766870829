"""Both embedded servers on one data directory, as one object: start them (``start_embedded``), find
those another process started (``find_running``), and their lifetime.

Lifetime: an exclusive ``flock`` on the data dir's lock file is held for the life of the returned
object, so a second start on the same directory fails fast with ``EmbeddedError``. ``stop()`` stops
both servers and releases the lock; it also runs at interpreter exit. The watchdog (holding the same
lock) stops the servers if the owner dies without ``stop()``; if even the watchdog was killed, the
next start stops the orphans and clears stale ``postmaster.pid`` / socket files before starting again.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import quote

from taskscheduler.embedded import datadir, pg_install, postgres, valkey, watchdog
from taskscheduler.embedded.datadir import PG_SOCKET, SECRET_FILE
from taskscheduler.embedded.errors import EmbeddedError
from taskscheduler.embedded.processes import pid_alive

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedServers:
    """Running embedded servers. Keep it until ``stop()``; the data directory is locked until then."""

    # The URLs carry the secret: kept out of repr().
    #: SQLAlchemy URL for psycopg 3 over the Unix socket, database ``taskscheduler``.
    database_url: str = field(repr=False)
    #: Broker URL for Celery / kombu's redis transport: ``redis+socket://:secret@/.../valkey.sock``.
    redis_url: str = field(repr=False)
    #: The same server for redis-py (``Redis.from_url``), which wants ``unix://:secret@/.../valkey.sock``.
    redis_client_url: str = field(repr=False)
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
    # Only the directory itself is made private: its parents keep their modes.
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    runtime = _Runtime(data_dir)
    try:
        runtime.start()
    except BaseException:
        runtime.stop(quiet=True)
        raise
    database_url, redis_url, redis_client_url = _urls(runtime.secret, runtime.pg_connect_dir, runtime.valkey_socket)
    return EmbeddedServers(
        database_url=database_url, redis_url=redis_url, redis_client_url=redis_client_url, _runtime=runtime
    )


def _urls(secret: str, pg_connect_dir: Path, valkey_socket: Path) -> tuple[str, str, str]:
    """(SQLAlchemy URL, Celery broker URL, redis-py URL) of the servers, the secret in each."""
    quoted = quote(secret, safe="")
    socket_path = quote(str(valkey_socket))
    query = f"host={quote(str(pg_connect_dir), safe='/')}"
    return (
        f"postgresql+psycopg://{postgres.USER}:{quoted}@/{postgres.DATABASE_NAME}?{query}",
        f"redis+socket://:{quoted}@{socket_path}",
        f"unix://:{quoted}@{socket_path}",
    )


@dataclass(frozen=True)
class RunningServers:
    """The servers that another process (``taskscheduler dev``) started on a data dir, as clients reach them."""

    data_dir: Path
    #: pid of the process that started them and holds the data dir's lock.
    owner_pid: int
    #: As ``EmbeddedServers``: each carries the secret, so never print them unasked.
    database_url: str = field(repr=False)
    redis_url: str = field(repr=False)
    redis_client_url: str = field(repr=False)
    #: The folder holding PostgreSQL's socket (libpq's ``host``), the user and the database.
    pg_host: Path
    pg_user: str
    pg_database: str
    secret: str = field(repr=False)


def find_running(data_dir: Path) -> RunningServers | None:
    """The embedded servers running on ``data_dir`` (started by another process), or None.

    Starts, locks and changes nothing: the pid in the data dir's lock file must be alive and both
    servers must accept connections on their sockets. Raises ``EmbeddedError`` if they run but their secret
    cannot be read (another user's data dir).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    owner = datadir.read_pid(data_dir / datadir.LOCK_FILE)
    if owner is None or not pid_alive(owner):
        return None
    _run_dir, pg_connect_dir, valkey_socket = datadir.socket_dirs(data_dir)
    if not (datadir.listening(pg_connect_dir / PG_SOCKET) and datadir.listening(valkey_socket)):
        return None
    secret = datadir.read_secret(data_dir / SECRET_FILE)
    if secret is None:
        return None
    database_url, redis_url, redis_client_url = _urls(secret, pg_connect_dir, valkey_socket)
    return RunningServers(
        data_dir=data_dir,
        owner_pid=owner,
        database_url=database_url,
        redis_url=redis_url,
        redis_client_url=redis_client_url,
        pg_host=pg_connect_dir,
        pg_user=postgres.USER,
        pg_database=postgres.DATABASE_NAME,
        secret=secret,
    )


def mask_secret(text: str, servers: EmbeddedServers) -> str:
    """``text`` with the servers' secret replaced by ``***`` (for anything printed or logged)."""
    return text.replace(quote(servers._runtime.secret, safe=""), "***").replace(servers._runtime.secret, "***")


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
    """The mutable state behind an ``EmbeddedServers``: lock, secret, server handles, watchdog."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / datadir.PGDATA
        self.valkey_dir = data_dir / datadir.VALKEY_DIR
        self.run_dir, self.pg_connect_dir, self.valkey_socket = datadir.socket_dirs(data_dir)
        self.owner_pid = os.getpid()
        self.secret = ""
        self._mutex = threading.Lock()
        self._stopped = False
        self._lock_file: IO[str] | None = None
        self._pg: subprocess.Popen[bytes] | None = None
        self._valkey: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._pg_stage: tuple[Path, int] | None = None  # as root: see pg_install.stage_programs

    def start(self) -> None:
        global _atexit_registered
        self._lock_file = datadir.acquire_lock(self.data_dir)
        with _live_lock:
            _live.add(self)
            if not _atexit_registered:
                atexit.register(_stop_all_at_exit)
                _atexit_registered = True
        # Servers left running by an earlier owner that died with its watchdog: stop both before
        # starting either, so a failing start does not leave one of them behind.
        postgres.clear_previous(self.pgdata)
        valkey.clear_previous(self.valkey_dir, self.valkey_socket)
        if self.run_dir is not None:
            datadir.private_dir(self.run_dir)
            link = self.run_dir / datadir.PGDATA
            link.unlink(missing_ok=True)
            link.symlink_to(self.pgdata, target_is_directory=True)
        secret_file = self.data_dir / SECRET_FILE
        stored = datadir.read_secret(secret_file)
        self.secret = stored or secrets.token_urlsafe(32)
        account = pg_install.server_account()
        if account is not None:
            self._pg_stage = pg_install.stage_programs()
        pg_root = self._pg_stage[0] if self._pg_stage is not None else pg_install.wheel_root()
        self._pg = postgres.start(
            self.pgdata,
            account,
            self.secret,
            set_password=stored is None,
            connect_dir=self.pg_connect_dir,
            bin_dir=pg_install.bin_dir(pg_root),
        )
        if stored is None:  # only once PostgreSQL has it, so a failed start never strands a secret
            datadir.write_private(secret_file, self.secret + "\n")
        self._valkey = valkey.start(self.valkey_dir, self.valkey_socket, self.secret)
        self._watchdog = watchdog.start(
            self.data_dir,
            self.owner_pid,
            [
                # postmaster: SIGINT = fast shutdown, then SIGQUIT = immediate shutdown (crash recovery next start)
                (self._pg.pid, signal.SIGINT, signal.SIGQUIT),
                # valkey: SIGTERM = shutdown after fsyncing the AOF, then SIGKILL
                (self._valkey.pid, signal.SIGTERM, signal.SIGKILL),
            ],
            # The data dir (and the staged programs) stay locked until the watchdog is done.
            keep_fds=(self._lock_file.fileno(), *([self._pg_stage[1]] if self._pg_stage else [])),
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
                    valkey.stop(self._valkey, self.valkey_socket)
                except Exception as exc:
                    errors.append(f"Valkey: {exc}")
            if self._pg is not None:
                try:
                    postgres.stop(self._pg)
                except Exception as exc:
                    errors.append(f"PostgreSQL: {exc}")
            if self._watchdog is not None:
                watchdog.dismiss(self._watchdog, clean=not errors)
            if self._pg_stage is not None:
                pg_install.remove_stage(*self._pg_stage)
            if self.run_dir is not None:
                with contextlib.suppress(OSError):
                    (self.run_dir / datadir.PGDATA).unlink(missing_ok=True)
                    self.run_dir.rmdir()
            datadir.release_lock(self._lock_file)
            with _live_lock:
                _live.discard(self)
        if errors and not quiet:
            raise EmbeddedError(f"stopping the embedded servers in {self.data_dir} failed: " + "; ".join(errors))
