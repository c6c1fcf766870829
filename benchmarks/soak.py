"""Sustained load with retention: a steady rate for a long time, with RETENTION_DAYS so short that
retention deletes as fast as tasks arrive. Throughput, lag, table and index sizes and dead tuples are
reported per window: they must stay flat.

    python -m benchmarks.soak                          # 400 tasks/s for 30 minutes, 5-minute windows
    python -m benchmarks.soak --minutes 10 --rate 200

Load: direct inserts into PostgreSQL (as benchmarks.lag does), one batch a second of `rate` demo_ok
tasks with their `created` events, due over the next second; the scheduler and one worker (prefork 2)
run them. The API is not in the path: its cost is measured by benchmarks.api and benchmarks.submit.
Retention as production sets it but for the ages: RETENTION_DAYS=0.0035 (about 5 minutes),
RETENTION_INTERVAL_SEC=60 (the default), EVENTS_PARTITION_SEC=60 (one task_events partition a
minute, so that partitions are created and dropped many times in the run).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests import harness

from benchmarks import common

DAY_SEC = 86400.0

# Sizes of the tables (task_events: the sum over its partitions) and their dead tuples.
_SIZES = """
WITH parts AS (
    SELECT relid FROM pg_partition_tree('task_events') WHERE isleaf
)
SELECT
    (SELECT count(*) FROM tasks),
    pg_relation_size('tasks'), pg_indexes_size('tasks'),
    (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'tasks'),
    (SELECT count(*) FROM task_events),
    (SELECT sum(pg_relation_size(relid)) FROM parts), (SELECT sum(pg_indexes_size(relid)) FROM parts),
    (SELECT sum(n_dead_tup) FROM pg_stat_user_tables s JOIN parts p ON p.relid = s.relid),
    (SELECT count(*) FROM parts),
    (SELECT count(*) FROM task_events_default)
