"""Steady load under a held snapshot: tasks fall due at a steady rate through the real scheduler and one
worker, first for --baseline-minutes as is, then for --held-minutes while another connection holds one
snapshot (a REPEATABLE READ transaction that stays open, as an analytics query or a forgotten
transaction does). While it is held, no dead row version newer than it can be cleaned.

    python -m benchmarks.snapshot                          # 400 tasks/s, 3 min, then 10 min held
    python -m benchmarks.snapshot --rate 200 --baseline-minutes 1 --held-minutes 3

Printed per 30 s window (by run_at): p50/p99 of started_at - run_at, tasks done, and the cost of
the scheduler's statements sampled in that window with EXPLAIN (ANALYZE, BUFFERS) (statements that
write are rolled back), each scan from where the scheduler would start it (`scheduler.horizons`),
and the dispatch also from the start of its index, as the periodic full pass runs it: milliseconds
and shared buffers touched. Then the held phase beside the
baseline: the ratio of their p50 lags and the slope of p50 (and of each statement's cost) per minute
over the held phase.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool
from tests import harness

from benchmarks import common
from taskscheduler.config import Settings
from taskscheduler.lifecycle import MAX_PRIORITY, MIN_PRIORITY
from taskscheduler.scheduler.horizons import Horizons
from taskscheduler.store import sweeps

SMOKE_RATE = 100.0
SMOKE_PHASE_SEC = 10.0
WINDOW_SEC = 30.0
SMOKE_WINDOW_SEC = 5.0
# Tasks are inserted this far ahead of their run_at, a chunk at a time, so the table holds the
# near future only (as under a real steady stream) rather than the whole run from the start.
FEED_CHUNK_SEC = 2.0
FEED_AHEAD_SEC = 4.0
SAMPLE_EVERY_SEC = 10.0


# ------------------------------------------------------------------------------------ the statements


def _statements(settings: Settings, horizons: Horizons) -> dict[str, tuple[str, dict[str, Any]]]:
    """Name -> (statement, parameters) as the scheduler runs them: with its settings, and each scan
    from where `horizons` (kept as the scheduler keeps its own) says it starts. The dispatch is also
    measured from the start of its index (`..._full`): the scheduler's periodic full pass, and what a
    scheduler without horizons (before them) runs on every tick."""
    priorities = list(range(MAX_PRIORITY, MIN_PRIORITY - 1, -1))
    base: dict[str, Any] = {"now": None}
    batch = settings.dispatch_batch_size
    scans: dict[str, tuple[str, dict[str, Any]]] = {
        "dispatch_due": (
            sweeps.DISPATCH_DUE,
            {**base, "priorities": priorities, "limit": batch, "since": sweeps.since_by_priority(horizons.due)},
        ),
        "next_due": (sweeps.NEXT_DUE, {**base, "since": sweeps.since_by_priority(horizons.due)}),
        "enqueued_per_queue": (sweeps.ENQUEUED_PER_QUEUE, {"since": horizons.enqueued}),
        "oldest_started": (sweeps.OLDEST_STARTED, {"since": horizons.started}),
        "lock_stuck": (
            sweeps.LOCK_STUCK,
            {
                **base,
                "heartbeat_timeout_sec": settings.heartbeat_timeout_sec,
                "default_timeout_sec": settings.stuck_after_sec,
                "reconnected_at": None,
                "limit": batch,
                "since": horizons.started,
            },
        ),
        "republish_lost_enqueued": (
            sweeps.REPUBLISH_LOST_ENQUEUED,
            {
                **base,
                "queue": "default",
                "timeout_sec": settings.enqueue_timeout_sec,
                "limit": batch,
                "waiting": 0,
                "since": horizons.enqueued,
            },
        ),
    }
    # The same from the start of their index: the full pass, and what a scheduler without horizons runs.
    full = {f"{name}_full": (statement, {**params, "since": None}) for name, (statement, params) in scans.items()}
    del full["oldest_started_full"]
    retention = {
        "delete_finished": (
            sweeps.DELETE_FINISHED,
            {**base, "older_than_sec": settings.retention_days * 86400, "limit": batch},
        )
    }
    return {**scans, **full, **retention}


def advance(engine: Engine, horizons: Horizons) -> None:
    """Move `horizons` on as the scheduler's loop does, with the same reads."""
    with engine.connect() as conn:
        horizons.earliest_due(sweeps.next_due(conn, since=horizons.due).earliest)
        horizons.oldest_enqueued(sweeps.enqueued_counts(conn, since=horizons.enqueued).oldest)
        horizons.oldest_started(sweeps.oldest_started(conn, since=horizons.started))
        conn.rollback()


