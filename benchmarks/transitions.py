"""The worker's per-task database cost, in one process: claim + succeed of N dispatched tasks, done
the way the product does it and in cheaper ways, to price the recommendations in BENCHMARKS.md.

    python -m benchmarks.transitions --tasks 3000

Variants (each on N fresh tasks, one connection, one task after another):
- product: `store.db.transaction()` per transition, i.e. an engine with pool_pre_ping, BEGIN,
  the statement, COMMIT (what `worker.run_attempt` does);
- no-ping: the same engine without pool_pre_ping;
- autocommit: one pooled connection in AUTOCOMMIT, no pre-ping: each guarded statement is its own
  transaction (it already is one statement), one round trip per transition;
- autocommit, claim with synchronous_commit=off: the claim on a connection that does not wait for
  its WAL flush (a claim lost in a crash leaves the task ENQUEUED, and the lost-message sweep
  publishes it again), the terminal write on a normal one.
Reported: wall ms per task, client CPU ms per task, PostgreSQL backend CPU ms per task.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil
from sqlalchemy import create_engine

from benchmarks import common
from benchmarks.throughput import insert_due_tasks

SMOKE_TASKS = 200


def _enqueue_all(pdb: common.PrivateDatabase, n: int) -> list[tuple[uuid.UUID, int]]:
    """Every PENDING task -> ENQUEUED, attempt 1, with its event row (as a dispatch leaves it)."""
    with pdb.connect(autocommit=True) as conn:
        rows = conn.execute(
            """
            WITH moved AS (
                UPDATE tasks SET status = 'ENQUEUED', attempt = attempt + 1, published_at = now(), updated_at = now()
                WHERE status = 'PENDING' RETURNING id, attempt
            ), event AS (
                INSERT INTO task_events (task_id, from_status, to_status, attempt)
                SELECT id, 'PENDING', 'ENQUEUED', attempt FROM moved
            )
            SELECT id, attempt FROM moved
            """
        ).fetchall()
        conn.execute("ANALYZE tasks")
    assert len(rows) == n, (len(rows), n)
    return [(r[0], r[1]) for r in rows]


def variant_product(pdb: common.PrivateDatabase, *, pre_ping: bool) -> Callable[..., Any]:
    from taskscheduler.store import transitions as store

    def run(items: list[tuple[uuid.UUID, int]]) -> None:
        engine = create_engine(pdb.url, pool_pre_ping=pre_ping, pool_size=10, max_overflow=20)
        for task_id, attempt in items:
            with engine.begin() as conn:
                assert store.claim(conn, task_id=task_id, attempt=attempt, worker="bench") is not None
            with engine.begin() as conn:
                assert store.succeed(conn, task_id=task_id, attempt=attempt, result={})
        engine.dispose()

    return run


def variant_autocommit(pdb: common.PrivateDatabase) -> Callable[..., Any]:
    from taskscheduler.store import transitions as store

    def run(items: list[tuple[uuid.UUID, int]]) -> None:
        engine = create_engine(pdb.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for task_id, attempt in items:
                assert store.claim(conn, task_id=task_id, attempt=attempt, worker="bench") is not None
                assert store.succeed(conn, task_id=task_id, attempt=attempt, result={})
        engine.dispose()

    return run


def variant_two_connections(pdb: common.PrivateDatabase) -> Callable[..., Any]:
    """Autocommit; the claim on a connection with synchronous_commit off, the outcome on another."""
    from taskscheduler.store import transitions as store

    def run(items: list[tuple[uuid.UUID, int]]) -> None:
        off = {"options": "-c synchronous_commit=off"}
        fast = create_engine(pdb.url, isolation_level="AUTOCOMMIT", connect_args=off)
        safe = create_engine(pdb.url, isolation_level="AUTOCOMMIT")
        with fast.connect() as claim_conn, safe.connect() as done_conn:
            for task_id, attempt in items:
                assert store.claim(claim_conn, task_id=task_id, attempt=attempt, worker="bench") is not None
                assert store.succeed(done_conn, task_id=task_id, attempt=attempt, result={})
        fast.dispose()
        safe.dispose()

    return run


def measure(
    pdb: common.PrivateDatabase, n: int, name: str, factory: Callable[[], Callable[..., Any]]
) -> dict[str, Any]:
    insert_due_tasks(pdb, n)
    items = _enqueue_all(pdb, n)
    run = factory()
    me = psutil.Process()
    # Warm-up on the first 5% (connection, prepared statements), then measure the rest.
    warm = max(5, n // 20)
    run(items[:warm])
    rest = items[warm:]
    # The run opens new connections: their backends are counted from their birth.
    tracker = common.CpuTracker({"postgres": common.postgres_backends(pdb.name)}, interval=0.1)
    tracker.start()
    c0 = me.cpu_times()
    t0 = time.perf_counter()
    run(rest)
    wall = time.perf_counter() - t0
    c1 = me.cpu_times()
    pg = tracker.stop()["postgres"]
    with pdb.connect() as conn:
        row = conn.execute("SELECT count(*) FROM tasks WHERE status = 'SUCCEEDED'").fetchone()
    assert row is not None and row[0] == n
    m = len(rest)
    client = (c1.user + c1.system) - (c0.user + c0.system)
    return {
        "variant": name,
        "tasks": m,
        "wall_ms_per_task": 1000 * wall / m,
        "client_cpu_ms_per_task": 1000 * client / m,
        "postgres_cpu_ms_per_task": 1000 * pg / m,
        "tasks_per_sec_one_connection": m / wall,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=3000)
    args = parser.parse_args(argv)
    n = SMOKE_TASKS if args.smoke else args.tasks
    if args.wait_quiet:
        common.wait_quiet(args.wait_quiet)
    warning = common.busy_warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    rows = []
    with common.private_database(args.admin_database_url, "transitions", setup_sql=args.setup_sql) as pdb:
        versions = common.server_versions(pdb, args.redis_url)
        variants: list[tuple[str, Callable[[], Callable[..., Any]]]] = [
            ("product (pre-ping, BEGIN/COMMIT)", lambda: variant_product(pdb, pre_ping=True)),
            ("no pre-ping", lambda: variant_product(pdb, pre_ping=False)),
            ("autocommit, one round trip", lambda: variant_autocommit(pdb)),
            ("autocommit, claim on a synchronous_commit=off connection", lambda: variant_two_connections(pdb)),
        ]
        for name, factory in variants:
            rows.append(measure(pdb, n, name, factory))
            print(f"  {name}: {rows[-1]['wall_ms_per_task']:.3f} ms/task", flush=True)
    common.print_table(
        f"Worker transitions (claim + succeed), one connection, {n:,} tasks (ms per task)",
        ["variant", "wall", "client CPU", "postgres CPU", "tasks/s"],
        [
            (
                r["variant"],
                r["wall_ms_per_task"],
                r["client_cpu_ms_per_task"],
                r["postgres_cpu_ms_per_task"],
                r["tasks_per_sec_one_connection"],
            )
            for r in rows
        ],
    )
    result = {"smoke": args.smoke, "warning": warning, "params": {"tasks": n}, "servers": versions, "variants": rows}
    common.write_result(args.results_dir, "transitions", result)
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
