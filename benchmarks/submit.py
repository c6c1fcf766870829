"""What one `submit` from Python costs: directly on the database (`Client(database_url=...)`, the
API's own statement in one autocommit round trip), inside the caller's transaction (`connection=`,
with its BEGIN and COMMIT), and as `POST /tasks` to one `taskscheduler api` process
(`Client(url=...)`). One caller submitting one task at a time: latency p50/p99, submits/s, and CPU
seconds per 1,000 submits of the caller, the api and PostgreSQL's backends.

    python -m benchmarks.submit                  # 2,000 submits each way
    python -m benchmarks.submit --submits 5000

The tasks are `demo_ok`, due now, with no scheduler running: they stay PENDING, so only creating
them is measured. The caller is this process, on the same machine as the servers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import psutil
from sqlalchemy import create_engine
from tests.harness import free_port

from benchmarks import common
from taskscheduler import Client
from taskscheduler.config import Settings

SMOKE_SUBMITS = 50
WARM_UP = 100
PAYLOAD = {"to": "a@b.c", "order": 42}


def timed(submit: Callable[[int], Any], n: int, cpu_groups: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """`submit(i)` for i in 0..n-1, one after the other: latencies, rate, CPU per 1,000."""
    latencies: list[float] = []
    tracker = common.CpuTracker(cpu_groups)
    tracker.start()
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        submit(i)
        latencies.append((time.perf_counter() - t) * 1000)
    elapsed = time.perf_counter() - start
    cpu = tracker.stop()
    latencies.sort()
    return {
        "submits": n,
        "seconds": elapsed,
        "submits_per_sec": n / elapsed,
        "p50_ms": common.percentile(latencies, 0.5),
        "p90_ms": common.percentile(latencies, 0.9),
        "p99_ms": common.percentile(latencies, 0.99),
        "cpu_seconds": cpu,
        "cpu_seconds_per_1000": common.per_1000(cpu, n),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--submits", type=int, default=2000, help="submits each way")
    args = parser.parse_args(argv)
    n = SMOKE_SUBMITS if args.smoke else args.submits
    warm_up = min(WARM_UP, n)
    port = free_port()
    me = psutil.Process()

    with common.run("submit", args) as run, run.processes() as procs:
        api = procs.api(port)
        settings = Settings(database_url=run.pdb.url, redis_url=run.redis_url)
        postgres = common.postgres_backends(run.pdb.name)
        runs: dict[str, dict[str, Any]] = {}
        caller = {"caller": lambda: [me], "postgres": postgres}
        engine = create_engine(run.pdb.url, pool_size=1)
        with Client(database_url=run.pdb.url, settings=settings) as direct:

            def in_transaction(i: int) -> None:
                with engine.begin() as conn:  # the application's transaction, and its work
                    direct.submit("demo_ok", PAYLOAD, connection=conn)

            for i in range(warm_up):
                direct.submit("demo_ok", PAYLOAD)
                in_transaction(i)
            runs["direct"] = timed(lambda i: direct.submit("demo_ok", PAYLOAD), n, caller)
            runs["transaction"] = timed(in_transaction, n, caller)
        engine.dispose()
        with Client(f"http://127.0.0.1:{port}", settings=settings) as over_http:
            for _ in range(warm_up):
                over_http.submit("demo_ok", PAYLOAD)
            runs["http"] = timed(lambda i: over_http.submit("demo_ok", PAYLOAD), n, {**caller, "api": api.tree})
        with run.pdb.connect() as conn:
            row = conn.execute("SELECT count(*) FROM tasks").fetchone()
        created = int(row[0]) if row else 0

    labels = {
        "direct": "submit, Client(database_url)",
        "transaction": "submit(connection=), own transaction",
        "http": "submit, Client(url): POST /tasks",
    }
    common.print_table(
        f"One submit at a time ({n:,} each way, one caller)",
        ["how", "submits/s", "p50 ms", "p90 ms", "p99 ms"],
        [(labels[k], r["submits_per_sec"], r["p50_ms"], r["p90_ms"], r["p99_ms"]) for k, r in runs.items()],
    )
    common.print_table(
        "CPU seconds per 1,000 submits",
        ["how", "process", "cpu s / 1000"],
        [(labels[k], group, v) for k, r in runs.items() for group, v in r["cpu_seconds_per_1000"].items()],
    )
    ratio = runs["http"]["p50_ms"] / runs["direct"]["p50_ms"]
    print(f"POST /tasks p50 / direct submit p50: {ratio:.2f}\n")
    params = {"submits": n, "warm_up": warm_up, "payload": PAYLOAD}
    return run.write(params, runs=runs, created=created, http_over_direct_p50=ratio)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
