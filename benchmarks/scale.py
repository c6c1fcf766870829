"""Scale: the scheduler's queries with 1M future PENDING and 1M finished rows, and the size on disk.

    python -m benchmarks.scale                    # 1M + 1M (about 5 minutes to build)
    python -m benchmarks.scale --pending 200000 --finished 200000 --runs 9

Builds a private database with generate_series: `--pending` PENDING tasks due in 1 to 31 days
(priorities 1-10, one 'created' event each), `--finished` finished ones (98% SUCCEEDED, 1% DEAD with
their DLQ row, 1% CANCELLED; four events each, two for CANCELLED) and a few in flight (ENQUEUED and
STARTED, none of them late). Then, each in a transaction that is rolled back, EXPLAIN (ANALYZE,
BUFFERS) of the store's statements, by their public names (`sweeps.DISPATCH_DUE`, ...): the dispatch poll (nothing due,
DISPATCH_BATCH_SIZE due, a deep backlog due), each rescue query, and the per-task transitions a
worker runs (claim, succeed). Figures are medians of `--runs`; "generic" is the plan psycopg's
prepared statement gets once PostgreSQL switches to a generic plan (after five executions).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import statistics
import time
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import create_engine, text

from benchmarks import common
from taskscheduler.store.sql import parameters

SMOKE = {"pending": 5_000, "finished": 5_000, "runs": 3, "backlog": 2_000}
ENQUEUED_IN_FLIGHT = 500
STARTED_IN_FLIGHT = 100
# The values every query's parameters get (those not named are an error, so a new one is noticed).
PARAMS: dict[str, Any] = {
    "now": None,
    "queue": None,  # a dispatch per queue, where the statement takes one: None = every queue
    "priorities": list(range(10, 0, -1)),  # DISPATCH_DUE takes a queue as its priorities: these are all
    "limit": 500,
    "heartbeat_timeout_sec": 30.0,
    "default_timeout_sec": 180.0,
    "timeout_sec": 60.0,
    "attempt": 1,
    "detail": None,
    "result": {},
    "reconnected_at": None,  # the stuck sweep: no reconnection, heartbeats age from themselves
    "waiting": 0,  # the republishing sweeps: the broker's list for the queue is empty
    "token": "00000000-0000-0000-0000-000000000000",  # a claim's token
    "since": None,  # the scheduler's scans from the start (its full pass; see scheduler.horizons)
}
_QUEUE = "CASE WHEN p >= 8 THEN 'high' WHEN p >= 4 THEN 'default' ELSE 'low' END"


# ------------------------------------------------------------------------------------------- data


def build(pdb: common.PrivateDatabase, *, pending: int, finished: int) -> dict[str, float]:
    """Fill the database; returns seconds per step."""
    timings: dict[str, float] = {}
    n_dead = finished // 100
    n_cancelled = finished // 100
    n_ok = finished - n_dead - n_cancelled
    steps = [
        (
            "pending",
            f"""
            INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, max_retries, created_at, updated_at)
            SELECT gen_random_uuid(), 'demo_ok', '{{}}'::jsonb, p, {_QUEUE}, 'PENDING',
                   now() + interval '1 day' + random() * interval '30 days', 3, now(), now()
            FROM (SELECT 1 + (i % 10) AS p FROM generate_series(1, {pending}) AS i) s
            """,
        ),
        (
            "succeeded",
            f"""
            INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, attempt, max_retries, result,
                               created_at, updated_at, published_at, started_at, heartbeat_at, finished_at)
            SELECT gen_random_uuid(), 'demo_ok', '{{}}'::jsonb, p, {_QUEUE}, 'SUCCEEDED', t, 1, 3, '{{}}'::jsonb,
                   t, t + interval '30 ms', t + interval '1 ms', t + interval '10 ms', t + interval '10 ms',
                   t + interval '30 ms'
            FROM (SELECT 1 + (i % 10) AS p, now() - interval '1 hour' - random() * interval '7 days' AS t
                  FROM generate_series(1, {n_ok}) AS i) s
            """,
        ),
        (
            "dead",
            f"""
            INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, attempt, max_retries, last_error,
                               dead_reason, dlq_recorded, created_at, updated_at, published_at, started_at,
                               heartbeat_at, finished_at)
            SELECT gen_random_uuid(), 'demo_fail', '{{"fail": true}}'::jsonb, p, {_QUEUE}, 'DEAD', t, 1, 0,
                   'HandlerError: demo_fail: asked to fail', 'max_retries_exceeded', true, t, t + interval '30 ms',
                   t + interval '1 ms', t + interval '10 ms', t + interval '10 ms', t + interval '30 ms'
            FROM (SELECT 1 + (i % 10) AS p, now() - interval '1 hour' - random() * interval '7 days' AS t
                  FROM generate_series(1, {n_dead}) AS i) s
            """,
        ),
        (
            "cancelled",
            f"""
            INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, max_retries, created_at,
                               updated_at, finished_at)
            SELECT gen_random_uuid(), 'demo_ok', '{{}}'::jsonb, p, {_QUEUE}, 'CANCELLED', t, 3, t,
                   t + interval '1 s', t + interval '1 s'
            FROM (SELECT 1 + (i % 10) AS p, now() - interval '1 hour' - random() * interval '7 days' AS t
                  FROM generate_series(1, {n_cancelled}) AS i) s
            """,
        ),
        (
            "in flight",
            f"""
            INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, attempt, max_retries,
                               published_at, started_at, heartbeat_at)
            SELECT gen_random_uuid(), 'demo_ok', '{{}}'::jsonb, 5, 'default',
                   CASE WHEN i <= {ENQUEUED_IN_FLIGHT} THEN 'ENQUEUED' ELSE 'STARTED' END,
                   now() - interval '2 s', 1, 3, now() - interval '1 s',
                   CASE WHEN i <= {ENQUEUED_IN_FLIGHT} THEN NULL ELSE now() - interval '500 ms' END,
                   CASE WHEN i <= {ENQUEUED_IN_FLIGHT} THEN NULL ELSE now() - interval '500 ms' END
            FROM generate_series(1, {ENQUEUED_IN_FLIGHT + STARTED_IN_FLIGHT}) AS i
            """,
        ),
        (
            "events",
            """
            INSERT INTO task_events (task_id, at, from_status, to_status, attempt, detail)
            SELECT t.id, t.created_at + e.off, e.from_status, e.to_status, e.attempt, e.detail
            FROM tasks t
            JOIN LATERAL (VALUES
                (0, interval '0', NULL, 'PENDING', 0, 'created'),
                (1, interval '1 ms', 'PENDING', 'ENQUEUED', 1, NULL),
                (2, interval '10 ms', 'ENQUEUED', 'STARTED', 1, 'default-1@host'),
                (3, interval '30 ms', 'STARTED', t.status, 1, NULL),
                (4, interval '1 s', 'PENDING', 'CANCELLED', 0, NULL)
            ) AS e(k, off, from_status, to_status, attempt, detail)
              ON e.k = 0
              OR (e.k IN (1, 2) AND t.status IN ('SUCCEEDED', 'DEAD', 'ENQUEUED', 'STARTED')
                  AND NOT (e.k = 2 AND t.status = 'ENQUEUED'))
              OR (e.k = 3 AND t.status IN ('SUCCEEDED', 'DEAD'))
              OR (e.k = 4 AND t.status = 'CANCELLED')
            """,
        ),
        (
            "dlq events",
            """
            INSERT INTO dlq_events (task_id, attempt, task_name, reason, error, created_at)
            SELECT id, attempt, name, dead_reason, last_error, finished_at FROM tasks WHERE status = 'DEAD'
            """,
        ),
    ]
    with pdb.connect(autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '256MB'")
        for name, sql in steps:
            t = time.perf_counter()
            conn.execute(sql)  # type: ignore[arg-type]
            timings[name] = time.perf_counter() - t
            print(f"  built {name} in {timings[name]:.1f}s", flush=True)
        t = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) tasks, task_events, dlq_events")
        timings["vacuum analyze"] = time.perf_counter() - t
    return timings


def refresh_in_flight(pdb: common.PrivateDatabase) -> None:
    """In-flight rows as of now, so that none is late (stuck or lost) when the sweeps are measured."""
    with pdb.connect(autocommit=True) as conn:
        conn.execute(
            "UPDATE tasks SET published_at = now() - interval '1 s', run_at = now() - interval '2 s',"
            " started_at = CASE WHEN status = 'STARTED' THEN now() - interval '500 ms' END,"
            " heartbeat_at = CASE WHEN status = 'STARTED' THEN now() - interval '500 ms' END"
            " WHERE status IN ('ENQUEUED', 'STARTED')"
        )


def sizes(pdb: common.PrivateDatabase) -> dict[str, Any]:
    with pdb.connect() as conn:
        counts = dict(conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())
        events = conn.execute("SELECT count(*) FROM task_events").fetchone()
        db_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        rels = conn.execute(
            """
            SELECT c.relname, c.relkind, pg_relation_size(c.oid), pg_total_relation_size(c.oid),
                   coalesce(i.indrelid::regclass::text, '')
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_index i ON i.indexrelid = c.oid
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i')
            ORDER BY pg_relation_size(c.oid) DESC
            """
        ).fetchall()
    assert events is not None and db_bytes is not None
    tasks = sum(counts.values())
    per_m = 1e6 / tasks
    tables = {
        r[0]: {"heap_bytes": r[2], "total_bytes": r[3], "indexes_bytes": r[3] - r[2]} for r in rels if r[1] == "r"
    }
    indexes = {r[0]: {"table": r[4], "bytes": r[2]} for r in rels if r[1] == "i"}
    tables_total = sum(t["total_bytes"] for t in tables.values())
    return {
        "tasks": tasks,
        "by_status": counts,
        "task_events": int(events[0]),
        "database_bytes": int(db_bytes[0]),
        "tables_bytes": tables_total,
        "database_bytes_per_million_tasks": int(db_bytes[0]) * per_m,
        "tables_bytes_per_million_tasks": tables_total * per_m,
        "tables": tables,
        "indexes": indexes,
    }


# ------------------------------------------------------------------------------------------ EXPLAIN


# What is measured: a label, and the statement's public name in `taskscheduler.store`.
STATEMENTS = {
    "dispatch poll": "sweeps.DISPATCH_DUE",
    "stuck sweep": "sweeps.LOCK_STUCK",
    "lost ENQUEUED": "sweeps.REPUBLISH_LOST_ENQUEUED",
    "DEAD without DLQ row": "sweeps.REPUBLISH_UNRECORDED_DEAD",
    "worker claim": "transitions.CLAIM",
    "worker succeed": "transitions.SUCCEED",
}


def statements() -> dict[str, str]:
    """Each statement's text, labelled `what (module.NAME)`."""
    out = {}
    for label, name in STATEMENTS.items():
        module, attr = name.split(".")
        out[f"{label} ({name})"] = getattr(importlib.import_module(f"taskscheduler.store.{module}"), attr)
    return out


