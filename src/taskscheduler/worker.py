"""The Celery app, its queues, the execute task with heartbeats, and the DLQ recorder.

Celery only carries "run attempt N of task X now". Everything the worker learns or decides is
written through the guarded transitions in `store`, so a duplicate message or a worker that wakes
up after being declared stuck changes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, ClassVar

from celery import Celery, bootsteps
from kombu.entity import Queue as KombuQueue

from taskscheduler import handlers
from taskscheduler.config import Settings, get_settings
from taskscheduler.lifecycle import DlqReason, Queue, backoff_sec, has_retries_left
from taskscheduler.store import db
from taskscheduler.store import dlq as dlq_store
from taskscheduler.store import tasks as task_store

log = logging.getLogger(__name__)

EXECUTE = "taskscheduler.execute_many"
RECORD_DEAD = "taskscheduler.record_dead"
# Seconds between a task's own time limit (the handler is interrupted and the attempt fails) and
# the message's hard one (the pool process is killed; the stuck sweep then rescues the task).
HARD_LIMIT_GRACE_SEC = 5.0
# A message with several attempts starts them one after another for at most this long, then sends
# the rest back to its queue (at once, even while one still runs): neither a deep batch nor a slow
# attempt keeps other pool processes idle, nor delays a warm shutdown, for longer than that.
MESSAGE_SLICE_SEC = 1.0
# Split a batch over at least this many messages, so that as many pool processes share it.
SPREAD_OVER_MESSAGES = 8

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
        # With early acks the multiplier alone still lets a busy worker reserve one more message
        # (Celery's docs say so); disable_prefetch (Redis only) fetches only while a process is free.
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
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
    with _process_heartbeats(settings.heartbeat_sec).beating(task_id, attempt):
        token = handlers.current_attempt.set(attempt - claimed.retry_base_attempt)
        try:
            with _time_limit(timeout):
                if handler is None:
                    raise handlers.HandlerError(f"no handler registered for {claimed.name!r} (check TASK_MODULES)")
                result = _json_result(handler(claimed.payload))
        except AttemptTimedOut:
            timed_out = True
            error = f"timed out after {timeout:g}s"
        except Exception as exc:  # any handler failure is a failed attempt
            error = f"{type(exc).__name__}: {exc}"
        finally:
            handlers.current_attempt.reset(token)

    if error is None:
        done = db.run_statement(lambda conn: task_store.succeed(conn, task_id=task_id, attempt=attempt, result=result))
        return _logged(done, "STARTED -> SUCCEEDED", "succeeded", fields)
    return record_failure(
        task_id, attempt, error=error, timed_out=timed_out,
        max_retries=claimed.max_retries, retry_base_attempt=claimed.retry_base_attempt,
        settings=settings,
    )  # fmt: skip


class AttemptTimedOut(Exception):
    """The handler ran past its task's time limit."""


