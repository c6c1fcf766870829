"""Dashboard: every page's server-side time with 1M finished and 100k pending tasks (issue 13: < 50 ms).

    python -m benchmarks.dashboard                        # 1M finished + 100k pending (several minutes to build)
    python -m benchmarks.dashboard --finished 200000 --pending 20000 --runs 15

Builds the scale benchmark's data (`benchmarks.scale.build`: finished tasks over the last 7 days with
their events and DLQ rows, future PENDING tasks), then moves `--recent` of the finished tasks into the
last hour (so the overview's charts have something to read, beyond their cap), adds `--due` PENDING
tasks due now (a backlog for the explanation to count), the heartbeats of six processes and
`--schedules` schedules, the first of which made 1% of the finished tasks. Each
page is then requested `--runs` times in-process (the app from `create_app`, through Starlette's test
client: ASGI without a network, so the time is the server's: routing, the reads, the template);
median, p95 and max per page.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from typing import Any

from benchmarks import common, scale

SMOKE = {"pending": 2_000, "finished": 10_000, "recent": 500, "due": 100, "schedules": 100, "runs": 3}
TARGET_MS = 50.0
# Of the finished tasks, how many the first schedule made (its page and the tasks filtered by it).
SCHEDULED_SHARE = 0.01


def add_recent_and_due(pdb: common.PrivateDatabase, *, recent: int, due: int) -> dict[str, float]:
    timings: dict[str, float] = {}
    with pdb.connect(autocommit=True) as conn:
        t = time.perf_counter()
        conn.execute(
            """
            WITH picked AS (
                SELECT id, now() - random() * interval '59 minutes' AS at, random() * interval '2 s' AS lag
                FROM tasks WHERE status = 'SUCCEEDED' LIMIT %(n)s
            )
            UPDATE tasks t SET run_at = p.at, started_at = p.at + p.lag, heartbeat_at = p.at + p.lag,
                               finished_at = p.at + p.lag + interval '30 ms', updated_at = p.at + p.lag
            FROM picked p WHERE t.id = p.id
            """,
            {"n": recent},
        )
        timings["recent"] = time.perf_counter() - t
        t = time.perf_counter()
        conn.execute(scale.due_rows(due))  # type: ignore[arg-type]
        conn.execute(
            """
            INSERT INTO process_heartbeats (id, role, hostname, pid, detail)
            SELECT 'bench-' || r || '-' || n, r, 'bench', 1000 + n, CASE WHEN r = 'worker' THEN q ELSE '' END
            FROM (VALUES ('api', '', 1), ('scheduler', '', 2), ('worker', 'high', 3), ('worker', 'default', 4),
                         ('worker', 'low', 5), ('worker', 'dlq', 6)) AS p(r, q, n)
            """
        )
        timings["due, heartbeats"] = time.perf_counter() - t
    return timings


def add_schedules(pdb: common.PrivateDatabase, *, n: int) -> dict[str, float]:
    """`n` schedules (half cron in Europe/Berlin, half every_sec), and SCHEDULED_SHARE of the finished
    tasks made by the first of them, a fire time each."""
    t = time.perf_counter()
    with pdb.connect(autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO schedules (id, name, task, priority, max_retries, cron, every_sec, timezone, next_fire_at)
            SELECT gen_random_uuid(), 'schedule-' || lpad(i::text, 6, '0'), 'demo_ok', 5, 3,
                   CASE WHEN i %% 2 = 0 THEN '*/5 * * * *' END, CASE WHEN i %% 2 = 1 THEN 60 + i END,
                   CASE WHEN i %% 2 = 0 THEN 'Europe/Berlin' ELSE 'UTC' END,
                   date_trunc('hour', now()) + interval '1 hour'
            FROM generate_series(1, %(n)s) AS i
            """,
            {"n": n},
        )
        conn.execute(
            """
            WITH first AS (SELECT id FROM schedules ORDER BY name LIMIT 1),
                 picked AS (SELECT id FROM tasks WHERE status = 'SUCCEEDED' ORDER BY random() LIMIT %(k)s)
            UPDATE tasks t SET schedule_id = first.id, scheduled_for = t.created_at FROM first, picked
            WHERE t.id = picked.id
            """,
            {"k": max(1, int(_finished(conn) * SCHEDULED_SHARE))},
        )
        conn.execute("VACUUM (ANALYZE) tasks, process_heartbeats, schedules")
    return {"schedules, vacuum analyze": time.perf_counter() - t}


def _finished(conn: Any) -> int:
    row = conn.execute("SELECT count(*) FROM tasks WHERE status = 'SUCCEEDED'").fetchone()
    return int(row[0])


def sample_ids(pdb: common.PrivateDatabase) -> dict[str, str]:
    with pdb.connect() as conn:

        def one(sql: str) -> str:
            row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
            assert row is not None, sql
            return str(row[0])

        return {
            "succeeded": one("SELECT id FROM tasks WHERE status = 'SUCCEEDED' ORDER BY created_at DESC LIMIT 1"),
            "dead": one("SELECT id FROM tasks WHERE status = 'DEAD' ORDER BY created_at DESC LIMIT 1"),
            "future": one("SELECT id FROM tasks WHERE status = 'PENDING' ORDER BY run_at DESC LIMIT 1"),
            "due": one("SELECT id FROM tasks WHERE status = 'PENDING' AND priority = 1 ORDER BY run_at DESC LIMIT 1"),
            "schedule": one("SELECT id FROM schedules ORDER BY name LIMIT 1"),
        }


