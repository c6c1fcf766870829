"""What every benchmark shares: a private database and Redis key space, processes started with the
`taskscheduler` CLI, CPU accounting, percentiles, the printed table and the JSON result."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
from sqlalchemy.engine import make_url

from taskscheduler.config import normalize_database_url, redis_client_url

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
CLI = shutil.which("taskscheduler", path=str(Path(sys.executable).parent)) or "taskscheduler"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Environment a benchmark never passes on to the processes it starts (it sets its own).
_OWN_ENV = ("DATABASE_URL", "REDIS_URL", "REDIS_KEY_PREFIX", "FAULT_POINT", "API_PORT", "API_HOST", "API_KEYS")


def run_id() -> str:
    return uuid.uuid4().hex[:8]


# ---------------------------------------------------------------------------------------------- args


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--admin-database-url",
        default=os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL") or DEFAULT_ADMIN_URL,
        help="any database on the server; the benchmark creates and drops its own (default: "
        "TEST_DATABASE_URL, DATABASE_URL, else the local server)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("TEST_REDIS_URL") or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL,
        help="Redis to use; every key the run makes carries a private prefix and is deleted afterwards",
    )
    parser.add_argument("--redis-key-prefix", default="", help="prefix for this run's Redis keys (default: random)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks the benchmark works")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON result goes")
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of the processes under test (default INFO)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (path printed)")
    parser.add_argument(
        "--setup-sql",
        action="append",
        default=[],
        help="SQL run on the private database after the migrations, to try a schema variant "
        "(e.g. 'DROP INDEX tasks_status_created_idx'); repeatable",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each timed run, wait up to this long for the 1-minute load average to fall below 0.5",
    )
    return parser


def wait_quiet(max_wait: float, threshold: float = 0.5) -> float:
    """Wait (at most `max_wait` s) for other work on the machine to stop; returns the load seen."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------ servers


def libpq_url(url: str) -> str:
    return normalize_database_url(url).replace("postgresql+psycopg://", "postgresql://", 1)


@dataclass
class PrivateDatabase:
    """A database created for one run (and dropped afterwards), with the schema migrated."""

    admin_url: str
    name: str
    url: str = ""  # SQLAlchemy URL of the private database

    @property
    def libpq(self) -> str:
        return libpq_url(self.url)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.libpq, **kwargs)


