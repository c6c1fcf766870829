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

from benchmarks import common, profile_report
from benchmarks.raw_celery import QUEUE as RAW_QUEUE

SMOKE_TASKS = 300


# ---------------------------------------------------------------------------------------- database


def insert_due_tasks(pdb: common.PrivateDatabase, n: int, *, queue: str = "default", priority: int = 5) -> None:
    """N `demo_ok` tasks with an empty payload, due now, with their 'created' event rows."""
    with pdb.connect(autocommit=True) as conn:
        conn.execute("TRUNCATE tasks, task_events, dlq_events RESTART IDENTITY")
        with conn.transaction():
            conn.execute(
                """
                INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, max_retries)
                SELECT gen_random_uuid(), 'demo_ok', '{}'::jsonb, %(priority)s, %(queue)s, 'PENDING', now(), 3
                FROM generate_series(1, %(n)s)
                """,
                {"n": n, "queue": queue, "priority": priority},
            )
            conn.execute(
                "INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)"
                " SELECT id, NULL, 'PENDING', 0, 'created' FROM tasks"
            )
        conn.execute("VACUUM ANALYZE tasks, task_events")


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


def _worker_groups(procs: list[common.Proc]) -> list[psutil.Process]:
    return [p for proc in procs for p in proc.tree()]


