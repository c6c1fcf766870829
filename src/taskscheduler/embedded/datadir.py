"""The data directory of the embedded servers: its layout, its lock, the secret, private files and
folders, and where clients find the servers' sockets."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

from taskscheduler.embedded.errors import EmbeddedError
from taskscheduler.embedded.processes import pid_alive

if TYPE_CHECKING:
    from taskscheduler.embedded.pg_install import Account

_logger = logging.getLogger(__name__)

PGDATA = "postgres"  # PostgreSQL's data directory
VALKEY_DIR = "valkey"  # Valkey's working directory (its config, AOF and log)
SECRET_FILE = "secret"  # mode 0600
LOCK_FILE = "embedded.lock"  # the owner's pid; flock-ed while the servers run
WATCHDOG_LOG = "watchdog.log"
PG_SOCKET = ".s.PGSQL.5432"
VALKEY_SOCKET = "valkey.sock"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

_LOCK_WAIT_SEC = 30.0  # how long to wait for a dead owner's watchdog to finish stopping its servers


def acquire_lock(data_dir: Path) -> IO[str]:
    """Lock ``data_dir`` for this process (flock: also exclusive between two starts in one process)."""
    path = data_dir / LOCK_FILE
    lock_file = open(path, "a+")  # noqa: SIM115 - held open for the lifetime of the servers
    deadline = time.monotonic() + _LOCK_WAIT_SEC
    holder: int | None = None
    while True:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = read_pid(path)
            if holder is not None and pid_alive(holder):
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


def release_lock(lock_file: IO[str]) -> None:
    with contextlib.suppress(OSError, ValueError):
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.flush()
    with contextlib.suppress(OSError, ValueError):
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    lock_file.close()


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def read_secret(path: Path) -> str | None:
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


def write_private(path: Path, text: str, account: Account | None = None) -> None:
    """Write ``text`` to ``path`` with mode 0600 (owned by ``account`` if given)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with open(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # also when it existed with a looser mode
        if account is not None:
            os.fchown(f.fileno(), account.uid, account.gid)
        f.write(text)


def private_dir(path: Path) -> None:
    """Create ``path`` 0700, or accept an existing one only if it is ours and private (it is in /tmp)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise EmbeddedError(f"refusing to use {path} for sockets: not a private (0700) directory owned by us")


def _fits(socket_path: Path) -> bool:
    return len(os.fsencode(socket_path)) <= _MAX_SOCKET_PATH


def socket_dirs(data_dir: Path) -> tuple[Path | None, Path, Path]:
    """(short run dir or None, where clients find PostgreSQL's socket, Valkey's socket path).

    The sockets live in the servers' own 0700 directories in ``data_dir``. When that path is too
    long for a socket address (108 bytes with the NUL), clients go through a short private (0700)
    directory instead, named after a hash of the data dir: PostgreSQL's socket through a symlink to
    its data directory, Valkey's socket right there.
    """
    pgdata = data_dir / PGDATA
    valkey_socket = data_dir / VALKEY_DIR / VALKEY_SOCKET
    if _fits(pgdata / PG_SOCKET) and _fits(valkey_socket):
        return None, pgdata, valkey_socket
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    for base in (tempfile.gettempdir(), "/tmp"):
        run_dir = Path(base) / f"taskscheduler-{digest}"
        if _fits(run_dir / PGDATA / PG_SOCKET):
            return run_dir, run_dir / PGDATA, run_dir / VALKEY_SOCKET
    raise EmbeddedError(f"no short enough directory for the sockets of {data_dir}")


def listening(socket_path: Path) -> bool:
    """Whether a server accepts connections on the Unix socket ``socket_path`` (no data is sent)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False
    return True