@contextlib.contextmanager
def private_database(
    admin_url: str, kind: str, *, migrate: bool = True, setup_sql: Sequence[str] = ()
) -> Iterator[PrivateDatabase]:
    admin_libpq = libpq_url(admin_url)
    name = f"tsbench_{kind}_{run_id()}"
    with psycopg.connect(admin_libpq, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(normalize_database_url(admin_url)).set(database=name).render_as_string(False)
    pdb = PrivateDatabase(admin_url=admin_url, name=name, url=url)
    try:
        if migrate:
            from taskscheduler.migrations import run_migrations

            run_migrations(url)
        if setup_sql:
            with pdb.connect(autocommit=True) as conn:
                for statement in setup_sql:
                    conn.execute(statement)  # type: ignore[arg-type]
        yield pdb
    finally:
        from taskscheduler.store import db as store_db

        store_db.dispose_engines()
        with psycopg.connect(admin_libpq, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_client_url(redis_url), socket_connect_timeout=5)


def delete_redis_keys(redis_url: str, prefix: str) -> int:
    assert prefix, "refusing to delete every key"
    client = redis_client(redis_url)
    deleted = 0
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            deleted += client.delete(key)
    finally:
        client.close()
    return deleted


@contextlib.contextmanager
def private_redis_prefix(redis_url: str, given: str = "") -> Iterator[str]:
    prefix = given or f"tsbench-{run_id()}:"
    try:
        yield prefix
    finally:
        delete_redis_keys(redis_url, prefix)


def server_versions(pdb: PrivateDatabase | None, redis_url: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if pdb is not None:
        with pdb.connect() as conn:
            row = conn.execute("SHOW server_version").fetchone()
            out["postgresql"] = str(row[0]) if row else "?"
    try:
        client = redis_client(redis_url)
        info = client.info("server")
        out["redis"] = str(info.get("redis_version", "?"))
        if "valkey_version" in info:
            out["redis"] += f" (valkey {info['valkey_version']})"
        client.close()
    except redis.RedisError:
        out["redis"] = "?"
    return out


# ---------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float  # time.time() just before the process was started
    log_level: str = "INFO"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to its process group (it was started in its own session), then SIGKILL."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.popen.wait(5)
        self.signal_group(signal.SIGKILL)  # pool children left behind, if any

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


@dataclass
class Processes:
    """The processes a benchmark starts; each in its own session so it can be stopped whole."""

    env: dict[str, str]
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    @classmethod
    def for_run(cls, *, database_url: str, redis_url: str, prefix: str, log_level: str, **extra: str) -> Processes:
        env = {k: v for k, v in os.environ.items() if k not in _OWN_ENV}
        env.update(
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            REDIS_KEY_PREFIX=prefix,
            LOG_LEVEL=log_level,
            # The processes run the code of this checkout (its src/ first, then the benchmarks).
            PYTHONPATH=os.pathsep.join(p for p in (_src_dir(), str(REPO), env.get("PYTHONPATH", "")) if p),
        )
        env.update(extra)
        return cls(env=env, log_dir=Path(tempfile.mkdtemp(prefix="tsbench-logs-")))

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}-{len(self.procs)}.log"
        started_at = time.time()
        with log_path.open("wb") as out:
            popen = subprocess.Popen(
                list(argv),
                env={**self.env, **(env or {})},
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        level = {**self.env, **(env or {})}.get("LOG_LEVEL", "INFO")
        proc = Proc(name=name, popen=popen, log_path=log_path, started_at=started_at, log_level=level)
        self.procs.append(proc)
        return proc

    def cli(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        return self.start(name, [CLI, *args], env)

    def api(self, port: int) -> Proc:
        """`taskscheduler api` on 127.0.0.1:`port`, once its /healthz answers."""
        import httpx

        api = self.cli("api", "api", "--host", "127.0.0.1", "--port", str(port))

        def up() -> bool:
            if not api.alive():
                raise RuntimeError(f"api exited:\n{api.log()[-3000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=60, interval=0.2, what="the api")
        return api

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def dump(self, tail: int = 3000) -> str:
        return "\n".join(f"===== {p.name} (pid {p.pid}) =====\n{p.log()[-tail:]}" for p in self.procs)

    def cleanup(self, keep: bool) -> None:
        self.stop_all()
        if keep:
            print(f"logs kept in {self.log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def _src_dir() -> str:
    src = REPO / "src"
    return str(src) if (src / "taskscheduler").is_dir() else ""


def wait_until(condition: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_worker_ready(proc: Proc, timeout: float = 60) -> None:
    """Celery logs "ready." at INFO; above INFO, wait for its pool processes and give it a moment."""
    level = proc.log_level.upper() if proc.log_level else "INFO"
    if level in ("DEBUG", "INFO"):
        wait_until(lambda: "ready." in proc.log() or not proc.alive(), timeout=timeout, what=f"{proc.name} ready")
    else:
        wait_until(lambda: len(proc.tree()) > 1 or not proc.alive(), timeout=timeout, what=f"{proc.name} pool")
        time.sleep(3.0)
    if not proc.alive():
        raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")


# --------------------------------------------------------------------------------------------- CPU


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


class CpuTracker:
    """CPU seconds used by groups of processes between `start()` and `stop()`.

    Sampled in a thread, because Celery's pool children and PostgreSQL backends can come and go:
    a process first seen after `start()` counts from zero, one that exits keeps its last sample.
    """

    def __init__(self, groups: dict[str, Callable[[], Iterable[psutil.Process]]], interval: float = 0.25) -> None:
        self.groups = groups
        self.interval = interval
        self._base: dict[tuple[str, int, float], float] = {}
        self._last: dict[tuple[str, int, float], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    def _sample(self) -> None:
        for group, finder in self.groups.items():
            try:
                procs = list(finder())
            except psutil.Error:
                continue
            for p in procs:
                try:
                    key = (group, p.pid, p.create_time())
                    value = _cpu(p)
                except psutil.Error:
                    continue
                if key not in self._base:
                    self._base[key] = 0.0 if self._started else value
                self._last[key] = value

    def start(self) -> None:
        self._sample()
        self._started = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()
        out = dict.fromkeys(self.groups, 0.0)
        for key, last in self._last.items():
            out[key[0]] += last - self._base[key]
        return out


def postgres_backends(db_name: str) -> Callable[[], list[psutil.Process]]:
    """The server processes working for `db_name`: client backends and autovacuum workers."""
    needle = f" {db_name} "

    def find() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info.get("cmdline") or []) + " "
            if cmd.startswith("postgres:") and needle in cmd:
                out.append(p)
        return out

    return find


def postgres_server_processes(pdb: PrivateDatabase) -> Callable[[], list[psutil.Process]]:
    """The server's own processes (checkpointer, WAL writer, ...): shared by every database on it."""
    with pdb.connect() as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    try:
        postmaster = psutil.Process(int(row[0])).parent()
    except psutil.Error:
        postmaster = None

    def find() -> list[psutil.Process]:
        if postmaster is None:
            return []
        out: list[psutil.Process] = []
        for child in postmaster.children():
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if any(w in cmd for w in ("checkpointer", "background writer", "walwriter", "autovacuum launcher")):
                out.append(child)
        return out

    return find


def redis_server_processes() -> list[psutil.Process]:
    return [
        p for p in psutil.process_iter(["name"]) if (p.info.get("name") or "").startswith(("redis-server", "valkey"))
    ]


# -------------------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks, like numpy's default."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.5)


# ------------------------------------------------------------------------------------------ output


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    print(flush=True)
    return text


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    import celery
    import kombu
    import sqlalchemy

    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "load_avg_at_start": os.getloadavg(),
        "git_commit": _git("rev-parse", "--short", "HEAD") or os.environ.get("TSBENCH_SOURCE_COMMIT", ""),
        "git_dirty": bool(_git("status", "--porcelain", "src")),
        "source": str(REPO),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def write_result(results_dir: Path, kind: str, data: dict[str, Any]) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    data = {"benchmark": kind, "at": stamp, **data}
    data.setdefault("machine", machine())
    data["machine"]["load_avg_at_end"] = os.getloadavg()
    path = results_dir / f"{kind}-{stamp}-{run_id()}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    (results_dir / f"{kind}-latest.json").write_text(path.read_text())
    print(f"result written to {path}", flush=True)
    return path


def busy_warning() -> str | None:
    """Other work on the machine skews every figure; say so in the result."""
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        return f"1-minute load average was {load1:.2f} before the run: other work shares the CPUs"
    return None
