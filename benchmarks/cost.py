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

import asyncio
import contextlib
import os
import shutil
import sys
from typing import Any

from benchmarks import api as api_bench
from benchmarks import common, throughput

SMOKE_API_SECONDS = 2.0


def create_through_api(
    pdb: common.PrivateDatabase, *, redis_url: str, prefix: str, seconds: float, connections: int, log_level: str
) -> dict[str, Any]:
    port = common.free_port()
    base = f"http://127.0.0.1:{port}"
    procs = common.Processes.for_run(database_url=pdb.url, redis_url=redis_url, prefix=prefix, log_level=log_level)
    ok = False
    try:
        api = procs.api(port)
        asyncio.run(
            api_bench._httpx_load(f"{base}/tasks", connections=4, duration=None, requests=50, body=api_bench.BODY)
        )
        before = api_bench.count_tasks(pdb)
        tracker = common.CpuTracker({"api": api.tree, "postgres": common.postgres_backends(pdb.name)})
        tracker.start()
        if shutil.which("wrk"):
            load = api_bench.run_wrk(f"{base}/tasks", connections=connections, duration=seconds, body=api_bench.BODY)
        else:
            load = api_bench.run_httpx(f"{base}/tasks", connections=connections, duration=seconds, body=api_bench.BODY)
        cpu = tracker.stop()
        created = api_bench.count_tasks(pdb) - before
        ok = True
    finally:
        if not ok:
            print(procs.dump(), file=sys.stderr)
        procs.cleanup(False)
    return {
        "client": load["client"],
        "created": created,
        "requests_per_sec": load["requests_per_sec"],
        "cpu_seconds": cpu,
        "cpu_seconds_per_1000": {k: 1000 * v / max(created, 1) for k, v in cpu.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--api-seconds", type=float, default=20.0, help="seconds of POST /tasks")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    seconds = SMOKE_API_SECONDS if args.smoke else args.api_seconds
    if args.wait_quiet:
        common.wait_quiet(args.wait_quiet)
    warning = common.busy_warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    with (
        common.private_database(args.admin_database_url, "cost", setup_sql=args.setup_sql) as pdb,
        common.private_redis_prefix(args.redis_url, args.redis_key_prefix) as prefix,
    ):
        versions = common.server_versions(pdb, args.redis_url)
        create = create_through_api(
            pdb,
            redis_url=args.redis_url,
            prefix=prefix,
            seconds=seconds,
            connections=args.connections,
            log_level=args.log_level,
        )
        # Also the 50 warm-up tasks: every PENDING task runs.
        n = api_bench.count_tasks(pdb)
        run = throughput.run_ours(
            pdb=pdb,
            redis_url=args.redis_url,
            prefix=prefix,
            n=n,
            workers=args.workers,
            concurrency=args.concurrency,
            log_level=args.log_level,
            timeout=max(120.0, n / 20),
            insert=False,
        )
        raw = throughput.run_raw(
            redis_url=args.redis_url,
            prefix=prefix,
            n=n,
            workers=args.workers,
            concurrency=args.concurrency,
            log_level=args.log_level,
            timeout=max(120.0, n / 20),
        )

    per_1000 = {
        "api": create["cpu_seconds_per_1000"]["api"],
        "postgres (creating)": create["cpu_seconds_per_1000"]["postgres"],
        "scheduler": run["cpu_seconds_per_1000"]["scheduler"],
        "workers": run["cpu_seconds_per_1000"]["workers"],
        "postgres (running)": run["cpu_seconds_per_1000"]["postgres"],
        "redis server (shared)": run["cpu_seconds_per_1000"]["redis_server_shared"],
        "postgres server processes (shared)": run["cpu_seconds_per_1000"]["postgres_server_shared"],
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
        "What that CPU allows on this machine",
        ["measure", "value"],
        [
            ("cores", os.cpu_count()),
            ("ours: tasks/s if CPU-bound (cores / CPU per task, api excluded)", _bound(per_1000, exclude_api=True)),
            ("raw Celery: tasks/s if CPU-bound", 1000 * (os.cpu_count() or 1) / raw_total),
        ],
    )
    result = {
        "smoke": args.smoke,
        "warning": warning,
        "params": {
            "api_seconds": seconds,
            "connections": args.connections,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "log_level": args.log_level,
            "setup_sql": args.setup_sql,
        },
        "servers": versions,
        "tasks": n,
        "cpu_seconds_per_1000": per_1000,
        "ours_total_per_1000": ours_total,
        "raw_celery_cpu_seconds_per_1000": raw_per_1000,
        "raw_total_per_1000": raw_total,
        "create": create,
        "run": run,
        "raw": raw,
    }
    common.write_result(args.results_dir, "cost", result)
    return result


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
