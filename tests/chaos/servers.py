"""Private PostgreSQL and Redis servers for fault tests that stop or restart a server.

Each lives in a temporary folder on a free port and is stopped by the test that started it; the
machine's own servers are never touched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import psycopg
import redis

from tests.helpers import free_port

PG_BIN = Path(
    subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
    or "/usr/lib/postgresql/15/bin"
)


def _wait(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up in {timeout}s")
        time.sleep(0.1)


class PrivateRedis:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        _wait(lambda: redis.Redis.from_url(self.url).ping(), 20, "private redis")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # no persistence: everything in it is lost, as in a crash
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


class PrivatePostgres:
    """`initdb` + `pg_ctl` in a temporary folder, run as the postgres system user when we are root."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "pgdata"
        self.port = free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            pw = pwd.getpwnam("postgres")
            os.chown(folder, pw.pw_uid, pw.pw_gid)
            for parent in folder.parents:  # let the postgres user reach the folder
                if parent == Path("/"):
                    break
                parent.chmod(parent.stat().st_mode | 0o011)

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True, cwd=self.folder)

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c max_connections=200 -c fsync=off"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.folder / "pg.log"),
                  "-w", "start")  # fmt: skip
        _wait(lambda: psycopg.connect(self.admin_url, connect_timeout=2).close() is None, 30, "private postgres")

    def stop(self, mode: str = "immediate") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