def _params(stmt: str, extra: dict[str, Any]) -> dict[str, Any]:
    names = parameters(stmt)
    values = {**PARAMS, **extra}
    missing = [n for n in names if n not in values]
    if missing:
        raise KeyError(f"no benchmark value for the parameter(s) {missing} of {stmt[:80]!r}")
    return {n: Jsonb(values[n]) if isinstance(values[n], dict) else values[n] for n in names}


def _plan_summary(plan: dict[str, Any]) -> list[str]:
    """One line per plan node: type, relation/index, rows, loops."""
    lines: list[str] = []

    def walk(node: dict[str, Any], depth: int) -> None:
        what = node["Node Type"]
        if "Index Name" in node:
            what += f" using {node['Index Name']}"
        elif "Relation Name" in node:
            what += f" on {node['Relation Name']}"
        rows = node.get("Actual Rows", "?")
        lines.append(f"{'  ' * depth}{what} (rows={rows} loops={node.get('Actual Loops', '?')})")
        for child in node.get("Plans", []):
            walk(child, depth + 1)

    walk(plan["Plan"], 0)
    return lines


def _buffers(plan: dict[str, Any]) -> tuple[int, int]:
    node = plan["Plan"]
    return int(node.get("Shared Hit Blocks", 0)), int(node.get("Shared Read Blocks", 0))


