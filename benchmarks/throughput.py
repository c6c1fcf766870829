"""End-to-end throughput: N no-op tasks due now through our scheduler and workers, then the same N
no-op messages through raw Celery with the same worker processes and pool; both rates and the ratio.

    python -m benchmarks.throughput --tasks 20000
    python -m benchmarks.throughput --workers 2 --concurrency 1 --repeat 3
    python -m benchmarks.throughput --profile       # py-spy the scheduler and a worker (slower run)

The tasks are inserted with one INSERT ... SELECT generate_series (not timed). Ours is timed from
the scheduler's start to the last `finished_at`; raw Celery from the publisher's start to the last
message run. "steady" is the rate between the 10th and the 90th percentile of completions, which
leaves out process start-up and the tail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from tests import harness
from tests.harness import Proc, wait_until
from tools import profile_report

from benchmarks import common
from benchmarks.raw_celery import QUEUE as RAW_QUEUE

SMOKE_TASKS = 300


# ---------------------------------------------------------------------------------------- database


def db_counters(pdb: common.PrivateDatabase) -> dict[str, int]:
    with pdb.connect(autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_fetched, blks_hit, blks_read"
            " FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        assert row is not None
        keys = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_fetched", "blks_hit", "blks_read")
        out = dict(zip(keys, (int(v) for v in row), strict=True))
        for rel, seq_scan, seq_read, hot in conn.execute(
            "SELECT relname, seq_scan, seq_tup_read, n_tup_hot_upd FROM pg_stat_user_tables"
        ).fetchall():
            out[f"{rel}.seq_scan"] = int(seq_scan)
            out[f"{rel}.seq_tup_read"] = int(seq_read)
            out[f"{rel}.hot_updates"] = int(hot)
        for index, scans, tup_read in conn.execute(
            "SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes"
        ).fetchall():
            out[f"{index}.scans"] = int(scans)
            out[f"{index}.tup_read"] = int(tup_read)
    return out


def republished_count(conn: Any) -> int:
    """Tasks whose message the lost-message sweep published again (published_at moved after dispatch)."""
    row = conn.execute(
        """
        SELECT count(*) FROM tasks t
        JOIN task_events e ON e.task_id = t.id AND e.to_status = 'ENQUEUED' AND e.attempt = t.attempt
        WHERE t.published_at > e.at + interval '1 second'
        """
    ).fetchone()
    return int(row[0]) if row else 0


# ------------------------------------------------------------------------------------------ py-spy


@dataclass
class Profiler:
    name: str
    popen: subprocess.Popen[bytes]
    path: Path

    def stop(self) -> Path | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.path if self.path.exists() else None


def start_profiler(name: str, pid: int, out_dir: Path, *, subprocesses: bool, rate: int = 250) -> Profiler | None:
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        print("py-spy is not installed (pip install py-spy): no profile", file=sys.stderr)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.collapsed.txt"
    argv = [str(exe), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(path)]
    argv += ["--nonblocking"] + (["--subprocesses"] if subprocesses else [])
    popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Profiler(name=name, popen=popen, path=path)


# --------------------------------------------------------------------------------------------- ours


def _rates(n: int, *, started: float, first: float, last: float, p10: float, p90: float) -> dict[str, float]:
    """Rates of `n` tasks from `started`, the first run at `first`, the last finished at `last`; "steady"
    is the rate between the 10th and the 90th percentile of completions."""
    return {
        "tasks": n,
        "seconds": last - started,
        "rate": n / (last - started),
        "rate_from_first_dispatch": n / (last - first),
        "startup_seconds": first - started,
        "steady_rate": 0.8 * n / (p90 - p10) if p90 > p10 else float("nan"),
    }


def _trees(procs: list[Proc]) -> list[psutil.Process]:
    return [p for proc in procs for p in proc.tree()]


def run_ours(
    run: common.Run,
    *,
    n: int,
    workers: int,
    concurrency: int,
    timeout: float,
    profile_dir: Path | None = None,
    insert: bool = True,
) -> dict[str, Any]:
    """Run `n` due tasks (inserted here, or already there when `insert` is false) to SUCCEEDED."""
    pdb = run.pdb
    load_before = os.getloadavg()
    if insert:
        with pdb.connect(autocommit=True) as conn:
            conn.execute("TRUNCATE tasks, task_events, dlq_events RESTART IDENTITY")
        common.insert_due_tasks(pdb, n)
    profilers: list[Profiler] = []
    with run.processes() as procs:
        try:
            worker_procs = procs.workers(workers, concurrency)
            scheduler: list[Proc] = []
            tracker = common.CpuTracker(
                {
                    "scheduler": lambda: _trees(scheduler),
                    "workers": lambda: _trees(worker_procs),
                    "postgres": common.postgres_backends(pdb.name),
                    "postgres_server_shared": common.postgres_server_processes(pdb),
                    "redis_server_shared": common.redis_server_processes,
                }
            )
            before = db_counters(pdb)
            tracker.start()
            scheduler.append(procs.cli("scheduler", "scheduler"))
            t0 = scheduler[0].started_at
            if profile_dir is not None:
                for prof in (
                    start_profiler("scheduler", scheduler[0].pid, profile_dir, subprocesses=False),
                    start_profiler("worker", worker_procs[0].pid, profile_dir, subprocesses=True),
                ):
                    if prof is not None:
                        profilers.append(prof)
            with pdb.connect(autocommit=True) as conn:
                polls = common.wait_succeeded(conn, n, procs, timeout=timeout, interval=0.25)
                cpu = tracker.stop()
                row = conn.execute(
                    """
                    SELECT extract(epoch FROM min(published_at)), extract(epoch FROM max(finished_at)),
                           extract(epoch FROM percentile_disc(0.1) WITHIN GROUP (ORDER BY finished_at)),
                           extract(epoch FROM percentile_disc(0.9) WITHIN GROUP (ORDER BY finished_at)),
                           count(*) FILTER (WHERE attempt > 1), count(*)
                    FROM tasks
                    """
                ).fetchone()
                statuses = dict(conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())
                republished = republished_count(conn)
        finally:
            for prof in profilers:
                prof.stop()
        procs.stop_all()  # before the counters are read
    time.sleep(1.0)  # let the backends' statistics reach pg_stat_database
    after = db_counters(pdb)
    assert row is not None
    first_dispatch, last_finish, p10, p90, redispatched, total = (float(v) if v is not None else 0.0 for v in row)
    counters = {k: after[k] - before[k] for k in before if after.get(k, 0) != before[k]}
    counters["xact_commit"] -= polls + 2  # the benchmark's own polls and snapshots
    result: dict[str, Any] = {
        **_rates(n, started=t0, first=first_dispatch, last=last_finish, p10=p10, p90=p90),
        "load_avg_before": load_before,
        "statuses": statuses,
        "redispatched": int(redispatched),
        "republished_by_lost_message_sweep": republished,
        "cpu_seconds": cpu,
        "cpu_seconds_per_1000": common.per_1000(cpu, n),
        "db_per_task": {k: v / n for k, v in counters.items()},
    }
    assert int(total) == n
    if profilers:
        result["profiles"] = {p.name: str(p.path) for p in profilers if p.path.exists()}
        result["profile_summary"] = {p.name: profile_report.report(p.path) for p in profilers if p.path.exists()}
    return result


# ---------------------------------------------------------------------------------------- raw Celery


def run_raw(
    run: common.Run, *, n: int, workers: int, concurrency: int, timeout: float, time_limits: bool = False
) -> dict[str, Any]:
    """`n` no-op messages through raw Celery (benchmarks/raw_celery.py) with the same pool as ours."""
    load_before = os.getloadavg()
    log_level = run.args.log_level
    done_key = f"{run.prefix}rawbench:done"  # raw_celery.DONE_KEY in the worker's environment
    with harness.redis_client(run.redis_url) as client, run.processes() as procs:
        client.delete(done_key)
        worker_argv = [sys.executable, "-m", "celery", "-A", "benchmarks.raw_celery", "worker", f"--queues={RAW_QUEUE}",
                       f"--concurrency={concurrency}", "--pool=prefork", f"--loglevel={log_level}",
                       "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        worker_procs = [
            procs.start(f"raw-worker{i}", [*worker_argv, f"--hostname=raw{i}-{common.run_id()}@%h"])
            for i in range(workers)
        ]
        procs.wait_ready(worker_procs)
        publisher: list[Proc] = []
        tracker = common.CpuTracker(
            {
                "publisher": lambda: _trees(publisher),
                "workers": lambda: _trees(worker_procs),
                "redis_server_shared": common.redis_server_processes,
            }
        )
        tracker.start()
        argv = [sys.executable, "-m", "benchmarks.raw_celery", "publish", str(n)]
        publisher.append(procs.start("publisher", argv + (["--time-limits"] if time_limits else [])))
        t0 = publisher[0].started_at
        samples: list[tuple[float, int]] = []

        def all_done() -> bool:
            procs.check_alive(worker_procs)
            count = int(client.get(done_key) or 0)
            samples.append((time.time(), count))
            return count >= n

        wait_until(all_done, timeout=timeout, interval=0.01, what=f"{n} raw Celery messages run")
        cpu = tracker.stop()
        publisher[0].popen.wait(30)
        client.delete(done_key)
    t_end = samples[-1][0]
    first = next(t for t, c in samples if c > 0)
    t10 = next(t for t, c in samples if c >= 0.1 * n)
    t90 = next(t for t, c in samples if c >= 0.9 * n)
    return {
        **_rates(n, started=t0, first=first, last=t_end, p10=t10, p90=t90),
        "load_avg_before": load_before,
        "time_limits": time_limits,
        "cpu_seconds": cpu,
        "cpu_seconds_per_1000": common.per_1000(cpu, n),
    }


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (`taskscheduler worker`), each")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork pool size of each worker")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the median is reported")
    parser.add_argument("--timeout", type=float, default=0.0, help="give up after this long (default: from N)")
    parser.add_argument("--profile", action="store_true", help="record py-spy profiles of the scheduler and a worker")
    parser.add_argument("--raw-time-limits", action="store_true", help="raw messages carry a hard limit, as ours")
    parser.add_argument("--skip-raw", action="store_true", help="only ours (no ratio)")
    parser.add_argument("--skip-ours", action="store_true", help="only raw Celery (no ratio)")
    args = parser.parse_args(argv)
    n = SMOKE_TASKS if args.smoke else args.tasks
    timeout = args.timeout or max(120.0, n / 50)
    sizes = {"n": n, "workers": args.workers, "concurrency": args.concurrency, "timeout": timeout}
    ours_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    profile_dir = args.results_dir / f"profiles-{common.run_id()}" if args.profile else None
    with common.run("throughput", args) as run:
        for i in range(args.repeat):
            if args.wait_quiet and i:
                common.wait_quiet(args.wait_quiet)
            if not args.skip_raw:
                raw_runs.append(run_raw(run, **sizes, time_limits=args.raw_time_limits))
                print(f"run {i + 1}: raw Celery {raw_runs[-1]['rate']:,.0f} tasks/s", flush=True)
            if not args.skip_ours:
                ours_runs.append(run_ours(run, **sizes, profile_dir=profile_dir if i == 0 else None))
                print(f"run {i + 1}: ours {ours_runs[-1]['rate']:,.0f} tasks/s", flush=True)

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return common.median([r[key] for r in runs]) if runs else float("nan")

    measures = ("seconds", "rate", "rate_from_first_dispatch", "steady_rate", "startup_seconds")
    rows = [
        (label, n, *(med(runs, m) for m in measures))
        for label, runs in (("ours", ours_runs), ("raw Celery", raw_runs))
        if runs
    ]
    both = bool(raw_runs and ours_runs)
    ratio = med(ours_runs, "rate") / med(raw_runs, "rate") if both else float("nan")
    ratio_steady = med(ours_runs, "steady_rate") / med(raw_runs, "steady_rate") if both else float("nan")
    title = (
        f"Throughput: {n:,} no-op tasks, {args.workers} worker(s) x prefork {args.concurrency}, "
        f"median of {args.repeat}{' (PROFILED: py-spy running)' if args.profile else ''}"
    )
    common.print_table(
        title, ["system", "tasks", "seconds", "tasks/s", "from 1st dispatch", "steady tasks/s", "startup s"], rows
    )
    common.print_table(
        "Ratio ours / raw Celery", ["measure", "ratio"], [("tasks/s", ratio), ("steady tasks/s", ratio_steady)]
    )
    cpu_rows = []
    for label, runs in (("ours", ours_runs), ("raw Celery", raw_runs)):
        for role in runs[0]["cpu_seconds_per_1000"] if runs else []:
            values = [r["cpu_seconds_per_1000"][role] for r in runs]
            cpu_rows.append((label, role, common.median(values)))
    common.print_table("CPU seconds per 1,000 tasks", ["system", "process", "cpu s / 1000"], cpu_rows)
    if ours_runs:
        print(
            "ours: tasks published twice by the lost-message sweep (ENQUEUED longer than ENQUEUE_TIMEOUT_SEC): "
            f"{ours_runs[-1]['republished_by_lost_message_sweep']:,} of {n:,}\n"
        )
        per_task = ours_runs[-1]["db_per_task"]
        common.print_table("PostgreSQL work per task (ours)", ["counter", "per task"], list(per_task.items()))
    for ours in ours_runs:
        for name, summary in ours.get("profile_summary", {}).items():
            profile_report.print_report(name, summary)

    params = {"tasks": n, "workers": args.workers, "concurrency": args.concurrency, "pool": "prefork",
              "repeat": args.repeat, "raw_time_limits": args.raw_time_limits}  # fmt: skip
    return run.write(
        params,
        profiled=args.profile,
        ours={"median_rate": med(ours_runs, "rate"), "median_steady_rate": med(ours_runs, "steady_rate"),
              "runs": ours_runs},
        raw_celery={"median_rate": med(raw_runs, "rate"), "median_steady_rate": med(raw_runs, "steady_rate"),
                    "runs": raw_runs},
        ratio=ratio,
        ratio_steady=ratio_steady,
    )  # fmt: skip


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