"""

# What finished since the last poll; read every few seconds, before retention deletes it.
_FINISHED = """
SELECT finished_at, 1000 * extract(epoch FROM started_at - run_at)
FROM tasks WHERE status IN ('SUCCEEDED', 'DEAD', 'CANCELLED') AND finished_at >= %(since)s AND finished_at < %(upto)s
"""


@dataclass
class Window:
    index: int
    lags_ms: list[float] = field(default_factory=list)
    finished: int = 0


def feed(pdb: common.PrivateDatabase, rate: float, stop: threading.Event, inserted: list[int]) -> None:
    """One batch a second of `rate` tasks, due over the following second, until `stop`."""
    t0 = time.monotonic()
    k = 0
    carry = 0.0
    while not stop.is_set():
        carry += rate
        n = int(carry)
        carry -= n
        if n:
            harness.insert_tasks(pdb.url, n, per_second=rate, lead_sec=1.0)
            inserted[0] += n
        k += 1
        stop.wait(max(0.0, t0 + k - time.monotonic()))


def sizes(pdb: common.PrivateDatabase) -> dict[str, int]:
    with pdb.connect(autocommit=True) as conn:
        row = conn.execute(_SIZES).fetchone()
    assert row is not None
    keys = ("tasks_rows", "tasks_table_bytes", "tasks_index_bytes", "tasks_dead_tuples",
            "events_rows", "events_table_bytes", "events_index_bytes", "events_dead_tuples",
            "events_partitions", "events_default_rows")  # fmt: skip
    return {k: int(v or 0) for k, v in zip(keys, row, strict=True)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load lasts")
    parser.add_argument("--rate", type=float, default=400.0, help="tasks per second (half of measured capacity)")
    parser.add_argument("--window-sec", type=float, default=300.0, help="report one row per window")
    parser.add_argument("--retention-days", type=float, default=0.0035, help="RETENTION_DAYS (0.0035: ~5 min)")
    parser.add_argument("--retention-interval", type=float, default=60.0, help="RETENTION_INTERVAL_SEC")
    parser.add_argument("--partition-sec", type=float, default=60.0, help="EVENTS_PARTITION_SEC")
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.rate, args.window_sec = 0.5, 50.0, 10.0
        args.retention_days, args.retention_interval = 10 / DAY_SEC, 2.5
    duration = args.minutes * 60
    env = {
        "RETENTION_DAYS": repr(args.retention_days),
        "RETENTION_INTERVAL_SEC": repr(args.retention_interval),
        "EVENTS_PARTITION_SEC": repr(args.partition_sec),
    }

    with common.run("soak", args) as run, run.processes(**env) as procs:
        workers = procs.workers(1, args.concurrency)
        scheduler = [procs.cli("scheduler", "scheduler")]
        tracker_groups = {
            "scheduler": lambda: common.process_trees(scheduler),
            "worker": lambda: common.process_trees(workers),
            "postgres": common.postgres_backends(run.pdb.name),
        }
        stop = threading.Event()
        inserted = [0]
        feeder = threading.Thread(target=feed, args=(run.pdb, args.rate, stop, inserted), daemon=True)
        rows: list[dict[str, Any]] = []
        with run.pdb.connect(autocommit=True) as conn:
            since = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            feeder.start()
            t0 = time.monotonic()
            try:
                for w in range(max(1, round(duration / args.window_sec))):
                    window = Window(w)
                    tracker = common.CpuTracker(tracker_groups)
                    tracker.start()
                    fed = inserted[0]
                    end = t0 + (w + 1) * args.window_sec
                    while time.monotonic() < end:
                        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
                        procs.check_alive()
                        upto = conn.execute("SELECT now() - interval '1 second'").fetchone()[0]  # type: ignore[index]
                        got = conn.execute(_FINISHED, {"since": since, "upto": upto}).fetchall()
                        since = upto
                        window.finished += len(got)
                        window.lags_ms += [float(r[1]) for r in got if r[1] is not None]
                    cpu = tracker.stop()
                    lags = sorted(window.lags_ms)
                    row = {
                        "window": w + 1,
                        "minutes": round((w + 1) * args.window_sec / 60, 2),
                        "inserted": inserted[0] - fed,
                        "finished": window.finished,
                        "throughput": window.finished / args.window_sec,
                        "lag_p50_ms": common.percentile(lags, 0.5),
                        "lag_p99_ms": common.percentile(lags, 0.99),
                        "cpu_seconds": cpu,
                        "postgres_cpu_s_per_1000": 1000 * cpu["postgres"] / max(window.finished, 1),
                        **sizes(run.pdb),
                        "load_avg": os.getloadavg(),
                    }
                    rows.append(row)
                    print(
                        f"window {w + 1}: {row['throughput']:.0f}/s, lag p50 {row['lag_p50_ms']:.0f} ms "
                        f"p99 {row['lag_p99_ms']:.0f} ms, tasks {row['tasks_rows']:,}, "
                        f"events {row['events_rows']:,} in {row['events_partitions']} partitions",
                        flush=True,
                    )
            finally:
                stop.set()
                feeder.join()

    mib = 2**20
    common.print_table(
        f"Soak: {args.rate:g} tasks/s for {args.minutes:g} min (direct inserts), scheduler + 1 worker x prefork "
        f"{args.concurrency}, RETENTION_DAYS={args.retention_days:g}, RETENTION_INTERVAL_SEC="
        f"{args.retention_interval:g}, EVENTS_PARTITION_SEC={args.partition_sec:g}",
        ["min", "tasks/s", "p50 ms", "p99 ms", "tasks rows", "tasks MiB", "tasks idx MiB", "tasks dead",
         "events rows", "events MiB", "events idx MiB", "events dead", "parts", "pg cpu s/1000", "load1"],
        [
            (r["minutes"], r["throughput"], r["lag_p50_ms"], r["lag_p99_ms"], r["tasks_rows"],
             r["tasks_table_bytes"] / mib, r["tasks_index_bytes"] / mib, r["tasks_dead_tuples"], r["events_rows"],
             r["events_table_bytes"] / mib, r["events_index_bytes"] / mib, r["events_dead_tuples"],
             r["events_partitions"], r["postgres_cpu_s_per_1000"], r["load_avg"][0])
            for r in rows
        ],
    )  # fmt: skip
    params = {"rate": args.rate, "minutes": args.minutes, "window_sec": args.window_sec, "load": "direct inserts",
              "workers": 1, "concurrency": args.concurrency, **env}  # fmt: skip
    return run.write(params, windows=rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