def next_link(html: str) -> str:
    match = re.search(r'id="next-page" href="([^"]+)"', html)
    assert match, "no next page"
    return match.group(1).replace("&amp;", "&")


def measure(client: Any, path: str, runs: int) -> dict[str, Any]:
    for _ in range(2):  # warm: the template compiled, the connection pooled, the plan cached
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text[-500:])
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - t) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    ordered = sorted(times)
    return {
        "path": path,
        "median_ms": statistics.median(times),
        "p95_ms": common.percentile(ordered, 0.95),
        "max_ms": ordered[-1],
        "bytes": len(response.content),
        "all_ms": times,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--pending", type=int, default=100_000, help="future PENDING tasks")
    parser.add_argument("--finished", type=int, default=1_000_000, help="finished tasks")
    parser.add_argument("--recent", type=int, default=60_000, help="of the finished, how many in the last hour")
    parser.add_argument("--due", type=int, default=1_000, help="PENDING tasks due now (a backlog)")
    parser.add_argument("--schedules", type=int, default=1_000, help="schedules")
    parser.add_argument("--runs", type=int, default=20, help="requests per page; median, p95 and max reported")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    from fastapi.testclient import TestClient

    from taskscheduler.api import create_app
    from taskscheduler.config import Settings

    with common.run("dashboard", args) as run:
        pdb = run.pdb
        print(f"building {args.pending:,} future PENDING + {args.finished:,} finished tasks ...", flush=True)
        build_seconds = scale.build(pdb, pending=args.pending, finished=args.finished)
        build_seconds |= add_recent_and_due(pdb, recent=args.recent, due=args.due)
        build_seconds |= add_schedules(pdb, n=args.schedules)
        size = scale.sizes(pdb)
        ids = sample_ids(pdb)
        settings = Settings(database_url=pdb.url, redis_url=args.redis_url)
        app = create_app(settings, process_heartbeat=False)
        results: dict[str, dict[str, Any]] = {}
        with TestClient(app) as client:
            pages = {
                "overview": "/ui/",
                "overview, auto-refresh part": "/ui/overview/live",
                "tasks": "/ui/tasks",
                "tasks, page 2": next_link(client.get("/ui/tasks").text),
                "tasks, status PENDING": "/ui/tasks?status=PENDING",
                "tasks, status DEAD": "/ui/tasks?status=DEAD",
                "tasks, status DEAD, page 2": next_link(client.get("/ui/tasks?status=DEAD").text),
                "tasks, queue low": "/ui/tasks?queue=low",
                "tasks, name demo_fail": "/ui/tasks?name=demo_fail",
                "task (SUCCEEDED, 4 events)": f"/ui/tasks/{ids['succeeded']}",
                "task (PENDING, future)": f"/ui/tasks/{ids['future']}",
                "task (PENDING, due, behind a backlog)": f"/ui/tasks/{ids['due']}",
                "task (DEAD)": f"/ui/tasks/{ids['dead']}",
                "dead letters": "/ui/dlq",
                "dead letters, page 2": next_link(client.get("/ui/dlq").text),
                "dead letters, retry-by-filter count": "/ui/dlq/retry?reason=max_retries_exceeded",
                "schedules": "/ui/schedules",
                "schedules, page 2": next_link(client.get("/ui/schedules").text),
                f"schedule (its {SCHEDULED_SHARE:.0%} of the finished)": f"/ui/schedules/{ids['schedule']}",
                "tasks, schedule": f"/ui/tasks?schedule={ids['schedule']}",
                "processes": "/ui/processes",
                "GET /tasks/{id}/explain (due)": f"/tasks/{ids['due']}/explain",
            }
            for label, path in pages.items():
                results[label] = measure(client, path, args.runs)
                r = results[label]
                print(f"  {label}: median {r['median_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms", flush=True)

    common.print_table(
        f"Dashboard pages at {args.finished:,} finished ({args.recent:,} in the last hour) + {args.pending:,} future"
        f" and {args.due:,} due PENDING tasks, {args.schedules:,} schedules"
        f" (in-process, {args.runs} requests each; ms)",
        ["page", "median", "p95", "max", "KiB"],
        [(k, r["median_ms"], r["p95_ms"], r["max_ms"], r["bytes"] / 1024) for k, r in results.items()],
    )
    targets = {f"{label} < {TARGET_MS:g} ms (median)": r["median_ms"] < TARGET_MS for label, r in results.items()}
    common.print_table("Targets (issue 13)", ["target", "met"], list(targets.items()))
    params = {name: getattr(args, name) for name in SMOKE}
    size_shown = {k: size[k] for k in ("tasks", "by_status", "task_events", "database_bytes")}
    return run.write(params, build_seconds=build_seconds, size=size_shown, pages=results, targets=targets)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