def _buffers(plan: dict[str, Any]) -> int:
    return int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))


def explain_once(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any]) -> tuple[float, int, str]:
    """(execution ms, shared buffers touched, the text plan) of one run, rolled back."""
    try:
        row = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement,  # type: ignore[operator]
            params,
        ).fetchone()
        assert row is not None
        doc = row[0] if isinstance(row[0], list) else json.loads(row[0])
        top = doc[0]
        return float(top["Execution Time"]), _buffers(top["Plan"]), json.dumps(top["Plan"])[:20000]
    finally:
        conn.rollback()


@dataclass
class Sampler:
    """Runs each statement with EXPLAIN (ANALYZE, BUFFERS) every SAMPLE_EVERY_SEC in a thread."""

    pdb: common.PrivateDatabase
    settings: Settings
    every: float
    horizons: Horizons = field(default_factory=lambda: Horizons(full_pass_every_sec=float("inf")))
    samples: list[dict[str, Any]] = field(default_factory=list)
    last_plans: dict[str, str] = field(default_factory=dict)
    first_held_plans: dict[str, str] = field(default_factory=dict)
    held: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        engine = create_engine(self.pdb.url, poolclass=NullPool)
        with self.pdb.connect() as conn:
            while not self._stop.wait(self.every):
                at = time.time()
                advance(engine, self.horizons)
                for name, (statement, params) in _statements(self.settings, self.horizons).items():
                    try:
                        ms, buffers, plan = explain_once(conn, statement, params)
                    except psycopg.Error as exc:
                        conn.rollback()
                        self.samples.append({"at": at, "statement": name, "error": str(exc)[:300]})
                        continue
                    self.samples.append({"at": at, "statement": name, "ms": ms, "buffers": buffers})
                    if self.held and name not in self.first_held_plans:
                        self.first_held_plans[name] = plan
                    self.last_plans[name] = plan


# ------------------------------------------------------------------------------------------- the load


class Feeder:
    """Inserts the tasks that fall due at `rate`/s a chunk at a time, FEED_AHEAD_SEC ahead of their run_at."""

    def __init__(self, pdb: common.PrivateDatabase, rate: float, start: float, end: float) -> None:
        self.pdb, self.rate, self.start_at, self.end = pdb, rate, start, end
        self.inserted = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        next_at = self.start_at
        try:
            while next_at < self.end and not self._stop.is_set():
                wait = next_at - FEED_AHEAD_SEC - time.time()
                if wait > 0 and self._stop.wait(wait):
                    return
                n = round(self.rate * FEED_CHUNK_SEC)
                # run_at = the database's now() + lead: the clocks are the same machine's.
                harness.insert_tasks(self.pdb.url, n, per_second=self.rate, lead_sec=next_at - time.time())
                self.inserted += n
                next_at += FEED_CHUNK_SEC
        except BaseException as exc:  # reported by the main thread
            self.error = exc