def _raise_timed_out(signum: int, frame: FrameType | None) -> None:
    raise AttemptTimedOut()


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with AttemptTimedOut after `seconds` (wall clock).

    A timer in the pool process itself, armed around the handler only, rather than Celery's
    per-message soft limit: one message may carry several attempts, each with its own limit, and the
    timer is disarmed before the outcome is written, so it can never abort that write. (A process
    frozen past its limit gets the signal when it resumes, still inside the handler.) A handler
    stuck in C code holding the GIL ignores it; the message's hard limit then kills the process.
    """
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_timed_out)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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


class MessageSlice:
    """The attempts of one message, shared by the loop that runs them and the slicer that hands the
    rest off once the slice has passed.

    Under one lock the loop takes the next attempt or the slicer takes all those left, so no attempt
    is both run here and sent back (were it both, its claim would still let only one run it). The
    first attempt is never handed off: a message always gets something done.
    """

    def __init__(
        self,
        items: Sequence[tuple[uuid.UUID, int]],
        *,
        deadline: float,
        send_back: Callable[[Sequence[tuple[uuid.UUID, int]]], None],
    ) -> None:
        self.items = items
        self.deadline = deadline
        self._send_back = send_back
        self._next = 0
        self._open = True
        self._lock = threading.Lock()
        self._settled = threading.Event()  # no hand-off under way
        self._settled.set()

    def take(self) -> tuple[uuid.UUID, int] | None:
        """The next attempt to run, or None when none is left here."""
        if self._next and time.monotonic() >= self.deadline:
            self.hand_off()  # the slicer is late (a busy process): do not start another one
        with self._lock:
            if not self._open or self._next >= len(self.items):
                return None
            self._next += 1
            return self.items[self._next - 1]

    def hand_off(self) -> None:
        """Send the attempts not yet taken back to the queue, if any, once."""
        with self._lock:
            if not self._open or not 0 < self._next < len(self.items):
                return
            self._open = False
            self._settled.clear()
            rest = self.items[self._next :]
        try:
            self._send_back(rest)
        except Exception as exc:  # the broker may be away; they stay ENQUEUED and the sweep republishes them
            log.warning("could not send %d attempts back to the queue: %s", len(rest), exc)
        finally:
            self._settled.set()

    def close(self) -> None:
        """No hand-off after this one; waits for one under way, so that none outlives the message."""
        with self._lock:
            self._open = False
        self._settled.wait()


class Slicer:
    """Hands off the rest of each message whose slice has passed, from one background thread per
    process (started on first use, after the pool's fork), even while the message's current
    attempt runs in the main thread.

    A thread rather than a signal: SIGALRM is the handler's time limit (see _time_limit). It publishes
    through Celery's producer pool, which gives each thread a producer and connection of its own.
    """

    def __init__(self) -> None:
        self._watched: list[MessageSlice] = []
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = 0

    @contextmanager
    def watching(self, message: MessageSlice) -> Iterator[None]:
        """Hand off the rest of `message` at its deadline while the block runs."""
        self._ensure_thread()
        with self._changed:
            self._watched.append(message)
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                if message in self._watched:
                    self._watched.remove(message)
            message.close()

    def _ensure_thread(self) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="message-slicer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [message for message in self._watched if message.deadline <= now]
                if not due:
                    next_deadline = min((message.deadline for message in self._watched), default=None)
                    self._changed.wait(None if next_deadline is None else next_deadline - now)
                    continue
                for message in due:
                    self._watched.remove(message)
            for message in due:
                message.hand_off()


_slicer: Slicer | None = None


def _process_slicer() -> Slicer:
    global _slicer
    if _slicer is None:
        _slicer = Slicer()
    return _slicer


def run_attempts(
    items: Sequence[tuple[uuid.UUID, int]],
    *,
    worker: str | None = None,
    send_back: Callable[[Sequence[tuple[uuid.UUID, int]]], None] | None = None,
) -> list[str]:
    """Run the attempts of one message in turn, each claimed only as it starts.

    MESSAGE_SLICE_SEC after the message starts, the attempts not yet started are handed to
    `send_back` (a new message on the same queue), even while an attempt runs, so that a slow task
    does not hold up the others while other pool processes are idle. They are still ENQUEUED, so this
    is safe, and if that publish fails the lost-message sweep sends them.
    """
    if send_back is None or len(items) < 2:
        return [run_attempt(task_id, attempt, worker=worker) for task_id, attempt in items]
    message = MessageSlice(items, deadline=time.monotonic() + MESSAGE_SLICE_SEC, send_back=send_back)
    outcomes: list[str] = []
    with _process_slicer().watching(message):
        while (item := message.take()) is not None:
            outcomes.append(run_attempt(*item, worker=worker))
    return outcomes


@celery_app.task(name=EXECUTE, bind=True, ignore_result=True, acks_late=False)
def execute_many(self: Any, items: list[list[Any]]) -> list[str]:
    queue = (self.request.delivery_info or {}).get("routing_key")
    hard_limit = (self.request.timelimit or (None, None))[0]

    def send_back(rest: Sequence[tuple[uuid.UUID, int]]) -> None:
        assert queue is not None
        _publish_message(rest, queue=queue, time_limit_sec=hard_limit)

    return run_attempts(
        [(uuid.UUID(task_id), int(attempt)) for task_id, attempt in items],
        worker=self.request.hostname,
        send_back=send_back if queue else None,
    )


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


def publish_attempts(
    items: Iterable[task_store.Dispatched], *, default_timeout_sec: float, max_per_message: int = 1
) -> int:
    """Publish `(task_id, attempt)` to each task's queue over one producer connection, grouped into
    messages by `messages_for`."""
    count = 0
    with configure_celery().producer_or_acquire() as producer:
        for chunk in messages_for(items, max_per_message=max_per_message):
            # Celery's hard limit, for a handler that ignores its own (see _time_limit): the slice,
            # the longest task limit in the message, and a grace period.
            longest = max(item.timeout_sec or default_timeout_sec for item in chunk)
            _publish_message(
                [(item.id, item.attempt) for item in chunk],
                queue=chunk[0].queue,
                time_limit_sec=MESSAGE_SLICE_SEC + longest + HARD_LIMIT_GRACE_SEC,
                producer=producer,
            )
            count += len(chunk)
    return count


def messages_for(items: Iterable[task_store.Dispatched], *, max_per_message: int) -> list[list[task_store.Dispatched]]:
    """Group attempts into messages: per queue, in order, over at least SPREAD_OVER_MESSAGES messages
    of at most `max_per_message` attempts each.

    A few due tasks go one per message, to as many pool processes; a deep backlog pays Celery's
    per-message cost (publish, BRPOP, ack, the pool hand-off) once for many tasks.
    """
    by_queue: dict[str, list[task_store.Dispatched]] = defaultdict(list)
    for item in items:
        by_queue[item.queue].append(item)
    messages: list[list[task_store.Dispatched]] = []
    for queued in by_queue.values():
        size = max(1, min(max_per_message, math.ceil(len(queued) / SPREAD_OVER_MESSAGES)))
        messages += [queued[start : start + size] for start in range(0, len(queued), size)]
    return messages


def _publish_message(
    items: Sequence[tuple[uuid.UUID, int]], *, queue: str, time_limit_sec: float | None, producer: Any = None
) -> None:
    execute_many.apply_async(
        ([[str(task_id), attempt] for task_id, attempt in items],),
        queue=queue,
        routing_key=queue,
        time_limit=time_limit_sec,
        producer=producer,
    )


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
