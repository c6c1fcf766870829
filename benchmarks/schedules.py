"""Schedules: what a scheduler tick costs with 10,000 recurring schedules.

    python -m benchmarks.schedules                      # 10,000 schedules
    python -m benchmarks.schedules --schedules 50000 --repeat 5

The schedule step (`scheduler.schedules.run_once`) runs in this process against a private database
holding the schedules and 10 finished tasks of each (history, as after a while), with time injected,
in three situations:
1. idle: no schedule due (the tick every scheduler runs between fires), plus the wake-up query that
   tells the loop how long to sleep;
2. steady: minutely schedules spread over the minute, so each second ~1/60 of them fire;
3. burst: every schedule due at once (all on the same minute, or after downtime): every batch of the
   tick until none is left, one task created per schedule.
Each is timed by the wall clock, with the CPU of this process (planning, cron) and of the PostgreSQL
backends of the private database. The step's two locking statements are EXPLAINed by name.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from benchmarks import common
from taskscheduler.config import Settings
from taskscheduler.scheduler import schedules as step
from taskscheduler.store import fires
from taskscheduler.store.db import Database

SMOKE_SCHEDULES = 300
TIMES = ("wall_ms", "process_cpu_ms", "postgres_cpu_ms")
# Half cron (minute fields spread over the hour), half every_sec; mixed overlap policies.
SEED_SQL = """
    INSERT INTO schedules (id, name, task, priority, max_retries, cron, every_sec, overlap, next_fire_at,
                           created_at, updated_at)
    SELECT gen_random_uuid(), 'bench-' || n, 'demo_ok', 5, 0,
           CASE WHEN mod(n, 2) = 0 THEN '* * * * *' END,
           CASE WHEN mod(n, 2) = 1 THEN 60 END,
           (ARRAY['skip', 'allow', 'buffer_one'])[mod(n, 3) + 1],
           %(base)s + make_interval(secs => 60 + mod(n, 60)),
           %(created)s, %(created)s
    FROM generate_series(1, %(count)s) AS n
    """


# History, as a deployment has it after a while: finished tasks of the schedules (their statistics
# steer the plans: with an empty, analyzed tasks table the planner probes it by scanning it).
HISTORY_SQL = """
    INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, max_retries, schedule_id,
                       scheduled_for, finished_at)
    SELECT gen_random_uuid(), 'demo_ok', '{}', 5, 'default', 'SUCCEEDED', f, 0, s.id, f, f
    FROM (SELECT id, row_number() OVER () AS n FROM schedules) s
    CROSS JOIN LATERAL generate_series(1, %(per_schedule)s) AS h(k)
    CROSS JOIN LATERAL (SELECT %(base)s - make_interval(mins => h.k) AS f) t
    """
HISTORY_PER_SCHEDULE = 10


def _timed(pdb: common.PrivateDatabase, work: Any) -> dict[str, float]:
    # The tracker samples from a thread of its own (a scan of the machine's processes): this thread's
    # CPU time is the step's alone, and a sparse interval keeps the sampling out of its way.
    tracker = common.CpuTracker({"postgres": common.postgres_backends(pdb.name)}, interval=1.0)
    tracker.start()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    result = work()
    wall = time.perf_counter() - wall0
    cpu = time.thread_time() - cpu0
    pg = tracker.stop()["postgres"]
    return {"wall_ms": wall * 1000, "process_cpu_ms": cpu * 1000, "postgres_cpu_ms": pg * 1000, "result": result}


def _reset(pdb: common.PrivateDatabase, base: datetime, count: int, *, spread: bool) -> None:
    """All schedules fresh, with HISTORY_PER_SCHEDULE finished tasks each; fires at base + 60 s + (n % 60) s,
    or all at base + 60 s."""
    with pdb.connect(autocommit=True) as conn:
        conn.execute("TRUNCATE tasks, task_events, schedules")
        conn.execute(SEED_SQL, {"base": base, "created": base - timedelta(hours=1), "count": count})  # type: ignore[arg-type]
        if not spread:
            conn.execute("UPDATE schedules SET next_fire_at = %(t)s", {"t": base + timedelta(seconds=60)})  # type: ignore[arg-type]
        conn.execute(HISTORY_SQL, {"base": base, "per_schedule": HISTORY_PER_SCHEDULE})  # type: ignore[arg-type]
        conn.execute("VACUUM ANALYZE schedules")
        conn.execute("VACUUM ANALYZE tasks")


def measure(database: Database, pdb: common.PrivateDatabase, *, count: int, repeat: int) -> dict[str, Any]:
    settings = Settings()  # the broker is not used: nothing is dispatched
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)

    def fire(now: datetime) -> step.ScheduleCounts:
        total = step.ScheduleCounts()
        while True:
            counts = step.run_once(database=database, settings=settings, now=now)
            total += counts
            if counts.schedules < step.BATCH_SIZE:
                return total

    def next_fire() -> float | None:
        with database.transaction() as conn:
            return fires.seconds_until_next_fire(conn, now=base)

    runs: dict[str, list[dict[str, float]]] = {"idle": [], "wakeup_query": [], "steady_second": [], "burst": []}
    for _ in range(repeat):
        _reset(pdb, base, count, spread=True)
        fire(base)  # warm: connections, plans
        for _ in range(20):
            runs["idle"].append(_timed(pdb, lambda: fire(base + timedelta(seconds=30))))
            runs["wakeup_query"].append(_timed(pdb, next_fire))
        for s in range(10):  # ten seconds of the minute: 1/60 of the schedules each
            runs["steady_second"].append(_timed(pdb, lambda s=s: fire(base + timedelta(seconds=60 + s))))
        _reset(pdb, base, count, spread=False)
        runs["burst"].append(_timed(pdb, lambda: fire(base + timedelta(seconds=60))))

    with database.transaction() as conn:
        plans = {
            name: "\n".join(
                r[0]
                for r in conn.exec_driver_sql(
                    "EXPLAIN " + getattr(fires, name), {"now": base, "limit": step.BATCH_SIZE}
                )
            )
            for name in ("LOCK_DUE", "LOCK_BUFFERED_READY")
        }
    summary = {}
    for kind, samples in runs.items():
        fired = [s["result"].fired for s in samples if isinstance(s["result"], step.ScheduleCounts)]
        summary[kind] = {
            "samples": len(samples),
            "fired_median": common.median([float(f) for f in fired]) if fired else 0,
            **{key: common.median([s[key] for s in samples]) for key in TIMES},
        }
    return {"runs": summary, "plans": plans}


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=10_000, help="how many schedules (default 10,000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every measurement (medians are shown)")
    args = parser.parse_args()
    count = SMOKE_SCHEDULES if args.smoke else args.schedules
    repeat = 1 if args.smoke else args.repeat
    with common.run("schedules", args) as run:
        database = Database(run.pdb.url)
        try:
            result = measure(database, run.pdb, count=count, repeat=repeat)
        finally:
            database.dispose()
    rows = [
        [kind, r["samples"], r["fired_median"], r["wall_ms"], r["process_cpu_ms"], r["postgres_cpu_ms"]]
        for kind, r in result["runs"].items()
    ]
    burst = result["runs"]["burst"]
    per_schedule_us = burst["wall_ms"] * 1000 / count
    common.print_table(
        f"Scheduler tick with {count:,} schedules (medians; ms)",
        ["situation", "samples", "tasks created", "wall ms", "scheduler CPU ms", "postgres CPU ms"],
        rows,
    )
    print(f"burst: {per_schedule_us:,.0f} us of wall time per schedule fired", flush=True)
    for name, plan in result["plans"].items():
        print(f"EXPLAIN {name}:\n{plan}\n", flush=True)
    run.write({"schedules": count, "repeat": repeat}, burst_us_per_schedule=per_schedule_us, **result)


if __name__ == "__main__":
    main()