def run_ours(
    *,
    pdb: common.PrivateDatabase,
    redis_url: str,
    prefix: str,
    n: int,
    workers: int,
    concurrency: int,
    log_level: str,
    timeout: float,
    keep_logs: bool = False,
    profile_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
    insert: bool = True,
) -> dict[str, Any]:
    """Run `n` due tasks (inserted here, or already there when `insert` is false) to SUCCEEDED."""
    load_before = os.getloadavg()
    if insert:
        insert_due_tasks(pdb, n)
    procs = common.Processes.for_run(
        database_url=pdb.url, redis_url=redis_url, prefix=prefix, log_level=log_level, **(extra_env or {})
    )
    ok = False
    profilers: list[Profiler] = []
    try:
        worker_procs = [
            procs.cli(f"worker{i}", "worker", "--queues", "default", "--concurrency", str(concurrency))
            for i in range(workers)
        ]
        for proc in worker_procs:
            common.wait_worker_ready(proc)
        scheduler: list[common.Proc] = []
        tracker = common.CpuTracker(
            {
                "scheduler": lambda: _worker_groups(scheduler),
                "workers": lambda: _worker_groups(worker_procs),
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
        polls = 0
        with pdb.connect(autocommit=True) as conn:

            def all_done() -> bool:
                nonlocal polls
                polls += 1
                for proc in (*scheduler, *worker_procs):
                    if not proc.alive():
                        raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
                row = conn.execute("SELECT count(*) FROM tasks WHERE status = 'SUCCEEDED'").fetchone()
                return bool(row and row[0] >= n)

            common.wait_until(all_done, timeout=timeout, interval=0.25, what=f"{n} tasks SUCCEEDED")
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
        for prof in profilers:
            prof.stop()
        procs.stop_all()
        time.sleep(1.0)  # let the backends' statistics reach pg_stat_database
        after = db_counters(pdb)
        ok = True
    finally:
        for prof in profilers:
            prof.stop()
        if not ok:
            print(procs.dump(), file=sys.stderr)
        procs.cleanup(keep_logs)
    assert row is not None
    first_dispatch, last_finish, p10, p90, redispatched, total = (float(v) if v is not None else 0.0 for v in row)
    counters = {k: after[k] - before[k] for k in before if after.get(k, 0) != before[k]}
    counters["xact_commit"] -= polls + 2  # the benchmark's own polls and snapshots
    result: dict[str, Any] = {
        "tasks": n,
        "load_avg_before": load_before,
        "statuses": statuses,
        "seconds": last_finish - t0,
        "rate": n / (last_finish - t0),
        "rate_from_first_dispatch": n / (last_finish - first_dispatch),
        "startup_seconds": first_dispatch - t0,
        "steady_rate": 0.8 * n / (p90 - p10) if p90 > p10 else float("nan"),
        "redispatched": int(redispatched),
        "republished_by_lost_message_sweep": republished,
        "cpu_seconds": cpu,
        "cpu_seconds_per_1000": {k: 1000 * v / n for k, v in cpu.items()},
        "db_per_task": {k: v / n for k, v in counters.items()},
    }
    assert int(total) == n
    if profilers:
        result["profiles"] = {p.name: str(p.path) for p in profilers if p.path.exists()}
        result["profile_summary"] = {p.name: profile_report.report(p.path) for p in profilers if p.path.exists()}
    return result


# ---------------------------------------------------------------------------------------- raw Celery


def run_raw(
    *,
    redis_url: str,
    prefix: str,
    n: int,
    workers: int,
    concurrency: int,
    log_level: str,
    timeout: float,
    keep_logs: bool = False,
    time_limits: bool = False,
) -> dict[str, Any]:
    load_before = os.getloadavg()
    done_key = f"{prefix}rawbench:done"  # raw_celery.DONE_KEY in the worker's environment
    client = common.redis_client(redis_url)
    client.delete(done_key)
    procs = common.Processes.for_run(database_url="", redis_url=redis_url, prefix=prefix, log_level=log_level)
    ok = False
    try:
        worker_procs = [
            procs.start(
                f"raw-worker{i}",
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "benchmarks.raw_celery",
                    "worker",
                    f"--queues={RAW_QUEUE}",
                    f"--concurrency={concurrency}",
                    "--pool=prefork",
                    f"--hostname=raw{i}-{common.run_id()}@%h",
                    f"--loglevel={log_level}",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
            )
            for i in range(workers)
        ]
        for proc in worker_procs:
            common.wait_worker_ready(proc)
        publisher: list[common.Proc] = []
        tracker = common.CpuTracker(
            {
                "publisher": lambda: _worker_groups(publisher),
                "workers": lambda: _worker_groups(worker_procs),
                "redis_server_shared": common.redis_server_processes,
            }
        )
        tracker.start()
        argv = [sys.executable, "-m", "benchmarks.raw_celery", "publish", str(n)]
        publisher.append(procs.start("publisher", argv + (["--time-limits"] if time_limits else [])))
        t0 = publisher[0].started_at
        samples: list[tuple[float, int]] = []

        def all_done() -> bool:
            for proc in worker_procs:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
            count = int(client.get(done_key) or 0)
            samples.append((time.time(), count))
            return count >= n

        common.wait_until(all_done, timeout=timeout, interval=0.01, what=f"{n} raw Celery messages run")
        cpu = tracker.stop()
        publisher[0].popen.wait(30)
        ok = True
    finally:
        if not ok:
            print(procs.dump(), file=sys.stderr)
        procs.cleanup(keep_logs)
        client.delete(done_key)
        client.close()
    t_end = samples[-1][0]
    first = next(t for t, c in samples if c > 0)
    t10 = next(t for t, c in samples if c >= 0.1 * n)
    t90 = next(t for t, c in samples if c >= 0.9 * n)
    return {
        "tasks": n,
        "load_avg_before": load_before,
        "seconds": t_end - t0,
        "rate": n / (t_end - t0),
        "rate_from_first_dispatch": n / (t_end - first),
        "startup_seconds": first - t0,
        "steady_rate": 0.8 * n / (t90 - t10) if t90 > t10 else float("nan"),
        "time_limits": time_limits,
        "cpu_seconds": cpu,
        "cpu_seconds_per_1000": {k: 1000 * v / n for k, v in cpu.items()},
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
    warning = common.busy_warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    ours_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    profile_dir = args.results_dir / f"profiles-{common.run_id()}" if args.profile else None
    with (
        common.private_database(args.admin_database_url, "throughput", setup_sql=args.setup_sql) as pdb,
        common.private_redis_prefix(args.redis_url, args.redis_key_prefix) as prefix,
    ):
        versions = common.server_versions(pdb, args.redis_url)
        for i in range(args.repeat):
            if args.wait_quiet:
                common.wait_quiet(args.wait_quiet)
            if not args.skip_raw:
                raw_runs.append(
                    run_raw(
                        redis_url=args.redis_url,
                        prefix=prefix,
                        n=n,
                        workers=args.workers,
                        concurrency=args.concurrency,
                        log_level=args.log_level,
                        timeout=timeout,
                        keep_logs=args.keep_logs,
                        time_limits=args.raw_time_limits,
                    )
                )
                print(f"run {i + 1}: raw Celery {raw_runs[-1]['rate']:,.0f} tasks/s", flush=True)
            if args.skip_ours:
                continue
            ours_runs.append(
                run_ours(
                    pdb=pdb,
                    redis_url=args.redis_url,
                    prefix=prefix,
                    n=n,
                    workers=args.workers,
                    concurrency=args.concurrency,
                    log_level=args.log_level,
                    timeout=timeout,
                    keep_logs=args.keep_logs,
                    profile_dir=profile_dir if i == 0 else None,
                )
            )
            print(f"run {i + 1}: ours {ours_runs[-1]['rate']:,.0f} tasks/s", flush=True)

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return common.median([r[key] for r in runs]) if runs else float("nan")

    rows = []
    for label, runs in (("ours", ours_runs), ("raw Celery", raw_runs)):
        if runs:
            rows.append(
                (
                    label,
                    n,
                    med(runs, "seconds"),
                    med(runs, "rate"),
                    med(runs, "rate_from_first_dispatch"),
                    med(runs, "steady_rate"),
                    med(runs, "startup_seconds"),
                )
            )
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
    for run in ours_runs:
        for name, summary in run.get("profile_summary", {}).items():
            profile_report.print_report(name, summary)

    result = {
        "smoke": args.smoke,
        "profiled": args.profile,
        "warning": warning,
        "params": {
            "tasks": n,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "pool": "prefork",
            "repeat": args.repeat,
            "log_level": args.log_level,
            "raw_time_limits": args.raw_time_limits,
            "setup_sql": args.setup_sql,
        },
        "servers": versions,
        "ours": {
            "median_rate": med(ours_runs, "rate"),
            "median_steady_rate": med(ours_runs, "steady_rate"),
            "runs": ours_runs,
        },
        "raw_celery": {
            "median_rate": med(raw_runs, "rate"),
            "median_steady_rate": med(raw_runs, "steady_rate"),
            "runs": raw_runs,
        },
        "ratio": ratio,
        "ratio_steady": ratio_steady,
    }
    common.write_result(args.results_dir, "throughput", result)
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
