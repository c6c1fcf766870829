"""Prometheus metrics: the counters and histograms every role updates, and how each role serves them.

- The API serves `/metrics` (behind API_KEYS like every other route), with the current number of tasks
  by status and queue computed at scrape time from one `GROUP BY`.
- `taskscheduler scheduler` and `taskscheduler worker` serve theirs on METRICS_PORT when it is set.
  A worker's tasks run in Celery's prefork children, so a worker with METRICS_PORT uses
  prometheus-client's multiprocess mode: PROMETHEUS_MULTIPROC_DIR is set before prometheus_client
  is first imported (`taskscheduler worker` does it), every process writes its samples to files in
  that directory, and the main process serves their sum.

Each process counts what it did itself: the API creations, cancels and retries; the scheduler
dispatches and rescues; the workers claims and outcomes; the DLQ worker DLQ events. Sum over the
processes (`sum by (...)`) for the whole system. Transitions are counted by the `store` function that
makes them, once its guarded statement matched.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from taskscheduler.auth import RefusalLog, bearer_ok, warn_if_open
from taskscheduler.lifecycle import TASK_QUEUES, TaskStatus

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: from a few milliseconds to a day, for both the dispatch lag and the run time.
_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600, 24 * 3600)

TASKS_CREATED = Counter("taskscheduler_tasks_created", "Tasks created (idempotent replays excluded).", ["queue"])
TRANSITIONS = Counter(
    "taskscheduler_task_transitions",
    "Task status changes made by this process.",
    ["from_status", "to_status", "queue"],
)
DISPATCH_LAG = Histogram(
    "taskscheduler_dispatch_lag_seconds",
    "From a task's run_at to the start of the attempt (started_at - run_at).",
    ["queue"],
    buckets=_BUCKETS,
)
RUN_TIME = Histogram(
    "taskscheduler_run_time_seconds",
    "How long an attempt ran, from started_at to its outcome.",
    ["queue", "outcome"],
    buckets=_BUCKETS,
)
RESCUES = Counter(
    "taskscheduler_rescues",
    "Rescues by the scheduler: no_heartbeat, timeout (stuck STARTED tasks), lost_message (ENQUEUED"
    " re-published), dlq_republished (DEAD without its dlq_events row, re-published).",
    ["reason"],
)
SCHEDULE_FIRES = Counter(
    "taskscheduler_schedule_outcomes",
    "Fire times of recurring schedules handled by this scheduler: fired (a task created), skipped (overlap),"
    " missed (older than the catch-up window). Per schedule: taskscheduler_schedule_*_total on the API.",
    ["outcome"],
)
DLQ_EVENTS = Counter("taskscheduler_dlq_events", "dlq_events rows recorded.", ["reason"])
BROKER_FAILURES = Counter(
    "taskscheduler_broker_failures",
    "Scheduler passes that could not reach the broker, by what they were doing: dispatch, dead (DLQ"
    " messages), republish (lost messages), dlq_republish, check (queue lengths, start-up). Their tasks"
    " stay in PostgreSQL and are published by a later pass.",
    ["kind"],
)
# Labelled by role so that processes which never set it (the workers, in multiprocess mode) report nothing.
BROKER_UP = Gauge(
    "taskscheduler_broker_up",
    "1 if the last broker call of this process succeeded, 0 if it failed (set by the scheduler).",
    ["role"],
    multiprocess_mode="liveall",
)


def transition(src: str | None, dst: str, queue: str, count: int = 1) -> None:
    if count:
        TRANSITIONS.labels(from_status=src or "none", to_status=dst, queue=queue).inc(count)


def observe_run_time(queue: str, outcome: str, seconds: float | None) -> None:
    if seconds is not None:
        RUN_TIME.labels(queue=queue, outcome=outcome).observe(max(0.0, float(seconds)))


Row = TypeVar("Row")


def _rows_from_database(count: Callable[[], Iterable[Row]], what: str) -> list[Row] | None:
    """The rows `count` reads, or None when the database does not answer: the collector's metric is
    then left out of the scrape, and the rest is still served."""
    try:
        return list(count())
    except Exception as exc:
        log.warning("%s for /metrics failed: %s", what, exc, extra={"event": "metrics_failed"})
        return None


class TaskCountCollector(Collector):
    """`taskscheduler_tasks_current{status,queue}`: how many tasks are in each status now, from the database.

    Every (status, queue) pair is reported, zeros included, so a series never vanishes. When the
    database does not answer, the metric is left out of the scrape (the rest is still served).
    """

    def __init__(self, count: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._count = count

    def collect(self) -> Iterator[Metric]:
        rows = _rows_from_database(self._count, "task counts")
        if rows is None:
            return
        counts: dict[tuple[str, str], int] = {(s.value, q.value): 0 for s in TaskStatus for q in TASK_QUEUES}
        for status, queue, n in rows:
            counts[(status, queue)] = int(n)
        family = GaugeMetricFamily(
            "taskscheduler_tasks_current", "Tasks in the database now, by status and queue.", labels=["status", "queue"]
        )
        for (status, queue), n in sorted(counts.items()):
            family.add_metric([str(status), str(queue)], n)
        yield family


class ScheduleCountCollector(Collector):
    """`taskscheduler_schedule_{fires,skips,misses}_total{schedule}`: each schedule's counters, from the
    database (all schedulers together). Left out of the scrape when the database does not answer."""

    def __init__(self, count: Callable[[], Iterable[tuple[str, int, int, int]]]) -> None:
        self._count = count

    def collect(self) -> Iterator[Metric]:
        rows = _rows_from_database(self._count, "schedule counts")
        if rows is None:
            return
        families = [
            CounterMetricFamily(f"taskscheduler_schedule_{kind}", help_text, labels=["schedule"])
            for kind, help_text in (
                ("fires", "Tasks created by the schedule."),
                ("skips", "Fire times skipped because the schedule's previous task had not finished."),
                ("misses", "Fire times older than the catch-up window when the scheduler got to them."),
            )
        ]
        for name, *values in rows:
            for family, value in zip(families, values, strict=True):
                family.add_metric([name], value)
        yield from families


def render(*extra: Collector) -> bytes:
    """This process's metrics in the Prometheus text format, plus those of `extra` collectors."""
    output = generate_latest(REGISTRY)
    if extra:
        registry = CollectorRegistry(auto_describe=False)
        for collector in extra:
            registry.register(collector)
        output += generate_latest(registry)
    return output


