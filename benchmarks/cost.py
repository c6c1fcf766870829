"""Cost: CPU seconds per 1,000 tasks for the API, the scheduler, the workers and PostgreSQL.

    python -m benchmarks.cost                     # about 20 s of POST /tasks, then those tasks run
    python -m benchmarks.cost --api-seconds 30

1. `taskscheduler api` takes POST /tasks for `--api-seconds` from a concurrent client (wrk when
   installed): CPU of the api process and of its PostgreSQL backends per 1,000 tasks created.
2. Those tasks (all due now) run through `taskscheduler scheduler` and `taskscheduler worker`:
   CPU of the scheduler, the worker (its pool processes included) and the PostgreSQL backends.
3. For scale, the same number of no-op messages through raw Celery: publisher and worker CPU.
CPU is psutil's user+system time of each process tree, sampled before and after (PostgreSQL: the
backends serving the run's private database). Redis and PostgreSQL's own background processes are
shared with anything else on the machine and are shown as such.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

from tests.harness import free_port

from benchmarks import api as api_bench
from benchmarks import common, throughput

SMOKE_API_SECONDS = 2.0


def create_through_api(run: common.Run, *, seconds: float, connections: int) -> dict[str, Any]:
    """POST /tasks for `seconds` against one `taskscheduler api`: CPU of the api and its backends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/tasks"
    client = "wrk" if shutil.which("wrk") else "httpx"
    with run.processes() as procs:
        api = procs.api(port)
        api_bench.warm_up(url, 50)
        load = api_bench.measured_load(
            run.pdb, api, url, client=client, connections=connections, body=api_bench.BODY, duration=seconds
        )
    keys = ("client", "created", "requests_per_sec", "cpu_seconds", "cpu_seconds_per_1000")
    return {k: load[k] for k in keys}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--api-seconds", type=float, default=20.0, help="seconds of POST /tasks")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    seconds = SMOKE_API_SECONDS if args.smoke else args.api_seconds
    with common.run("cost", args) as run:
        create = create_through_api(run, seconds=seconds, connections=args.connections)
        # Also the 50 warm-up tasks: every PENDING task runs.
        n = api_bench.count_tasks(run.pdb)
        sizes = {"n": n, "workers": args.workers, "concurrency": args.concurrency, "timeout": max(120.0, n / 20)}
        wal_start = current_wal_lsn(run.pdb)
        ran = throughput.run_ours(run, **sizes, insert=False)
        wal = wal_written(run.pdb, wal_start)
        raw = throughput.run_raw(run, **sizes, prefilled=False)

    per_1000 = {
        "api": create["cpu_seconds_per_1000"]["api"],
        "postgres (creating)": create["cpu_seconds_per_1000"]["postgres"],
        "scheduler": ran["cpu_seconds_per_1000"]["scheduler"],
        "workers": ran["cpu_seconds_per_1000"]["workers"],
        "postgres (running)": ran["cpu_seconds_per_1000"]["postgres"],
        "redis server (shared)": ran["cpu_seconds_per_1000"]["redis_server_shared"],
        "postgres server processes (shared)": ran["cpu_seconds_per_1000"]["postgres_server_shared"],
    }
    ours_total = sum(v for k, v in per_1000.items() if "shared" not in k)
    raw_per_1000 = {
        "publisher": raw["cpu_seconds_per_1000"]["publisher"],
        "workers": raw["cpu_seconds_per_1000"]["workers"],
        "redis server (shared)": raw["cpu_seconds_per_1000"]["redis_server_shared"],
    }
    raw_total = raw_per_1000["publisher"] + raw_per_1000["workers"]
    rows = [("ours", k, v) for k, v in per_1000.items()] + [("ours", "TOTAL (not shared)", ours_total)]
    rows += [("raw Celery", k, v) for k, v in raw_per_1000.items()] + [("raw Celery", "TOTAL (not shared)", raw_total)]
    common.print_table(
        f"CPU seconds per 1,000 tasks ({n:,} tasks created through POST /tasks by {create['client']}, "
        f"{args.workers} worker(s) x prefork {args.concurrency})",
        ["system", "process", "cpu s / 1000"],
        rows,
    )
    common.print_table(
        f"WAL written while the {n:,} tasks ran (pg_walinspect; this database's records and their commits)",
        ["measure", "value"],
        [
            ("bytes per task", wal["bytes"] / n),
            ("of which full-page images, per task", wal["fpi_bytes"] / n),
            ("records per task", wal["records"] / n),
            ("whole cluster, bytes per task (shared)", wal["cluster_bytes"] / n),
        ],
    )
    common.print_table(
        "WAL per task by relation (a record counts for the relation of its first block)",
        ["relation", "bytes / task", "records / task"],
        [(rel, v["bytes"] / n, v["records"] / n) for rel, v in list(wal["by_relation"].items())[:14]],
    )
    common.print_table(
        "What that CPU allows on this machine",
        ["measure", "value"],
        [
            ("cores", os.cpu_count()),
            ("ours: tasks/s if CPU-bound (cores / CPU per task, api excluded)", _bound(per_1000, exclude_api=True)),
            ("raw Celery: tasks/s if CPU-bound", 1000 * (os.cpu_count() or 1) / raw_total),
        ],
    )
    params = {"api_seconds": seconds, "connections": args.connections, "workers": args.workers,
              "concurrency": args.concurrency}  # fmt: skip
    return run.write(
        params,
        tasks=n,
        cpu_seconds_per_1000=per_1000,
        ours_total_per_1000=ours_total,
        raw_celery_cpu_seconds_per_1000=raw_per_1000,
        raw_total_per_1000=raw_total,
        wal=wal,
        wal_bytes_per_task=wal["bytes"] / n,
        create=create,
        run=ran,
        raw=raw,
    )


