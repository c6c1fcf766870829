"""The embedded PostgreSQL: initdb on first use, our pg_hba.conf and password, start, stop, and the
orphans of an owner that died.

It listens on no TCP port, only on a Unix socket in its 0700 data directory, and asks every
connection for the password (SCRAM). As root it runs as ``pg_install``'s account, which owns only the
data directory and reaches it through its working directory (``-D /proc/self/cwd``), so no parent
directory is changed or needs to be searchable by it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from taskscheduler.embedded import processes
from taskscheduler.embedded.datadir import PG_SOCKET, SECRET_FILE, write_private
from taskscheduler.embedded.errors import EmbeddedError
from taskscheduler.embedded.pg_install import Account

_logger = logging.getLogger(__name__)

DATABASE_NAME = "taskscheduler"
USER = "postgres"  # the superuser initdb creates (`-U postgres`); password (SCRAM) auth

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


def _data_arg(pgdata: Path) -> str:
    """How the server names its data directory: the directory we start it in (see _run)."""
    # /proc/self/cwd reaches the process's working directory without a lookup of its ancestors,
    # so the server's account needs no search permission on the parents of the data dir (which may
    # be root's 0700 home): we never change their modes.
    return "/proc/self/cwd" if sys.platform.startswith("linux") else str(pgdata)


def _run(
    args: list[str], pgdata: Path, account: Account | None, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program in ``pgdata`` as the server's account."""
    kwargs = account.popen_kwargs() if account is not None else {}
    try:
        return subprocess.run(
            args, cwd=pgdata, input=input_text, capture_output=True, text=True, timeout=120, check=False, **kwargs
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedError(f"could not run {Path(args[0]).name} for {pgdata}: {exc}") from exc


def _check(result: subprocess.CompletedProcess[str], what: str, account: Account | None) -> None:
    if result.returncode == 0:
        return
    hint = f"\n(PostgreSQL runs as {account.name!r})" if account is not None else ""
    raise EmbeddedError(f"{what} failed with code {result.returncode}:\n{result.stdout}{result.stderr}{hint}")


def _prepare(pgdata: Path, account: Account | None, secret: str, set_password: bool, bin_dir: Path) -> None:
    """initdb on first use, our pg_hba.conf, and the superuser's password when it is new."""
    with contextlib.suppress(FileExistsError):
        pgdata.mkdir(mode=0o700)
    if account is not None:
        os.chown(pgdata, account.uid, account.gid)
    os.chmod(pgdata, 0o700)
    settings = [arg for setting in _PG_SETTINGS for arg in ("-c", setting)]
    if not (pgdata / "PG_VERSION").exists():
        # initdb's own trust is never served: pg_hba.conf is replaced below, before any server starts.
        init = [str(bin_dir / "initdb"), "-D", _data_arg(pgdata), "-U", USER, "--encoding=utf8", "--auth=trust"]
        _check(_run(init, pgdata, account), f"initdb in {pgdata}", account)
        set_password = True
    write_private(pgdata / "pg_hba.conf", _HBA, account)
    if set_password:
        # Single-user mode reads the statement from stdin: the secret is in no argv and no file the
        # account can read. token_urlsafe needs no quoting in a SQL literal.
        single = [str(bin_dir / "postgres"), "--single", "-D", _data_arg(pgdata), *settings, "postgres"]
        result = _run(single, pgdata, account, input_text=f"ALTER ROLE {USER} PASSWORD '{secret}'\n")
        # An error report repeats the statement: keep the secret out of our message.
        out, err = result.stdout.replace(secret, "***"), result.stderr.replace(secret, "***")
        failed = int(bool(result.returncode) or "ERROR" in out + err)
        masked = subprocess.CompletedProcess(result.args, failed, out, err)
        _check(masked, f"setting the PostgreSQL password in {pgdata}", account)


def start(
    pgdata: Path, account: Account | None, secret: str, set_password: bool, connect_dir: Path, bin_dir: Path
) -> subprocess.Popen[bytes]:
    """Start the postmaster in ``pgdata`` (socket in ``pgdata``, reached by clients at ``connect_dir``)."""
    import psycopg

    _prepare(pgdata, account, secret, set_password, bin_dir)
    settings = [arg for setting in _PG_SETTINGS for arg in ("-c", setting)]
    log_path = pgdata / "log"
    kwargs = account.popen_kwargs() if account is not None else {}
    with open(log_path, "ab") as log:
        log_offset = log.tell()
        proc = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", _data_arg(pgdata), *settings],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=pgdata,
            start_new_session=True,  # as Valkey: a terminal Ctrl-C must not stop it before the workers
            **kwargs,
        )
    refusal = ""

    def serving() -> bool:
        nonlocal refusal
        try:
            _ensure_database(connect_dir, secret)
        except psycopg.OperationalError as exc:
            if "password authentication failed" in str(exc):
                raise EmbeddedError(
                    f"PostgreSQL in {pgdata} refused the password in {pgdata.parent / SECRET_FILE}; "
                    "delete that file to set a new one at the next start"
                ) from None
            refusal = str(exc)
            return False
        return True

    try:
        if not processes.wait_serving(proc, "PostgreSQL", log_path, log_offset, serving, poll_sec=0.05):
            raise EmbeddedError(
                f"PostgreSQL in {pgdata} did not accept connections within {processes.START_TIMEOUT_SEC}s: {refusal}"
            )
    except BaseException:
        stop(proc)
        raise
    return proc


def _ensure_database(connect_dir: Path, secret: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=str(connect_dir),
        user=USER,
        password=secret,
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE_NAME)))


def clear_previous(pgdata: Path) -> None:
    """Make sure no previous server runs on ``pgdata`` and no stale lock files are left.

    Only called while we hold the data-dir lock, so any postgres still working in ``pgdata`` was
    started by an earlier owner of this directory that died together with its watchdog.
    """
    pid_file = pgdata / "postmaster.pid"
    procs = processes.working_in(pgdata, "postgres")
    if procs:
        pid = _read_first_int(pid_file)
        postmaster = [p for p in procs if p.pid == pid] or procs
        _logger.warning(
            "stopping PostgreSQL left running in %s by a previous owner (pids %s)", pgdata, [p.pid for p in procs]
        )
        processes.signal_and_wait(postmaster, signal.SIGINT, signal.SIGQUIT)
        processes.signal_and_wait(processes.working_in(pgdata, "postgres"), signal.SIGQUIT, signal.SIGKILL)
    if not pid_file.exists():
        return
    # No postgres works in pgdata now, so postmaster.pid is stale. PostgreSQL itself copes with a dead
    # pid in it, but not with the pid since reused by another process (usual after a container
    # restart), and it cannot parse one cut short by a kill during startup. The socket's lock file
    # (in pgdata too) has the same pid problem. Remove them.
    _logger.info("removing stale %s", pid_file)
    for stale in (pid_file, pgdata / PG_SOCKET, pgdata / f"{PG_SOCKET}.lock"):
        stale.unlink(missing_ok=True)


def _read_first_int(path: Path) -> int | None:
    try:
        first = path.read_text(errors="replace").split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # fast shutdown: roll back sessions, checkpoint, exit
        try:
            proc.wait(timeout=processes.STOP_TIMEOUT_SEC)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown: crash recovery at the next start
            proc.wait()
            raise EmbeddedError(
                f"PostgreSQL (pid {proc.pid}) ignored SIGINT for {processes.STOP_TIMEOUT_SEC}s"
            ) from None