# --- the scheduler's and workers' endpoint --------------------------------------------------


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve(host: str, port: int, api_keys: list[str]) -> WSGIServer | None:
    """Serve this process's metrics (all processes' in multiprocess mode) on host:port from a thread.

    Behind the same API_KEYS as the API's `/metrics`. A port that cannot be bound (taken by another
    process) is logged as an error and the process goes on without its endpoint: running tasks
    matters more than reporting on them.
    """
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        metrics_app = make_wsgi_app(registry)
    else:
        metrics_app = make_wsgi_app(REGISTRY)

    refusals = RefusalLog()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION")
        if api_keys and not bearer_ok(header, api_keys):
            where = f"{environ.get('REQUEST_METHOD', '?')} {environ.get('PATH_INFO', '')} (metrics)"
            client = environ.get("REMOTE_ADDR") or "unknown"
            if header is not None and "," in header:
                # wsgiref joins repeated headers with commas, which no key holds.
                refusals.refused(client, "several Authorization headers: send exactly one", where)
                start_response("400 Bad Request", [("Content-Type", "text/plain")])
                return [b"several Authorization headers: send exactly one\n"]
            refusals.refused(client, "missing API key" if header is None else "invalid API key", where)
            start_response(
                "401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')]
            )
            return [b"missing or invalid API key\n"]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    warn_if_open("the metrics endpoint", host, port, api_keys)
    try:
        server = make_server(host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        log.error("metrics not served: cannot listen on %s:%d: %s", host, port, exc, extra={"event": "metrics_failed"})
        return None
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_port, extra={"event": "metrics_serving"})
    return server