def current_wal_lsn(pdb: common.PrivateDatabase) -> str:
    with pdb.connect(autocommit=True) as conn:
        # Created before the start, so that its own catalog rows are not counted.
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


# The records that touch a block of this database, by the relation of their first block, and the
# commit records of their transactions; the rest of the cluster (other databases, checkpoints) is
# counted apart. pg_walinspect ships with PostgreSQL 15 (contrib) and needs a superuser, as the
# benchmarks' admin connection is.
WAL_BY_RELATION = """
    WITH r AS (
        SELECT xid, resource_manager, record_length, fpi_length,
               (regexp_match(block_ref, 'rel [0-9]+/' || %(db_oid)s || '/([0-9]+)'))[1]::oid AS relfilenode
        FROM pg_get_wal_records_info(CAST(%(start)s AS pg_lsn), pg_current_wal_flush_lsn())
    ), our_xids AS (SELECT DISTINCT xid FROM r WHERE relfilenode IS NOT NULL AND xid <> '0'),
    mine AS (
        SELECT CASE WHEN r.relfilenode IS NULL THEN '(commits)'
                    ELSE coalesce(c.relname, '(other: ' || r.relfilenode || ')') END AS relation,
               r.record_length, r.fpi_length
        FROM r LEFT JOIN pg_class c ON c.relfilenode = r.relfilenode
        WHERE r.relfilenode IS NOT NULL OR (r.resource_manager = 'Transaction' AND r.xid IN (SELECT xid FROM our_xids))
    )
    SELECT relation, sum(record_length)::bigint, sum(fpi_length)::bigint, count(*),
           (SELECT sum(record_length) FROM r)::bigint
    FROM mine GROUP BY relation ORDER BY 2 DESC
    """


def wal_written(pdb: common.PrivateDatabase, start_lsn: str) -> dict[str, Any]:
    """WAL bytes, full-page-image bytes and records this run's database caused since `start_lsn`, in
    all and by relation (a table, an index, or the commits)."""
    with pdb.connect(autocommit=True) as conn:
        oid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()
        assert oid is not None
        rows = conn.execute(WAL_BY_RELATION, {"db_oid": str(oid[0]), "start": start_lsn}).fetchall()
    by_relation = {str(r[0]): {"bytes": int(r[1]), "fpi_bytes": int(r[2]), "records": int(r[3])} for r in rows}
    return {
        "bytes": sum(v["bytes"] for v in by_relation.values()),
        "fpi_bytes": sum(v["fpi_bytes"] for v in by_relation.values()),
        "records": sum(v["records"] for v in by_relation.values()),
        "cluster_bytes": int(rows[0][4]) if rows else 0,
        "by_relation": by_relation,
    }


def _bound(per_1000: dict[str, float], *, exclude_api: bool) -> float:
    total = sum(
        v
        for k, v in per_1000.items()
        if "shared" not in k and not (exclude_api and k in ("api", "postgres (creating)"))
    )
    return 1000 * (os.cpu_count() or 1) / total if total else float("nan")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