@contextlib.contextmanager
def held_snapshot(pdb: common.PrivateDatabase) -> Any:
    """One connection in a REPEATABLE READ transaction that has read the tasks table: its snapshot,
    hence the database's xmin horizon, stays until the block ends. Yields its backend's xmin."""
    with pdb.connect() as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.execute("SELECT count(*) FROM process_heartbeats")
        row = conn.execute("SELECT backend_xmin::text FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()
        try:
            yield row[0] if row else None
        finally:
            conn.rollback()


# ---------------------------------------------------------------------------------------- the figures

# Every task of the run's database is the load's; one whose run_at rounds to just outside the run (the
# microseconds of to_timestamp) counts in the first or last window.
_WINDOWS = """
SELECT LEAST(GREATEST(0, floor(extract(epoch FROM run_at - to_timestamp(%(t0)s)) / %(window)s)),
             floor((%(t1)s - %(t0)s) / %(window)s - 1e-9))::int AS w,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY 1000 * extract(epoch FROM started_at - run_at)),
       count(*) FILTER (WHERE status = 'SUCCEEDED'),
       count(*)
FROM tasks
GROUP BY 1 ORDER BY 1
"""

_PHASE_P50 = """
SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY 1000 * extract(epoch FROM started_at - run_at))
FROM tasks WHERE started_at IS NOT NULL AND run_at >= to_timestamp(%(a)s) AND run_at < to_timestamp(%(b)s)
"""


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    pts = [(x, y) for x, y in points if y == y]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    return 60 * sum((x - mx) * (y - my) for x, y in pts) / sxx


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(
    pdb: common.PrivateDatabase, sampler: Sampler, t0: float, held_at: float, t1: float, window: float
) -> dict[str, Any]:
    with pdb.connect() as conn:
        rows = conn.execute(_WINDOWS, {"t0": t0, "t1": t1, "window": window}).fetchall()
        phases = {}
        for name, (a, b) in {"baseline": (t0, held_at), "held": (held_at, t1)}.items():
            r = conn.execute(_PHASE_P50, {"a": a, "b": b}).fetchone()
            phases[name] = {"p50": r[0][0], "p99": r[0][1]} if r and r[0] else {"p50": None, "p99": None}
    names = list(_statements(sampler.settings, Horizons()))
    windows: list[dict[str, Any]] = []
    for w, pct, done, total in rows:
        start = t0 + w * window
        costs: dict[str, Any] = {}
        for name in names:
            got = [
                s for s in sampler.samples if s["statement"] == name and "ms" in s and start <= s["at"] < start + window
            ]
            costs[name] = {
                "ms": common.median([s["ms"] for s in got]) if got else None,
                "buffers": common.median([float(s["buffers"]) for s in got]) if got else None,
            }
        windows.append(
            {
                "window": w,
                "start_sec": w * window,
                "phase": "held" if start >= held_at else "baseline",
                "p50_ms": pct[0] if pct else None,
                "p99_ms": pct[1] if pct else None,
                "done": int(done),
                "due": int(total),
                "cost": costs,
            }
        )
    held = [w for w in windows if w["phase"] == "held"]
    base = [w for w in windows if w["phase"] == "baseline"]
    trend = {"p50_ms_per_min": slope_per_minute([(w["start_sec"], w["p50_ms"]) for w in held if w["p50_ms"]])}
    cost_summary: dict[str, Any] = {}
    for name in names:
        b = [w["cost"][name]["ms"] for w in base if w["cost"][name]["ms"] is not None]
        h = [w["cost"][name]["ms"] for w in held if w["cost"][name]["ms"] is not None]
        bmed = common.median(b) if b else None
        hmed = common.median(h) if h else None
        last = h[-1] if h else None
        cost_summary[name] = {
            "baseline_ms": bmed,
            "held_ms": hmed,
            "held_last_ms": last,
            "ratio": _ratio(hmed, bmed),
            "last_ratio": _ratio(last, bmed),
            "ms_per_min": slope_per_minute(
                [(w["start_sec"], w["cost"][name]["ms"]) for w in held if w["cost"][name]["ms"] is not None]
            ),
            "buffers_per_min": slope_per_minute(
                [(w["start_sec"], w["cost"][name]["buffers"]) for w in held if w["cost"][name]["buffers"] is not None]
            ),
        }
    return {
        "windows": windows,
        "phases": phases,
        "ratio_p50": _ratio(phases["held"]["p50"], phases["baseline"]["p50"]),
        "ratio_p99": _ratio(phases["held"]["p99"], phases["baseline"]["p99"]),
        "trend": trend,
        "cost": cost_summary,
    }


def dead_tuples(pdb: common.PrivateDatabase) -> dict[str, Any]:
    with pdb.connect() as conn:
        rows = conn.execute(
            "SELECT relname, n_live_tup, n_dead_tup, autovacuum_count FROM pg_stat_user_tables"
            " WHERE relname IN ('tasks', 'task_events')"
        ).fetchall()
    return {r[0]: {"live": r[1], "dead": r[2], "autovacuums": r[3]} for r in rows}


# ------------------------------------------------------------------------------------- --dead N

_LIFECYCLE = (
    "UPDATE tasks SET status = 'ENQUEUED', attempt = 1, published_at = run_at + interval '5 ms' WHERE {}",
    "UPDATE tasks SET status = 'STARTED', started_at = run_at + interval '15 ms', heartbeat_at = run_at WHERE {}",
    "UPDATE tasks SET status = 'SUCCEEDED', finished_at = run_at + interval '20 ms' WHERE {}",
)


def _explain_all(pdb: common.PrivateDatabase, engine: Engine, settings: Settings) -> dict[str, Any]:
    """Median of 5 EXPLAIN (ANALYZE, BUFFERS) of each statement, each scan from a fresh horizon."""
    horizons = Horizons(full_pass_every_sec=float("inf"))
    advance(engine, horizons)
    out: dict[str, Any] = {}
    with pdb.connect() as conn:
        for name, (statement, params) in _statements(settings, horizons).items():
            runs = sorted(explain_once(conn, statement, params) for _ in range(5))
            ms, buffers, plan = runs[2]
            indexes = sorted(set(re.findall(r'"Index Name": "(\w+)"', plan)))
            out[name] = {"ms": ms, "buffers": buffers, "indexes": indexes}
    return out


def explain_dead(args: Any, n: int) -> dict[str, Any]:
    """N tasks due over the last N/400 s go through their lifecycle in bulk while one snapshot is held
    (400 more stay PENDING, due in the next second, and 20 ENQUEUED: a steady stream's live rows)."""
    settings = Settings()
    with common.run("snapshot", args) as run:
        with run.pdb.connect(autocommit=True) as conn:
            insert = (
                "INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, max_retries)"
                " SELECT gen_random_uuid(), 'demo_ok', '{}', 5, 'default', 'PENDING',"
                " now() + make_interval(secs => %(offset)s + i / 400.0), 3 FROM generate_series(1, %(n)s) i"
            )
            conn.execute(insert, {"offset": -n / 400.0, "n": n})
            conn.execute(insert, {"offset": 0.0, "n": 400})
            conn.execute("VACUUM ANALYZE tasks")
        engine = create_engine(run.pdb.url, poolclass=NullPool)
        with held_snapshot(run.pdb), run.pdb.connect(autocommit=True) as conn:
            for i, statement in enumerate(_LIFECYCLE):
                status = ("PENDING", "ENQUEUED", "STARTED")[i]
                conn.execute(statement.format(f"status = '{status}' AND run_at <= now() - interval '50 ms'"))  # type: ignore[arg-type]
            conn.execute(
                "UPDATE tasks SET status = 'ENQUEUED', attempt = 1, published_at = now() WHERE id IN"
                " (SELECT id FROM tasks WHERE status = 'PENDING' ORDER BY run_at LIMIT 20)"
            )
            # As autovacuum's analyze would: the planner knows how few rows each status has.
            conn.execute("ANALYZE tasks")
            dead = dead_tuples(run.pdb)
            held = _explain_all(run.pdb, engine, settings)
        with run.pdb.connect(autocommit=True) as conn:
            conn.execute("VACUUM tasks")
        released = _explain_all(run.pdb, engine, settings)
        engine.dispose()
    common.print_table(
        f"EXPLAIN (ANALYZE, BUFFERS), median of 5: {n:,} tasks finished while a snapshot was held "
        f"({dead['tasks']['dead']:,} dead versions in tasks)",
        ["statement", "held ms", "held buffers", "released+vacuum ms", "buffers", "index"],
        [
            [name, held[name]["ms"], held[name]["buffers"], released[name]["ms"], released[name]["buffers"],
             ",".join(held[name]["indexes"])]
            for name in held
        ],
    )  # fmt: skip
    return run.write({"dead": n}, dead_tuples=dead, explain_held=held, explain_released=released)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--rate", type=float, default=400.0, help="tasks per second")
    parser.add_argument("--baseline-minutes", type=float, default=3.0)
    parser.add_argument("--held-minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--dead",
        type=int,
        default=0,
        metavar="N",
        help="instead of the load: N tasks go PENDING -> ENQUEUED -> STARTED -> SUCCEEDED in bulk while a "
        "snapshot is held; EXPLAIN (ANALYZE, BUFFERS) of each scan from its horizon and from the start, "
        "then again once the snapshot is released and the table vacuumed (about 30 s at 100,000)",
    )
    args = parser.parse_args(argv)
    if args.dead:
        return explain_dead(args, args.dead)
    if args.smoke:
        rate, baseline_sec, held_sec, window = SMOKE_RATE, SMOKE_PHASE_SEC, SMOKE_PHASE_SEC, SMOKE_WINDOW_SEC
    else:
        rate, baseline_sec, held_sec = args.rate, 60 * args.baseline_minutes, 60 * args.held_minutes
        window = WINDOW_SEC
    settings = Settings()
    sampler_every = min(SAMPLE_EVERY_SEC, window / 3)

    with common.run("snapshot", args) as run, run.processes() as procs:
        procs.workers(1, args.concurrency)
        procs.scheduler()
        t0 = time.time() + FEED_AHEAD_SEC + 1
        held_at, t1 = t0 + baseline_sec, t0 + baseline_sec + held_sec
        feeder = Feeder(run.pdb, rate, t0, t1)
        sampler = Sampler(run.pdb, settings, sampler_every)
        feeder.start()
        with run.pdb.connect(autocommit=True) as conn:
            conn.execute("ANALYZE tasks")
        sampler.start()
        dead: dict[str, Any] = {}
        try:
            _sleep_until(held_at, procs, feeder)
            dead["at_hold"] = dead_tuples(run.pdb)
            with held_snapshot(run.pdb) as xmin:
                print(f"snapshot held (backend_xmin {xmin}) for {held_sec:g}s", flush=True)
                sampler.held = True
                _sleep_until(t1, procs, feeder)
                dead["at_release"] = dead_tuples(run.pdb)
        finally:
            feeder.stop()
            sampler.stop()
        with run.pdb.connect(autocommit=True) as conn:
            # A run that fell behind is reported as it is (its windows say how far), not waited for.
            with contextlib.suppress(TimeoutError, AssertionError):
                harness.wait_until(lambda: _settled(conn), timeout=60, interval=1, what="the last tasks due")
            statuses = dict(conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())
        result = summarize(run.pdb, sampler, t0, held_at, t1, window)

    _print(result, rate, window, args, baseline_sec, held_sec)
    params = {"rate": rate, "baseline_sec": baseline_sec, "held_sec": held_sec, "window_sec": window,
              "concurrency": args.concurrency, "workers": 1, "sample_every_sec": sampler_every,
              "tasks": feeder.inserted}  # fmt: skip
    targets = {
        "held_p50<=1.5x_baseline": (result["ratio_p50"] or float("inf")) <= 1.5,
        "no_upward_p50_trend(<=2ms/min)": (result["trend"]["p50_ms_per_min"] or 0.0) <= 2.0,
    }
    common.print_table("Targets", ["target", "met"], list(targets.items()))
    return run.write(
        params,
        statuses=statuses,
        dead_tuples=dead,
        targets=targets,
        plans_first_held=sampler.first_held_plans,
        plans_last=sampler.last_plans,
        sample_errors=[s for s in sampler.samples if "error" in s][:20],
        **result,
    )


def _sleep_until(at: float, procs: common.Processes, feeder: Feeder) -> None:
    while time.time() < at:
        procs.check_alive()
        if feeder.error is not None:
            raise feeder.error
        time.sleep(min(1.0, max(0.0, at - time.time())))


def _settled(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT count(*) FROM tasks WHERE status NOT IN ('SUCCEEDED', 'DEAD', 'CANCELLED')").fetchone()
    return bool(row and row[0] == 0)


def _print(result: dict[str, Any], rate: float, window: float, args: Any, baseline_sec: float, held_sec: float) -> None:
    names = list(result["cost"])
    rows: list[list[Any]] = []
    for w in result["windows"]:
        row = [f"{w['phase']} +{w['start_sec']:g}s", w["p50_ms"], w["p99_ms"], w["done"]]
        row += [w["cost"][n]["ms"] for n in names]
        rows.append(row)
    common.print_table(
        f"Per {window:g}s window (by run_at): {rate:g} tasks/s, 1 worker x prefork {args.concurrency}; "
        f"baseline {baseline_sec:g}s, then snapshot held {held_sec:g}s. Lag = started_at - run_at (ms); "
        "statement cost = EXPLAIN ANALYZE execution ms (median of the window's samples)",
        ["window", "p50", "p99", "done", *names],
        rows,
    )
    ph = result["phases"]
    common.print_table(
        "Held beside baseline",
        ["measure", "baseline", "held", "held/baseline", "held slope per min"],
        [
            ["lag p50 ms", ph["baseline"]["p50"], ph["held"]["p50"], result["ratio_p50"],
             result["trend"]["p50_ms_per_min"]],
            ["lag p99 ms", ph["baseline"]["p99"], ph["held"]["p99"], result["ratio_p99"], None],
            *[[f"{n} ms", c["baseline_ms"], c["held_ms"], c["ratio"], c["ms_per_min"]]
              for n, c in result["cost"].items()],
        ],
    )  # fmt: skip


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
