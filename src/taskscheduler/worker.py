"""The Celery app, its queues, the execute task with heartbeats, and the DLQ recorder.

Celery only carries "run attempt N of task X now". Everything the worker learns or decides is
written through the guarded transitions in `store`, so a duplicate message or a worker that wakes
up after being declared stuck changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, ClassVar

from billiard.pool import SIG_SOFT_TIMEOUT
from celery import Celery, bootsteps
from celery.exceptions import SoftTimeLimitExceeded
from kombu.entity import Queue as KombuQueue

from taskscheduler import handlers
from taskscheduler.config import Settings, get_settings
from taskscheduler.lifecycle import DlqReason, Queue, backoff_sec, has_retries_left
from taskscheduler.store import db
from taskscheduler.store import dlq as dlq_store
from taskscheduler.store import tasks as task_store

log = logging.getLogger(__name__)

EXECUTE = "taskscheduler.execute"
RECORD_DEAD = "taskscheduler.record_dead"
# Seconds between the soft time limit (the handler is interrupted and the attempt fails) and the
# hard one (the pool process is killed; the stuck sweep then rescues the task).
HARD_LIMIT_GRACE_SEC = 5.0

celery_app = Celery("taskscheduler", set_as_current=True)
_configured_for: str | None = None


def configure_celery(settings: Settings | None = None) -> Celery:
    """Point the Celery app at REDIS_URL. Called by every process before it publishes or consumes."""
    global _configured_for
    settings = settings or get_settings()
    redis_url = settings.require_urls()[1]
    key = f"{redis_url}|{settings.redis_key_prefix}"
    if _configured_for == key:
        return celery_app
    transport_options: dict[str, Any] = {}
    if settings.redis_key_prefix:
        transport_options["global_keyprefix"] = settings.redis_key_prefix
    celery_app.conf.update(
        broker_url=redis_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_queues=[KombuQueue(q.value, routing_key=q.value) for q in Queue],
        task_default_queue=Queue.DEFAULT.value,
        task_create_missing_queues=False,
        # One message at a time per pool process: a long task never sits on a message another
        # worker could run, and a crash loses at most one unstarted message (re-published later).
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    _configured_for = key
    return celery_app


class Heartbeats:
    """Refreshes `heartbeat_at` of the attempts this process runs, from one background thread.

    One thread per process, started on first use (after the pool's fork), rather than one per task:
    most tasks finish long before their first heartbeat is due, and starting and joining a thread
    for each of them was a measurable share of a worker's time.
    """

    def __init__(self, interval_sec: float) -> None:
        self._interval = interval_sec
        self._running: dict[tuple[uuid.UUID, int], float] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    @contextmanager
    def beating(self, task_id: uuid.UUID, attempt: int) -> Iterator[None]:
        """Heartbeat this attempt while the block runs."""
        self._ensure_thread()
        with self._lock:
            self._running[(task_id, attempt)] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._running.pop((task_id, attempt), None)

    def _ensure_thread(self) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self._interval / 2)
            now = time.monotonic()
            with self._lock:
                due = [key for key, last in self._running.items() if now - last >= self._interval]
            for task_id, attempt in due:
                self._beat(task_id, attempt, now)

    def _beat(self, task_id: uuid.UUID, attempt: int, now: float) -> None:
        fields = {"task_id": str(task_id), "attempt": attempt}
        try:
            alive = db.run_statement(lambda conn: task_store.heartbeat(conn, task_id=task_id, attempt=attempt))
        except Exception as exc:  # the database may be briefly away; the sweep decides, not us
            log.warning("heartbeat failed: %s", exc, extra={**fields, "event": "heartbeat_failed"})
            return
        with self._lock:
            if (task_id, attempt) not in self._running:
                return
            if alive:
                self._running[(task_id, attempt)] = now
                return
            del self._running[(task_id, attempt)]
        log.warning(
            "attempt was taken away while running; its outcome will be discarded",
            extra={**fields, "event": "fenced"},
        )


_heartbeats: Heartbeats | None = None


def _process_heartbeats(interval_sec: float) -> Heartbeats:
    global _heartbeats
    if _heartbeats is None:
        _heartbeats = Heartbeats(interval_sec)
    return _heartbeats


# \u0000 in JSON text, unless its backslash is itself escaped (an even run of backslashes before it).
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _json_result(value: Any) -> Any:
    """The handler's result if PostgreSQL's jsonb can store it, else a ValueError that fails the attempt."""
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"the handler's result is not JSON-serialisable: {exc}") from None
    if _ESCAPED_NUL.search(encoded):
        raise ValueError("the handler's result contains a NUL character, which PostgreSQL cannot store")
    return value


def run_attempt(task_id: uuid.UUID, attempt: int, *, worker: str | None = None) -> str:
    """Claim, run and record one attempt. Returns what happened, for logs and tests.

    `worker` (the Celery node name) is recorded on the STARTED event, to show who ran it.
    """
    settings = get_settings()
    fields: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
    claimed = db.run_statement(lambda conn: task_store.claim(conn, task_id=task_id, attempt=attempt, worker=worker))
    if claimed is None:
        log.info("stale message dropped", extra={**fields, "event": "dropped"})
        return "dropped"
    log.info("ENQUEUED -> STARTED", extra={**fields, "event": "started", "task_name": claimed.name})

    handler = handlers.get_handler(claimed.name)
    timeout = claimed.timeout_sec or settings.stuck_after_sec
    error: str | None = None
    timed_out = False
    result: Any = None
    handler_returned = False
    # The soft time limit is a signal: it can land anywhere, also after the handler returned (while
    # the heartbeat thread is joined, say, after the process was frozen). Work that is done counts.
    try:
        with _process_heartbeats(settings.heartbeat_sec).beating(task_id, attempt):
            token = handlers.current_attempt.set(attempt - claimed.retry_base_attempt)
            try:
                if handler is None:
                    raise handlers.HandlerError(f"no handler registered for {claimed.name!r} (check TASK_MODULES)")
                result = _json_result(handler(claimed.payload))
                handler_returned = True
            finally:
                handlers.current_attempt.reset(token)
    except SoftTimeLimitExceeded:
        if not handler_returned:
            timed_out = True
            error = f"timed out after {timeout:g}s"
    except Exception as exc:  # any handler failure is a failed attempt
        if not handler_returned:
            error = f"{type(exc).__name__}: {exc}"

    with _soft_time_limit_held_back():
        if error is None:
            done = db.run_statement(
                lambda conn: task_store.succeed(conn, task_id=task_id, attempt=attempt, result=result)
            )
            return _logged(done, "STARTED -> SUCCEEDED", "succeeded", fields)
        return record_failure(
            task_id, attempt, error=error, timed_out=timed_out,
            max_retries=claimed.max_retries, retry_base_attempt=claimed.retry_base_attempt,
            settings=settings,
        )  # fmt: skip


@contextmanager
def _soft_time_limit_held_back() -> Iterator[None]:
    """Hold back Celery's soft time limit while an attempt's outcome is written.

    The limit is a signal to the pool process. Landing in the middle of the statement (a process
    frozen past its limit gets it the moment it resumes), it would abort the write and leave the
    connection unusable: the outcome lost, the task rescued and run again. There is nothing left to
    interrupt by then, so a limit that arrives meanwhile is dropped once the write is done.
    """
    if SIG_SOFT_TIMEOUT is None:  # no such signal on this platform, so no soft limits either
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {SIG_SOFT_TIMEOUT})
    try:
        yield
    finally:
        # pthread_sigmask runs the handler of a pending signal it unblocks before it returns.
        with suppress(SoftTimeLimitExceeded):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {SIG_SOFT_TIMEOUT})


def record_failure(
    task_id: uuid.UUID,
    attempt: int,
    *,
    error: str,
    timed_out: bool,
    max_retries: int,
    retry_base_attempt: int,
    settings: Settings,
) -> str:
    """A failed attempt: FAILED with a backoff while retries remain, else DEAD and a DLQ message."""
    fields: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
    if has_retries_left(attempt, max_retries, retry_base_attempt):
        delay = backoff_sec(
            attempt - retry_base_attempt, base=settings.retry_backoff_base_sec, cap=settings.retry_backoff_max_sec
        )
        done = db.run_statement(
            lambda conn: task_store.fail(conn, task_id=task_id, attempt=attempt, error=error, retry_in_sec=delay)
        )
        return _logged(done, f"STARTED -> FAILED, retry in {delay:.2f}s", "failed", fields)
    reason = DlqReason.STUCK_TASK_TIMEOUT if timed_out else DlqReason.MAX_RETRIES_EXCEEDED
    name = db.run_statement(
        lambda conn: task_store.kill(conn, task_id=task_id, attempt=attempt, error=error, reason=reason)
    )
    if name is not None:
        publish_dead([(task_id, attempt, name, reason.value, error)])
    return _logged(name is not None, f"STARTED -> DEAD ({reason})", "dead", fields)


def _logged(done: bool, message: str, outcome: str, fields: dict[str, Any]) -> str:
    if done:
        log.info(message, extra={**fields, "event": outcome})
        return outcome
    log.warning("outcome discarded: attempt no longer STARTED (fenced)", extra={**fields, "event": "fenced"})
    return "fenced"


@celery_app.task(name=EXECUTE, bind=True, ignore_result=True, acks_late=False)
def execute(self: Any, task_id: str, attempt: int) -> str:
    return run_attempt(uuid.UUID(task_id), int(attempt), worker=self.request.hostname)


@celery_app.task(name=RECORD_DEAD, ignore_result=True)
def record_dead(task_id: str, attempt: int, task_name: str, reason: str, error: str | None) -> bool:
    inserted = db.run_statement(
        lambda conn: dlq_store.record_dlq_event(
            conn, task_id=uuid.UUID(task_id), attempt=int(attempt), task_name=task_name, reason=reason, error=error
        )
    )
    log.info(
        "DLQ event recorded" if inserted else "DLQ event already recorded",
        extra={"task_id": task_id, "attempt": attempt, "event": "dlq", "reason": reason},
    )
    return inserted


def publish_attempts(items: Iterable[task_store.Dispatched], *, default_timeout_sec: float) -> int:
    """Publish `(task_id, attempt)` to each task's queue over one producer connection."""
    app = configure_celery()
    count = 0
    with app.producer_or_acquire() as producer:
        for item in items:
            timeout = item.timeout_sec or default_timeout_sec
            execute.apply_async(
                (str(item.id), item.attempt),
                queue=item.queue,
                routing_key=item.queue,
                soft_time_limit=timeout,
                time_limit=timeout + HARD_LIMIT_GRACE_SEC,
                producer=producer,
            )
            count += 1
    return count


def publish_dead(items: Iterable[tuple[uuid.UUID, int, str, str, str | None]]) -> int:
    """Publish DLQ messages `(task_id, attempt, name, reason, error)`."""
    app = configure_celery()
    count = 0
    with app.producer_or_acquire() as producer:
        for task_id, attempt, name, reason, error in items:
            record_dead.apply_async(
                (str(task_id), attempt, name, reason, error),
                queue=Queue.DLQ.value,
                routing_key=Queue.DLQ.value,
                producer=producer,
            )
            count += 1
    return count


class LivenessStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """In the worker's main process, once its pool is up: the process heartbeat that `taskscheduler
    check worker` reads, and the metrics endpoint when METRICS_PORT is set. On shutdown (SIGTERM:
    warm shutdown) the heartbeat row is deleted at once, while running tasks still finish."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.heartbeat: Any = None
        self.metrics_server: Any = None

    def start(self, parent: Any) -> None:
        from taskscheduler import metrics
        from taskscheduler.liveness import ProcessHeartbeat

        settings = get_settings()
        queues = ",".join(sorted(parent.app.amqp.queues.consume_from or {}))
        self.heartbeat = ProcessHeartbeat("worker", interval_sec=settings.process_heartbeat_sec, detail=queues).start()
        if settings.metrics_port:
            self.metrics_server = metrics.serve(settings.metrics_host, settings.metrics_port, settings.api_key_list)

    def stop(self, parent: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None


celery_app.steps["worker"].add(LivenessStep)
