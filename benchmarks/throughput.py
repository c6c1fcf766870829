"""End-to-end throughput: N no-op tasks through our scheduler and workers against N no-op messages
through raw Celery at its best, on the same worker processes and pool, in the same run; the ratio.

    python -m benchmarks.throughput --tasks 20000
    python -m benchmarks.throughput --tasks 20000 --max-tasks-per-message 1
    python -m benchmarks.throughput --skip-ours --raw-prefetch 64     # tune the baseline
    python -m benchmarks.throughput --workers 2 --concurrency 1 --repeat 3
    python -m benchmarks.throughput --profile       # py-spy the scheduler and a worker (slower run)

Prefilled (the headline): ours gets its N tasks inserted due now with one INSERT ... SELECT
generate_series (not timed), and is timed from the scheduler's start to the last `finished_at`; raw
Celery gets its N messages published first (not timed), and is timed from its worker's start to the
last message run. Ours keeps its production settings (LOG_LEVEL INFO, prefetch 1 with
disable_prefetch, a hard time limit per message, no ack emulation); raw Celery runs with the
prefetch multiplier and log level that make it fastest (`--raw-prefetch`, `--raw-log-level`), no ack
emulation (`--raw-ack-emulation` for Celery's default) and no time limits.

With submission: ours takes its N tasks through `POST /tasks/batch` (a running `taskscheduler api`,
1,000 per request) while the scheduler and worker run, timed from the first request to the last
`finished_at`; raw Celery publishes with `apply_async` while its worker runs, timed from the first
publish to the last message run. "steady" is the rate between the 10th and the 90th percentile of
completions, which leaves out process start-up and the tail.
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

import httpx
from tests import harness
from tests.harness import Proc, free_port, wait_until
from tools import profile_report

from benchmarks import common
from benchmarks.raw_celery import PREFETCH_MULTIPLIER as RAW_PREFETCH
from benchmarks.raw_celery import QUEUE as RAW_QUEUE
from taskscheduler.api.schemas import MAX_BATCH
from taskscheduler.config import Settings

SMOKE_TASKS = 300
SMOKE_BATCH = 50
TASK_BODY = {"name": "demo_ok", "payload": {}}


def our_settings(log_level: str, max_tasks_per_message: int | None) -> dict[str, Any]:
    """What ours runs with: production settings, but for what the command line changed."""
    default = Settings.model_fields["max_tasks_per_message"].default
    return {
        "LOG_LEVEL": log_level,
        "MAX_TASKS_PER_MESSAGE": max_tasks_per_message or default,
        "worker_prefetch_multiplier": 1,
        "worker_disable_prefetch": True,
        "ack_emulation": False,
        "time_limits": "a hard limit on each message (from the tasks' timeouts)",
    }


def raw_settings(prefetch: int, log_level: str, time_limits: bool, ack_emulation: bool) -> dict[str, Any]:
    return {
        "log_level": log_level,
        "worker_prefetch_multiplier": prefetch,
        "worker_disable_prefetch": False,
        "ack_emulation": ack_emulation,
        "time_limits": "a hard limit on each message" if time_limits else "none",
    }


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


def run_ours(
    run: common.Run,
    *,
    n: int,
    workers: int,
    concurrency: int,
    timeout: float,
    profile_dir: Path | None = None,
    insert: bool = True,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `n` due tasks (inserted here, or already there when `insert` is false) to SUCCEEDED;
    `env`: settings of ours that differ from production (MAX_TASKS_PER_MESSAGE)."""
    pdb = run.pdb
    load_before = os.getloadavg()
    if insert:
        with pdb.connect(autocommit=True) as conn:
            conn.execute("TRUNCATE tasks, task_events, dlq_events RESTART IDENTITY")
        common.insert_due_tasks(pdb, n)
    profilers: list[Profiler] = []
    with run.processes(**(env or {})) as procs:
        try:
            worker_procs = procs.workers(workers, concurrency)
            scheduler: list[Proc] = []
            tracker = common.CpuTracker(
                {
                    "scheduler": lambda: common.process_trees(scheduler),
                    "workers": lambda: common.process_trees(worker_procs),
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


def run_ours_submitted(
    run: common.Run,
    *,
    n: int,
    workers: int,
    concurrency: int,
    timeout: float,
    batch: int,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`n` tasks through `POST /tasks/batch` while the api, scheduler and workers run, timed from the
    first request to the last `finished_at`. One task run first (not timed) has every process up."""
    pdb = run.pdb
    load_before = os.getloadavg()
    with pdb.connect(autocommit=True) as conn:
        conn.execute("TRUNCATE tasks, task_events, dlq_events RESTART IDENTITY")
    with run.processes(**(env or {})) as procs, httpx.Client(timeout=60) as http:
        port = free_port()
        api = procs.api(port)
        worker_procs = procs.workers(workers, concurrency)
        scheduler = procs.cli("scheduler", "scheduler")
        url = f"http://127.0.0.1:{port}/tasks/batch"
        http.post(url, json={"tasks": [TASK_BODY]}).raise_for_status()
        with pdb.connect(autocommit=True) as conn:
            common.wait_succeeded(conn, 1, procs, timeout=120, interval=0.1)
            tracker = common.CpuTracker(
                {
                    "api": api.tree,
                    "scheduler": scheduler.tree,
                    "workers": lambda: common.process_trees(worker_procs),
                    "postgres": common.postgres_backends(pdb.name),
                    "redis_server_shared": common.redis_server_processes,
                }
            )
            tracker.start()
            t0 = time.time()
            left = n
            while left:
                size = min(batch, left)
                http.post(url, json={"tasks": [TASK_BODY] * size}).raise_for_status()
                left -= size
            submitted = time.time()
            common.wait_succeeded(conn, n + 1, procs, timeout=timeout, interval=0.25)
            cpu = tracker.stop()
            row = conn.execute(
                """
                SELECT extract(epoch FROM min(started_at)), extract(epoch FROM max(finished_at)),
                       extract(epoch FROM percentile_disc(0.1) WITHIN GROUP (ORDER BY finished_at)),
                       extract(epoch FROM percentile_disc(0.9) WITHIN GROUP (ORDER BY finished_at))
                FROM tasks WHERE created_at >= to_timestamp(%s)
                """,
                (t0,),
            ).fetchone()
    assert row is not None
    first, last, p10, p90 = (float(v) for v in row)
    return {
        **_rates(n, started=t0, first=first, last=last, p10=p10, p90=p90),
        "submit_seconds": submitted - t0,
        "batch": batch,
        "load_avg_before": load_before,
        "cpu_seconds": cpu,
        "cpu_seconds_per_1000": common.per_1000(cpu, n),
    }


# ---------------------------------------------------------------------------------------- raw Celery


def run_raw(
    run: common.Run,
    *,
    n: int,
    workers: int,
    concurrency: int,
    timeout: float,
    prefilled: bool,
    prefetch: int = RAW_PREFETCH,
    log_level: str = "WARNING",
    time_limits: bool = False,
    ack_emulation: bool = False,
) -> dict[str, Any]:
    """`n` no-op messages through raw Celery (benchmarks/raw_celery.py) with the same pool as ours.

    `prefilled`: all published first (not timed), then timed from the workers' start; else the
    workers are started first and the timing starts with the first publish."""
    load_before = os.getloadavg()
    done_key = f"{run.prefix}rawbench:done"  # raw_celery.DONE_KEY in the worker's environment
    publish_argv = [sys.executable, "-m", "benchmarks.raw_celery", "publish", str(n)]
    publish_argv += ["--time-limits"] if time_limits else []
    with (
        harness.redis_client(run.redis_url) as client,
        run.processes(RAW_PREFETCH_MULTIPLIER=str(prefetch), RAW_ACK_EMULATION="1" if ack_emulation else "0") as procs,
    ):
        client.delete(done_key)
        worker_argv = [sys.executable, "-m", "celery", "-A", "benchmarks.raw_celery", "worker", f"--queues={RAW_QUEUE}",
                       f"--concurrency={concurrency}", "--pool=prefork", f"--loglevel={log_level}",
                       "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        publisher: list[Proc] = []
        worker_procs: list[Proc] = []
        if prefilled:
            publisher.append(procs.start("publisher", publish_argv))
            if publisher[0].popen.wait(timeout) != 0:
                raise RuntimeError(f"the raw publisher failed:\n{publisher[0].log()[-3000:]}")
        tracker = common.CpuTracker(
            {
                "publisher": lambda: common.process_trees(publisher) if not prefilled else [],
                "workers": lambda: common.process_trees(worker_procs),
                "redis_server_shared": common.redis_server_processes,
            }
        )
        if not prefilled:
            worker_procs += [
                procs.start(f"raw-worker{i}", [*worker_argv, f"--hostname=raw{i}-{common.run_id()}@%h"])
                for i in range(workers)
            ]
            for proc in worker_procs:
                harness.wait_worker_ready(proc, timeout=60, log_level=log_level)
        tracker.start()
        if prefilled:
            worker_procs += [
                procs.start(f"raw-worker{i}", [*worker_argv, f"--hostname=raw{i}-{common.run_id()}@%h"])
                for i in range(workers)
            ]
            t0 = worker_procs[0].started_at
        else:
            publisher.append(procs.start("publisher", publish_argv))
        samples: list[tuple[float, int]] = []

        def all_done() -> bool:
            procs.check_alive(worker_procs)
            count = int(client.get(done_key) or 0)
            samples.append((time.time(), count))
            return count >= n

        wait_until(all_done, timeout=timeout, interval=0.01, what=f"{n} raw Celery messages run")
        cpu = tracker.stop()
        if not prefilled:
            publisher[0].popen.wait(30)
            t0 = _publish_started(publisher[0])
        client.delete(done_key)
    t_end = samples[-1][0]
    first = next(t for t, c in samples if c > 0)
    t10 = next(t for t, c in samples if c >= 0.1 * n)
    t90 = next(t for t, c in samples if c >= 0.9 * n)
    return {
        **_rates(n, started=t0, first=first, last=t_end, p10=t10, p90=t90),
        "load_avg_before": load_before,
        "prefilled": prefilled,
        "settings": raw_settings(prefetch, log_level, time_limits, ack_emulation),
        "cpu_seconds": cpu,
        "cpu_seconds_per_1000": common.per_1000(cpu, n),
    }


def _publish_started(publisher: Proc) -> float:
    """When the publisher sent its first message (it prints it), after its own start-up."""
    for line in publisher.log().splitlines():
        if line.startswith("publishing from "):
            return float(line.split()[-1])
    raise RuntimeError(f"the raw publisher did not say when it started:\n{publisher.log()[-3000:]}")


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (`taskscheduler worker`), each")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork pool size of each worker")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the median is reported")
    parser.add_argument("--timeout", type=float, default=0.0, help="give up after this long (default: from N)")
    parser.add_argument("--profile", action="store_true", help="record py-spy profiles of the scheduler and a worker")
    parser.add_argument(
        "--max-tasks-per-message", type=int, default=None, help="MAX_TASKS_PER_MESSAGE of ours (default: production)"
    )
    parser.add_argument(
        "--raw-prefetch", type=int, default=RAW_PREFETCH, help=f"raw Celery's prefetch multiplier ({RAW_PREFETCH})"
    )
    parser.add_argument("--raw-log-level", default="WARNING", help="raw Celery worker's log level (WARNING)")
    parser.add_argument("--raw-time-limits", action="store_true", help="raw messages carry a hard limit, as ours")
    parser.add_argument(
        "--raw-ack-emulation", action="store_true", help="raw Celery keeps kombu's ack emulation (its default, slower)"
    )
    parser.add_argument("--skip-raw", action="store_true", help="only ours (no ratio)")
    parser.add_argument("--skip-ours", action="store_true", help="only raw Celery (no ratio)")
    parser.add_argument(
        "--skip-submitted", action="store_true", help="only the prefilled runs, not those with submission included"
    )
    args = parser.parse_args(argv)
    n = SMOKE_TASKS if args.smoke else args.tasks
    timeout = args.timeout or max(120.0, n / 50)
    sizes = {"n": n, "workers": args.workers, "concurrency": args.concurrency, "timeout": timeout}
    env = {"MAX_TASKS_PER_MESSAGE": str(args.max_tasks_per_message)} if args.max_tasks_per_message else {}
    raw_options = {
        "prefetch": args.raw_prefetch,
        "log_level": args.raw_log_level,
        "time_limits": args.raw_time_limits,
        "ack_emulation": args.raw_ack_emulation,
    }
    batch = SMOKE_BATCH if args.smoke else MAX_BATCH
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "raw": [], "ours_submitted": [], "raw_submitted": []}
    profile_dir = args.results_dir / f"profiles-{common.run_id()}" if args.profile else None
    with common.run("throughput", args) as run:
        for i in range(args.repeat):
            if args.wait_quiet and i:
                common.wait_quiet(args.wait_quiet)
            if not args.skip_raw:
                runs["raw"].append(run_raw(run, **sizes, prefilled=True, **raw_options))
                print(f"run {i + 1}: raw Celery, prefilled {runs['raw'][-1]['rate']:,.0f} tasks/s", flush=True)
            if not args.skip_ours:
                runs["ours"].append(run_ours(run, **sizes, profile_dir=profile_dir if i == 0 else None, env=env))
                print(f"run {i + 1}: ours, prefilled {runs['ours'][-1]['rate']:,.0f} tasks/s", flush=True)
            if args.skip_submitted:
                continue
            if not args.skip_raw:
                runs["raw_submitted"].append(run_raw(run, **sizes, prefilled=False, **raw_options))
                rate = runs["raw_submitted"][-1]["rate"]
                print(f"run {i + 1}: raw Celery, with apply_async {rate:,.0f} tasks/s", flush=True)
            if not args.skip_ours:
                runs["ours_submitted"].append(run_ours_submitted(run, **sizes, batch=batch, env=env))
                rate = runs["ours_submitted"][-1]["rate"]
                print(f"run {i + 1}: ours, with POST /tasks/batch {rate:,.0f} tasks/s", flush=True)

    def med(key: str, measure: str) -> float:
        return common.median([r[measure] for r in runs[key]]) if runs[key] else float("nan")

    def ratio(measure: str, ours: str = "ours", raw: str = "raw") -> float:
        return med(ours, measure) / med(raw, measure) if runs[ours] and runs[raw] else float("nan")

    ours_settings = our_settings(args.log_level, args.max_tasks_per_message)
    raw_celery_settings = raw_settings(
        args.raw_prefetch, args.raw_log_level, args.raw_time_limits, args.raw_ack_emulation
    )
    print(f"ours: {ours_settings}\nraw Celery: {raw_celery_settings}\n")
    measures = ("seconds", "rate", "rate_from_first_dispatch", "steady_rate", "startup_seconds")
    labels = {
        "ours": "ours, prefilled",
        "raw": "raw Celery, prefilled",
        "ours_submitted": "ours, POST /tasks/batch",
        "raw_submitted": "raw Celery, apply_async",
    }
    rows = [(labels[key], n, *(med(key, m) for m in measures)) for key in labels if runs[key]]
    title = (
        f"Throughput: {n:,} no-op tasks, {args.workers} worker(s) x prefork {args.concurrency}, "
        f"median of {args.repeat}{' (PROFILED: py-spy running)' if args.profile else ''}"
    )
    common.print_table(
        title, ["system", "tasks", "seconds", "tasks/s", "from 1st start", "steady tasks/s", "startup s"], rows
    )
    ratios = {
        "prefilled": ratio("rate"),
        "prefilled_steady": ratio("steady_rate"),
        "with_submission": ratio("rate", "ours_submitted", "raw_submitted"),
        "with_submission_steady": ratio("steady_rate", "ours_submitted", "raw_submitted"),
    }
    common.print_table("Ratio ours / raw Celery at its best", ["measure", "ratio"], list(ratios.items()))
    cpu_rows = []
    for key, label in labels.items():
        for role in runs[key][0]["cpu_seconds_per_1000"] if runs[key] else []:
            cpu_rows.append((label, role, common.median([r["cpu_seconds_per_1000"][role] for r in runs[key]])))
    common.print_table("CPU seconds per 1,000 tasks", ["system", "process", "cpu s / 1000"], cpu_rows)
    ours_runs = runs["ours"]
    if ours_runs:
        print(
            "ours: tasks published twice by the lost-message sweep (ENQUEUED longer than ENQUEUE_TIMEOUT_SEC): "
            f"{ours_runs[-1]['republished_by_lost_message_sweep']:,} of {n:,}\n"
        )
        per_task = ours_runs[-1]["db_per_task"]
        common.print_table("PostgreSQL work per task (ours, prefilled)", ["counter", "per task"], [*per_task.items()])
    for ours in ours_runs:
        for name, summary in ours.get("profile_summary", {}).items():
            profile_report.print_report(name, summary)

    params = {"tasks": n, "workers": args.workers, "concurrency": args.concurrency, "pool": "prefork",
              "repeat": args.repeat, "max_tasks_per_message": args.max_tasks_per_message,
              "raw_prefetch": args.raw_prefetch, "raw_log_level": args.raw_log_level,
              "raw_time_limits": args.raw_time_limits, "raw_ack_emulation": args.raw_ack_emulation}  # fmt: skip

    def summary(key: str) -> dict[str, Any]:
        return {"median_rate": med(key, "rate"), "median_steady_rate": med(key, "steady_rate"), "runs": runs[key]}

    return run.write(
        params,
        profiled=args.profile,
        settings={"ours": ours_settings, "raw_celery": raw_celery_settings},
        ours=summary("ours"),
        raw_celery=summary("raw"),
        ours_submitted=summary("ours_submitted"),
        raw_celery_submitted=summary("raw_submitted"),
        ratio=ratios["prefilled"],
        ratio_steady=ratios["prefilled_steady"],
        ratio_with_submission=ratios["with_submission"],
        ratio_with_submission_steady=ratios["with_submission_steady"],
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
