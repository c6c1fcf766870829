"""Dispatch lag at a steady rate: tasks due at 500/s for 30 s (inserted ahead, run_at in the future),
through the real scheduler and workers; p50/p95/p99 of started_at - run_at and finished_at - run_at.

    python -m benchmarks.lag                      # 500 tasks/s for 30 s
    python -m benchmarks.lag --rate 200 --duration 60

Also reported: run_at -> published_at (the scheduler's share) and published_at -> started_at (the
broker and worker's share), and the median lag in each third of the run (a lag that grows from
third to third means the system cannot keep up with the rate).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from benchmarks import common
from benchmarks.throughput import republished_count

SMOKE_RATE = 50.0
SMOKE_DURATION = 4.0


_STATS = """
WITH lags AS (
    SELECT run_at,
           1000 * extract(epoch FROM published_at - run_at) AS dispatch_ms,
           1000 * extract(epoch FROM started_at - published_at) AS queue_ms,
           1000 * extract(epoch FROM started_at - run_at) AS start_ms,
           1000 * extract(epoch FROM finished_at - run_at) AS finish_ms,
           ntile(3) OVER (ORDER BY run_at) AS third
    FROM tasks WHERE status = 'SUCCEEDED' AND attempt = 1
)
SELECT %s FROM lags
"""
_MEASURES = ("start_ms", "finish_ms", "dispatch_ms", "queue_ms")


def lag_stats(pdb: common.PrivateDatabase) -> dict[str, Any]:
    cols = []
    for m in _MEASURES:
        cols += [
            f"percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY {m})",
            f"max({m})",
            f"avg({m})",
        ]
    cols += [f"percentile_cont(0.5) WITHIN GROUP (ORDER BY start_ms) FILTER (WHERE third = {t})" for t in (1, 2, 3)]
    cols += ["count(*)", "extract(epoch FROM max(run_at) - min(run_at))"]
    with pdb.connect() as conn:
        row = conn.execute(_STATS % ", ".join(cols)).fetchone()  # type: ignore[arg-type]
        last = conn.execute("SELECT extract(epoch FROM max(finished_at) - min(run_at)) FROM tasks").fetchone()
    assert row is not None and last is not None
    out: dict[str, Any] = {}
    i = 0
    for m in _MEASURES:
        p50, p95, p99 = (float(v) for v in row[i])
        out[m] = {"p50": p50, "p95": p95, "p99": p99, "max": float(row[i + 1]), "mean": float(row[i + 2])}
        i += 3
    out["start_ms_p50_by_third"] = [float(v) if v is not None else None for v in row[i : i + 3]]
    out["tasks_measured"] = int(row[i + 3])
    spread = float(row[i + 4] or 0)
    out["achieved_rate"] = out["tasks_measured"] / float(last[0]) if last[0] else float("nan")
    out["offered_rate"] = (out["tasks_measured"] - 1) / spread if spread else float("nan")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--rate", type=float, default=500.0, help="tasks per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds over which run_at is spread")
    parser.add_argument("--lead", type=float, default=3.0, help="seconds from the insert to the first run_at")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--poll-interval", type=float, default=None, help="POLL_INTERVAL_SEC (default: product's)")
    args = parser.parse_args(argv)
    rate, duration = (SMOKE_RATE, SMOKE_DURATION) if args.smoke else (args.rate, args.duration)
    extra_env = {"POLL_INTERVAL_SEC": str(args.poll_interval)} if args.poll_interval else {}
    poll_interval = args.poll_interval or float(os.environ.get("POLL_INTERVAL_SEC", "1"))
    n = round(rate * duration)

    with common.run("lag", args) as run, run.processes(**extra_env) as procs:
        procs.workers(args.workers, args.concurrency)
        procs.scheduler()
        common.insert_due_tasks(run.pdb, n, per_second=rate, lead_sec=args.lead)
        with run.pdb.connect(autocommit=True) as conn:
            common.wait_succeeded(conn, n, procs, timeout=args.lead + duration + 180, interval=0.5)
            statuses = dict(conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())
            republished = republished_count(conn)
        stats = lag_stats(run.pdb)

    labels = ("started_at - run_at", "finished_at - run_at", "published_at - run_at (scheduler)",
              "started_at - published_at (broker+worker)")  # fmt: skip
    rows = [
        (label, *(stats[m][q] for q in ("p50", "p95", "p99", "max", "mean")))
        for m, label in zip(_MEASURES, labels, strict=True)
    ]
    common.print_table(
        f"Dispatch lag, ms: {n:,} tasks at {rate:g}/s over {duration:g}s, {args.workers} worker(s) x prefork "
        f"{args.concurrency}, POLL_INTERVAL_SEC={poll_interval:g}",
        ["measure", "p50", "p95", "p99", "max", "mean"],
        rows,
    )
    common.print_table(
        "Keeping up",
        ["measure", "value"],
        [
            ("offered tasks/s", stats["offered_rate"]),
            ("achieved tasks/s (first run_at to last finish)", stats["achieved_rate"]),
            *[(f"p50 start lag, third {i + 1} (ms)", v) for i, v in enumerate(stats["start_ms_p50_by_third"])],
            ("messages published again by the lost-message sweep", republished),
        ],
    )
    targets = {
        "p50_start_ms<=50": stats["start_ms"]["p50"] <= 50,
        f"p99_start_ms<={1000 * poll_interval + 100:g}": stats["start_ms"]["p99"] <= 1000 * poll_interval + 100,
    }
    common.print_table("Targets", ["target", "met"], list(targets.items()))
    params = {"rate": rate, "duration": duration, "lead": args.lead, "tasks": n, "workers": args.workers,
              "concurrency": args.concurrency, "poll_interval_sec": poll_interval}  # fmt: skip
    return run.write(
        params,
        statuses=statuses,
        republished_by_lost_message_sweep=republished,
        lag_ms=stats,
        targets=targets,
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
