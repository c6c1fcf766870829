"""The cost of retention per 1,000 tasks: deleting tasks whose events go with them row by row (the
foreign key's ON DELETE CASCADE, migration 0006) against deleting the tasks alone and dropping the
events' partition (migration 0008).

    python -m benchmarks.retention                 # 20,000 finished tasks with 4 events each
    python -m benchmarks.retention --tasks 50000

Each schema gets its own database with the same rows: finished tasks (31 days ago) with the four
events a task that ran once has (created, ENQUEUED, STARTED, SUCCEEDED; 40 days old, in one partition
of their own under 0008). Measured on one connection: wall time and the CPU of its PostgreSQL backend
(psutil, same machine) for the deletes in batches of 1,000 (`sweeps.DELETE_FINISHED`), the partition
drop, and the VACUUM that the dead row versions then cost.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
from alembic import command
from tests import harness

from benchmarks import common
from taskscheduler.migrations import alembic_config
from taskscheduler.store import partitions, sweeps
from taskscheduler.store.db import Database

EVENTS_PER_TASK = 4
_FILL = """
WITH t AS (
    INSERT INTO tasks (id, name, priority, queue, status, run_at, max_retries, attempt, created_at, started_at,
                       finished_at)
    SELECT gen_random_uuid(), 'demo_ok', 5, 'default', 'SUCCEEDED', now() - interval '40 days', 3, 1,
           now() - interval '40 days', now() - interval '40 days', now() - interval '31 days'
    FROM generate_series(1, %(n)s)
    RETURNING id
)
INSERT INTO task_events (task_id, at, from_status, to_status, attempt)
SELECT id, now() - interval '40 days' + make_interval(secs => s.k), s.f, s.s, 1 FROM t
CROSS JOIN (VALUES (0, NULL, 'PENDING'), (1, 'PENDING', 'ENQUEUED'), (2, 'ENQUEUED', 'STARTED'),
                   (3, 'STARTED', 'SUCCEEDED')) AS s(k, f, s)
"""


class Meter:
    """Wall time and CPU seconds of one PostgreSQL backend, by step."""

    def __init__(self, pid: int) -> None:
        self.backend = psutil.Process(pid)
        self.steps: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Any:
        cpu0, t0 = self._cpu(), time.perf_counter()
        yield
        self.steps[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": self._cpu() - cpu0}

    def _cpu(self) -> float:
        t = self.backend.cpu_times()
        return float(t.user + t.system)


def measure(url: str, *, n: int, partitioned: bool) -> dict[str, Any]:
    database = Database(url)
    try:
        with database.engine.connect() as conn:
            if partitioned:
                lower = partitions.floor_to(datetime.now(UTC) - timedelta(days=40), 86400)
                conn.exec_driver_sql(partitions.create_partition_sql(lower, lower + timedelta(days=1)))
            conn.exec_driver_sql(_FILL, {"n": n})
            conn.commit()
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE tasks, task_events")
            conn.commit()
            conn.execution_options(isolation_level="READ COMMITTED")
            meter = Meter(int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()))
            deleted = 0
            with meter.step("delete_tasks"):
                while True:
                    k = sweeps.delete_finished(conn, older_than_sec=30 * 86400, limit=1000)
                    conn.commit()
                    deleted += k
                    if k < 1000:
                        break
            dropped = kept = 0
            if partitioned:
                with meter.step("drop_partition"):
                    for p in partitions.range_partitions(conn):
                        kept += partitions.drop_partition(conn, p) or 0
                        dropped += 1
            dead = conn.exec_driver_sql(
                "SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables WHERE left(relname, 4) = 'task'"
            ).scalar_one()
            conn.commit()
            with meter.step("vacuum"):
                conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM tasks, task_events")
                conn.commit()
    finally:
        database.dispose()
    total = {k: sum(s[k] for s in meter.steps.values()) for k in ("wall_s", "cpu_s")}
    return {
        "deleted": deleted,
        "partitions_dropped": dropped,
        "events_kept": kept,
        "dead_tuples_left": int(dead),
        "steps": meter.steps,
        "total": total,
        "per_1000": {k: 1000 * v / max(deleted, 1) for k, v in total.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=20_000)
    args = parser.parse_args(argv)
    n = 2_000 if args.smoke else args.tasks
    results: dict[str, Any] = {}
    with common.run("retention", args) as run:
        with harness.private_database(args.admin_database_url, f"tsbench_retention_cascade_{common.run_id()}") as url:
            command.downgrade(alembic_config(url), "0006")
            results["cascade"] = measure(url, n=n, partitioned=False)
        results["partitions"] = measure(run.pdb.url, n=n, partitioned=True)
    rows = [
        (label, step, s["wall_s"] * 1000 / n * 1000, s["cpu_s"] * 1000 / n * 1000)
        for label, r in results.items()
        for step, s in [*r["steps"].items(), ("total", r["total"])]
    ]
    common.print_table(
        f"Retention of {n:,} finished tasks x {EVENTS_PER_TASK} events: per 1,000 tasks, on one backend",
        ["schema", "step", "wall ms / 1000", "pg cpu ms / 1000"],
        rows,
    )
    ratio = results["cascade"]["per_1000"]["cpu_s"] / max(results["partitions"]["per_1000"]["cpu_s"], 1e-9)
    print(f"PostgreSQL CPU, cascade / partitions: {ratio:.2f}", flush=True)
    return run.write({"tasks": n, "events_per_task": EVENTS_PER_TASK}, **results, cpu_ratio=ratio)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