def explain_custom(engine: Any, stmt: str, params: dict[str, Any], runs: int, setup: str | None) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) through SQLAlchemy, as the product runs it; each run rolled back."""
    explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + stmt
    exec_ms: list[float] = []
    plan_ms: list[float] = []
    wall_ms: list[float] = []
    plans: list[dict[str, Any]] = []
    with engine.connect() as conn:
        outer = conn.begin()
        if setup:
            conn.execute(text(setup))
        for _ in range(runs):
            sp = conn.begin_nested()
            (doc,) = conn.exec_driver_sql(explain, params).one()
            plan = (json.loads(doc) if isinstance(doc, str) else doc)[0]
            sp.rollback()
            plans.append(plan)
            exec_ms.append(plan["Execution Time"])
            plan_ms.append(plan["Planning Time"])
            # The statement itself, timed at the client (no EXPLAIN instrumentation).
            sp = conn.begin_nested()
            t = time.perf_counter()
            conn.exec_driver_sql(stmt, params).fetchall()
            wall_ms.append((time.perf_counter() - t) * 1000)
            sp.rollback()
        outer.rollback()
    mid = plans[exec_ms.index(sorted(exec_ms)[len(exec_ms) // 2])]
    hit, read = _buffers(mid)
    return {
        "execution_ms": statistics.median(exec_ms),
        "triggers_ms": sum(float(t.get("Time", 0)) for t in mid.get("Triggers", [])),
        "planning_ms": statistics.median(plan_ms),
        "client_ms": statistics.median(wall_ms),
        "execution_ms_all": exec_ms,
        "shared_hit": hit,
        "shared_read": read,
        "rows": mid["Plan"].get("Actual Rows"),
        "plan": _plan_summary(mid),
    }


def explain_generic(
    pdb: common.PrivateDatabase, stmt: str, params: dict[str, Any], runs: int, setup: str | None
) -> dict[str, Any]:
    """The same with PREPARE and plan_cache_mode = force_generic_plan (psycopg prepares after 5 runs)."""
    order = parameters(stmt)
    sql = stmt
    for number, name in enumerate(order, start=1):
        sql = sql.replace(f"%({name})s", f"${number}")
    values = [params[n] for n in order]
    exec_ms: list[float] = []
    plans: list[dict[str, Any]] = []
    with psycopg.connect(pdb.libpq, cursor_factory=psycopg.ClientCursor) as conn:
        if setup:
            conn.execute(setup)  # type: ignore[arg-type]
        conn.execute(f"PREPARE bench_q AS {sql}")  # type: ignore[arg-type]
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        placeholders = ", ".join(["%s"] * len(values))
        for _ in range(runs):
            conn.execute("SAVEPOINT run")
            row = conn.execute(
                f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE bench_q({placeholders})",  # type: ignore[arg-type]
                values,
            ).fetchone()
            conn.execute("ROLLBACK TO SAVEPOINT run")
            assert row is not None
            plan = (json.loads(row[0]) if isinstance(row[0], str) else row[0])[0]
            plans.append(plan)
            exec_ms.append(plan["Execution Time"])
        conn.rollback()
    mid = plans[exec_ms.index(sorted(exec_ms)[len(exec_ms) // 2])]
    hit, read = _buffers(mid)
    return {
        "execution_ms": statistics.median(exec_ms),
        "shared_hit": hit,
        "shared_read": read,
        "plan": _plan_summary(mid),
    }


def due_rows(k: int) -> str:
    return f"""
        INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, max_retries)
        SELECT gen_random_uuid(), 'demo_ok', '{{}}'::jsonb, p, {_QUEUE}, 'PENDING',
               now() - interval '1 s' - random() * interval '1 minute', 3
        FROM (SELECT 1 + (i % 10) AS p FROM generate_series(1, {k}) AS i) s
    """


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--pending", type=int, default=1_000_000, help="future PENDING tasks")
    parser.add_argument("--finished", type=int, default=1_000_000, help="finished tasks")
    parser.add_argument("--backlog", type=int, default=100_000, help="due tasks in the deep-backlog dispatch case")
    parser.add_argument("--runs", type=int, default=7, help="EXPLAIN runs per query; the median is reported")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pending, args.finished, args.runs, args.backlog = (
            SMOKE["pending"],
            SMOKE["finished"],
            SMOKE["runs"],
            SMOKE["backlog"],
        )
    stmts = statements()
    results: dict[str, Any] = {}
    with common.run("scale", args) as run:
        pdb = run.pdb
        print(f"building {args.pending:,} future PENDING + {args.finished:,} finished tasks ...", flush=True)
        build_seconds = build(pdb, pending=args.pending, finished=args.finished)
        size = sizes(pdb)
        engine = create_engine(pdb.url)
        with pdb.connect() as conn:
            row = conn.execute("SELECT id FROM tasks WHERE status = 'ENQUEUED' LIMIT 1").fetchone()
            enqueued_id = row[0] if row else None
            row = conn.execute("SELECT id FROM tasks WHERE status = 'STARTED' LIMIT 1").fetchone()
            started_id = row[0] if row else None
        batch = int(PARAMS["limit"])
        cases: list[tuple[str, str, str | None, dict[str, Any]]] = []
        for label in stmts:
            if label.startswith("dispatch"):
                cases += [
                    (f"{label}: nothing due", label, None, {}),
                    (f"{label}: {batch} due", label, due_rows(batch), {}),
                    (f"{label}: {args.backlog:,} due (backlog)", label, due_rows(args.backlog), {}),
                ]
            elif "claim" in label:
                cases.append((label, label, None, {"id": enqueued_id}))
            elif "succeed" in label:
                cases.append((label, label, None, {"id": started_id}))
            else:
                cases.append((label, label, None, {}))
        for case, label, setup, extra in cases:
            stmt = stmts[label]
            params = _params(stmt, extra)
            refresh_in_flight(pdb)
            custom = explain_custom(engine, stmt, params, args.runs, setup)
            generic = explain_generic(pdb, stmt, params, args.runs, setup)
            results[case] = {"custom": custom, "generic": generic}
            print(f"  {case}: {custom['execution_ms']:.3f} ms (generic {generic['execution_ms']:.3f} ms)", flush=True)
        engine.dispose()

    rows = [
        (
            case,
            r["custom"]["rows"],
            r["custom"]["execution_ms"],
            r["custom"]["triggers_ms"],
            r["custom"]["planning_ms"],
            r["custom"]["client_ms"],
            r["custom"]["shared_hit"] + r["custom"]["shared_read"],
            r["generic"]["execution_ms"],
            r["generic"]["shared_hit"] + r["generic"]["shared_read"],
        )
        for case, r in results.items()
    ]
    common.print_table(
        f"Queries at {args.pending:,} future PENDING + {args.finished:,} finished rows "
        f"(median of {args.runs}; ms; buffers = shared pages touched)",
        ["query", "rows", "exec", "of it FK", "plan", "client", "buffers", "generic exec", "generic buffers"],
        rows,
    )
    for case, r in results.items():
        print(f"{case}\n  custom plan:\n    " + "\n    ".join(r["custom"]["plan"]))
        if r["generic"]["plan"] != r["custom"]["plan"]:
            print("  generic plan:\n    " + "\n    ".join(r["generic"]["plan"]))
    print()
    mib = 2**20
    size_rows: list[tuple[Any, ...]] = [
        ("database", size["database_bytes"] / mib, size["database_bytes_per_million_tasks"] / mib)
    ]
    per_m = 1e6 / size["tasks"]
    for name, t in size["tables"].items():
        size_rows.append((f"{name} (heap)", t["heap_bytes"] / mib, t["heap_bytes"] * per_m / mib))
        size_rows.append((f"{name} (indexes)", t["indexes_bytes"] / mib, t["indexes_bytes"] * per_m / mib))
    for name, i in size["indexes"].items():
        size_rows.append((f"  index {name}", i["bytes"] / mib, i["bytes"] * per_m / mib))
    common.print_table(
        f"Size: {size['tasks']:,} tasks, {size['task_events']:,} events",
        ["relation", "MiB", "MiB per 1M tasks"],
        size_rows,
    )
    dispatch_idle = next((r for c, r in results.items() if c.startswith("dispatch") and "nothing due" in c), None)
    dispatch_batch = next((r for c, r in results.items() if c.startswith("dispatch") and f" {batch} due" in c), None)
    targets = {}
    if dispatch_idle and dispatch_batch:
        targets["dispatch poll <= 5 ms (nothing due)"] = dispatch_idle["custom"]["execution_ms"] <= 5
        targets[f"dispatch poll <= 5 ms ({batch} due)"] = dispatch_batch["custom"]["execution_ms"] <= 5
    common.print_table("Targets", ["target", "met"], list(targets.items()))
    params = {"pending": args.pending, "finished": args.finished, "backlog": args.backlog, "runs": args.runs,
              "query_params": dict(PARAMS)}  # fmt: skip
    return run.write(params, build_seconds=build_seconds, size=size, queries=results, targets=targets)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
