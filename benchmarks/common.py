"""What every benchmark shares, on top of the test harness (tests/harness.py): the command line, a
run's private database, Redis prefix and processes, CPU accounting, percentiles, the printed table
and the JSON result."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
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

import httpx
import psutil
import psycopg
import redis
from tests import harness
from tests.harness import CLI, Proc, wait_until

from taskscheduler.store.db import libpq_url

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
# Environment a benchmark never passes on to the processes it starts (it sets its own).
_OWN_ENV = ("DATABASE_URL", "REDIS_URL", "REDIS_KEY_PREFIX", "FAULT_POINT", "API_PORT", "API_HOST", "API_KEYS")


def run_id() -> str:
    return uuid.uuid4().hex[:8]


# ---------------------------------------------------------------------------------------------- args


def base_parser(description: str) -> argparse.ArgumentParser:
    database_url, redis_url = harness.given_server_urls()
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--admin-database-url",
        default=database_url or harness.LOCAL_DATABASE_URL,
        help="any database on the server; the benchmark creates and drops its own (default: "
        "TEST_DATABASE_URL, DATABASE_URL, else the local server)",
    )
    parser.add_argument(
        "--redis-url",
        default=redis_url or harness.LOCAL_REDIS_URL,
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


def busy_warning() -> str | None:
    """Other work on the machine skews every figure; say so in the result."""
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        return f"1-minute load average was {load1:.2f} before the run: other work shares the CPUs"
    return None


# ------------------------------------------------------------------------------------------ servers


@dataclass
class PrivateDatabase:
    """A database of one run (`harness.private_database`), with the schema migrated."""

    name: str
    url: str  # SQLAlchemy URL

    @property
    def libpq(self) -> str:
        return libpq_url(self.url)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.libpq, **kwargs)


@contextlib.contextmanager
def private_database(admin_url: str, kind: str, *, setup_sql: Sequence[str] = ()) -> Iterator[PrivateDatabase]:
    name = f"tsbench_{kind}_{run_id()}"
    with harness.private_database(admin_url, name) as url:
        pdb = PrivateDatabase(name=name, url=url)
        if setup_sql:
            with pdb.connect(autocommit=True) as conn:
                for statement in setup_sql:
                    conn.execute(statement)  # type: ignore[arg-type]
        yield pdb


def server_versions(pdb: PrivateDatabase, redis_url: str) -> dict[str, str]:
    out: dict[str, str] = {}
    with pdb.connect() as conn:
        row = conn.execute("SHOW server_version").fetchone()
        out["postgresql"] = str(row[0]) if row else "?"
    try:
        with harness.redis_client(redis_url) as client:
            info = client.info("server")
        out["redis"] = str(info.get("redis_version", "?"))
        if "valkey_version" in info:
            out["redis"] += f" (valkey {info['valkey_version']})"
    except redis.RedisError:
        out["redis"] = "?"
    return out


def insert_due_tasks(pdb: PrivateDatabase, n: int, *, per_second: float | None = None, lead_sec: float = 0.0) -> None:
    """`n` `demo_ok` tasks with an empty payload (`harness.insert_tasks`: due now, or spread at
    `per_second` from `lead_sec` on), then ANALYZE, so the plans are those of a table this full."""
    harness.insert_tasks(pdb.url, n, per_second=per_second, lead_sec=lead_sec)
    with pdb.connect(autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE tasks, task_events")


# ---------------------------------------------------------------------------------------------- run


@dataclass
class Run:
    """One benchmark run: its arguments, private database and Redis prefix, and what every result records."""

    kind: str
    args: argparse.Namespace
    pdb: PrivateDatabase
    prefix: str
    servers: dict[str, str]
    warning: str | None
    load_before: tuple[float, float, float]

    @property
    def redis_url(self) -> str:
        return str(self.args.redis_url)

    @contextlib.contextmanager
    def processes(self, **extra_env: str) -> Iterator[Processes]:
        """Processes for this run's servers; their logs are printed if the block fails, and every one
        is stopped when it ends."""
        procs = Processes.for_run(
            database_url=self.pdb.url,
            redis_url=self.redis_url,
            prefix=self.prefix,
            log_level=self.args.log_level,
            **extra_env,
        )
        try:
            yield procs
        except BaseException:
            print(procs.dump(), file=sys.stderr)
            raise
        finally:
            procs.cleanup(self.args.keep_logs)

    def write(self, params: dict[str, Any], **data: Any) -> dict[str, Any]:
        """The JSON result under --results-dir (and `<kind>-latest.json`), with the machine and run."""
        result = {
            "benchmark": self.kind,
            "at": dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ"),
            "smoke": self.args.smoke,
            "warning": self.warning,
            "load_avg_before": self.load_before,
            "params": {**params, "log_level": self.args.log_level, "setup_sql": self.args.setup_sql},
            "servers": self.servers,
            **data,
            "machine": {**machine(), "load_avg_at_end": os.getloadavg()},
        }
        results_dir: Path = self.args.results_dir
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{self.kind}-{result['at']}-{run_id()}.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        (results_dir / f"{self.kind}-latest.json").write_text(path.read_text())
        print(f"result written to {path}", flush=True)
        return result


@contextlib.contextmanager
def run(kind: str, args: argparse.Namespace) -> Iterator[Run]:
    """A run's private database (migrated, then --setup-sql) and Redis prefix, after waiting for a
    quiet machine when --wait-quiet asks; dropped and deleted when the block ends."""
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    warning = busy_warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    load_before = os.getloadavg()
    with (
        private_database(args.admin_database_url, kind, setup_sql=args.setup_sql) as pdb,
        harness.private_redis_prefix(args.redis_url, args.redis_key_prefix or f"tsbench-{run_id()}:") as prefix,
    ):
        servers = server_versions(pdb, args.redis_url)
        yield Run(kind, args, pdb, prefix, servers, warning, load_before)


# ---------------------------------------------------------------------------------------- processes


@dataclass
class Processes:
    """The processes a benchmark starts (`harness.start_process`: each in its own process group)."""

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

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        log_path = self.log_dir / f"{name}-{len(self.procs)}.log"
        proc = harness.start_process(name, argv, log_path=log_path, env=self.env, cwd=REPO)
        self.procs.append(proc)
        return proc

    def cli(self, name: str, *args: str) -> Proc:
        return self.start(name, [CLI, *args])

    def wait_ready(self, workers: Iterable[Proc], timeout: float = 60) -> None:
        for proc in workers:
            harness.wait_worker_ready(proc, timeout=timeout, log_level=self.env["LOG_LEVEL"])

    def workers(self, count: int, concurrency: int, queue: str = "default") -> list[Proc]:
        """`count` x `taskscheduler worker --queues QUEUE --concurrency N`, once each consumes."""
        procs = [
            self.cli(f"worker{i}", "worker", "--queues", queue, "--concurrency", str(concurrency)) for i in range(count)
        ]
        self.wait_ready(procs)
        return procs

    def scheduler(self) -> Proc:
        """`taskscheduler scheduler`, once it says it started (the line is not there above INFO)."""
        proc = self.cli("scheduler", "scheduler")
        if self.env["LOG_LEVEL"].upper() in ("DEBUG", "INFO"):
            wait_until(lambda: "scheduler started" in proc.log(), timeout=30, what="scheduler started")
        return proc

    def api(self, port: int) -> Proc:
        """`taskscheduler api` on 127.0.0.1:`port`, once its /healthz answers."""
        api = self.cli("api", "api", "--host", "127.0.0.1", "--port", str(port))

        def up() -> bool:
            self.check_alive([api])
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=60, interval=0.2, what="the api")
        return api

    def check_alive(self, procs: Iterable[Proc] | None = None) -> None:
        """Fail at once, with its log, if one of `procs` (default: all) has exited."""
        for proc in self.procs if procs is None else procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")

    def dump(self) -> str:
        return harness.dump_logs(self.procs, tail=3000)

    def stop_all(self) -> None:
        harness.stop_all(self.procs)

    def cleanup(self, keep: bool) -> None:
        self.stop_all()
        if keep:
            print(f"logs kept in {self.log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def _src_dir() -> str:
    src = REPO / "src"
    return str(src) if (src / "taskscheduler").is_dir() else ""


def wait_succeeded(conn: psycopg.Connection[Any], n: int, procs: Processes, *, timeout: float, interval: float) -> int:
    """Until `n` tasks are SUCCEEDED, failing at once if a process exits; returns the polls it made."""
    polls = 0

    def done() -> bool:
        nonlocal polls
        polls += 1
        procs.check_alive()
        row = conn.execute("SELECT count(*) FROM tasks WHERE status = 'SUCCEEDED'").fetchone()
        return bool(row and row[0] >= n)

    wait_until(done, timeout=timeout, interval=interval, what=f"{n} tasks SUCCEEDED")
    return polls


def per_1000(cpu_seconds: dict[str, float], tasks: int) -> dict[str, float]:
    return {k: 1000 * v / max(tasks, 1) for k, v in cpu_seconds.items()}


# --------------------------------------------------------------------------------------------- CPU


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def process_trees(procs: Iterable[Proc]) -> list[psutil.Process]:
    """Every process of each `proc`'s tree (a worker's pool processes with it), for a CpuTracker."""
    return [p for proc in procs for p in proc.tree()]


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
