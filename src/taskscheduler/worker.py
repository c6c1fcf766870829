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
import random
import re
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, ClassVar, TypeVar

from celery import Celery, bootsteps
from kombu.entity import Queue as KombuQueue
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from taskscheduler import handlers
from taskscheduler.config import MAX_JSON_DEPTH, Settings, get_settings
from taskscheduler.lifecycle import DlqReason, Queue, backoff_sec, has_retries_left
from taskscheduler.store import db
from taskscheduler.store import dlq as dlq_store
from taskscheduler.store import tasks as task_store

log = logging.getLogger(__name__)

T = TypeVar("T")

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
    """Point the Celery app at REDIS_URL. Called by every process before it publishes or consumes,
    and by `taskscheduler.celery` (the app `celery -A taskscheduler` finds), which needs no more."""
    global _configured_for
    settings = settings or get_settings()
    redis_url = settings.require_redis_url()
    key = f"{redis_url}|{settings.redis_key_prefix}|{settings.task_events}"
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
        # Task events (TASK_EVENTS) are what Flower and `celery events` show: received, started,
        # succeeded... per message, sent by the workers. Not task-sent: it names the message
        # EXECUTE rather than its shadow name and travels apart from the message, so it may reach
        # Flower after the worker's events and rename the task back (seen in tests/e2e/test_flower.py).
        worker_send_task_events=settings.task_events,
        task_send_sent_event=False,
        enable_utc=True,
    )
    _configured_for = key
    return celery_app


class _ProcessThread:
    """One daemon thread per process running `_run`, started on first use: a pool process forks
    after import, and a thread does not survive a fork, so the check is made on every use."""

    thread_name = "worker-helper"

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._pid = 0

    def _ensure_thread(self) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError


class Heartbeats(_ProcessThread):
    """Refreshes `heartbeat_at` of the attempts this process runs, from one background thread.

    One thread per process, started on first use (after the pool's fork), rather than one per task:
    most tasks finish long before their first heartbeat is due, and starting and joining a thread
    for each of them was a measurable share of a worker's time.
    """

    thread_name = "heartbeats"

    def __init__(self, interval_sec: float) -> None:
        super().__init__()
        self._interval = interval_sec
        self._running: dict[tuple[uuid.UUID, int], float] = {}
        # Attempts whose outcome is being written: their write reports what happened to them.
        self._recording: set[tuple[uuid.UUID, int]] = set()
        self._lock = threading.Lock()

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

    @contextmanager
    def recording(self, task_id: uuid.UUID, attempt: int) -> Iterator[None]:
        """Inside `beating`, around the outcome's write: a beat that finds the attempt no longer
        STARTED then says nothing, since the write may just have moved it (and if someone else did,
        the write says so)."""
        with self._lock:
            self._recording.add((task_id, attempt))
        try:
            yield
        finally:
            with self._lock:
                self._recording.discard((task_id, attempt))

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
            if (task_id, attempt) not in self._running or (not alive and (task_id, attempt) in self._recording):
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


class ResultNotStorable(ValueError):
    """The handler's result cannot be stored as it is; the attempt fails with this error."""


def storable_result(value: Any, *, max_bytes: int) -> Any:
    """The handler's result, if PostgreSQL's jsonb can store it and the API can give it back: JSON
    (no NaN or infinity), no NUL character, valid Unicode (no lone surrogate), nested at most
    MAX_JSON_DEPTH levels deep (the payload's limit) and at most `max_bytes` as UTF-8 JSON. Else
    ResultNotStorable, which fails the attempt."""
    _check_strings_and_depth(value)
    try:
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ResultNotStorable(f"the handler's result is not JSON-serialisable: {exc}") from None
    size = len(encoded.encode("utf-8"))
    if size > max_bytes:
        raise ResultNotStorable(
            f"the handler's result is {size} bytes as JSON, over MAX_RESULT_BYTES ({max_bytes}): store large"
            " data elsewhere and return a reference to it"
        )
    return value


def _check_strings_and_depth(value: Any) -> None:
    """Walk the containers without recursion (a deep result must not exhaust the stack) and check
    every string, keys included."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_string(item)
        elif isinstance(item, dict | list | tuple):
            if depth >= MAX_JSON_DEPTH:
                raise ResultNotStorable(f"the handler's result is nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                for key in item:
                    if isinstance(key, str):
                        _check_string(key)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_string(text: str) -> None:
    if "\x00" in text:
        raise ResultNotStorable("the handler's result contains a NUL character, which PostgreSQL cannot store")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ResultNotStorable(
                "the handler's result contains a lone UTF-16 surrogate (not valid Unicode), which PostgreSQL"
                " cannot store"
            ) from None


class GaveUp(Exception):
    """The database stayed unreachable for WORKER_DB_RETRY_SEC: the write was not made (or its
    reply never came back)."""


# The pause between two tries of a write while the database is away doubles up to this cap: short,
# so that once it is back the outcome lands within about a heartbeat, before the stuck sweep (which
# sees heartbeats as old as the outage) could take the attempt away.
_RETRY_PAUSE_MAX_SEC = 2.0


def _persistently(statement: Callable[[Connection], T], *, within_sec: float, what: str, fields: dict[str, Any]) -> T:
    """`db.run_statement(statement)`, tried again after a transient failure (the database
    unreachable, restarting or failing over) with a capped, jittered doubling pause, for up to
    `within_sec`; then GaveUp. Safe because every statement here is a compare-and-set: a try whose
    reply was lost after it committed makes the next try match no row (or, for a claim, find its own).
    Errors that are not transient (a value refused, a bug) are raised at once."""
    deadline = time.monotonic() + within_sec
    pause = 0.2
    tries = 0
    while True:
        tries += 1
        try:
            return db.run_statement(statement)
        except SQLAlchemyError as exc:
            if not db.is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise GaveUp(f"{_describe(exc)} for {within_sec:g}s ({tries} tries)") from exc
            if tries == 1:
                log.warning(
                    "could not %s (%s); retrying for up to %gs",
                    what,
                    _describe(exc),
                    within_sec,
                    extra={**fields, "event": "db_retry"},
                )
            time.sleep(min(left, random.uniform(pause / 2, pause)))
            pause = min(pause * 2, _RETRY_PAUSE_MAX_SEC)


def _describe(exc: BaseException) -> str:
    """A database error in a few words, without its message: PostgreSQL's message may quote the
    value it refused (a result, an error text), which must not reach the logs or the task."""
    orig = getattr(exc, "orig", None) or exc
    sqlstate = getattr(orig, "sqlstate", None)
    return f"{type(orig).__name__}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")


def _error_text(exc: BaseException) -> str:
    """`Type: message` of a handler's exception, even when its __str__ itself fails."""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not lose the failure it describes
        message = "<the exception's message could not be read>"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def run_attempt(task_id: uuid.UUID, attempt: int, *, worker: str | None = None) -> str:
    """Claim, run and record one attempt. Returns what happened, for logs and tests: "dropped",
    "succeeded", "failed", "dead", "fenced" or "unrecorded" (the outcome could not be written).

    `worker` (the Celery node name) is recorded on the STARTED event, to show who ran it. Only a
    claim that cannot be made for WORKER_DB_RETRY_SEC raises (GaveUp): the task is still ENQUEUED
    (or STARTED without a heartbeat), and the sweeps take it from there.
    """
    settings = get_settings()
    fields: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
    # Names this claim, so that sending it again after a lost reply finds the claim it made.
    claim_token = uuid.uuid4()
    claimed = _persistently(
        lambda conn: task_store.claim(conn, task_id=task_id, attempt=attempt, worker=worker, token=claim_token),
        within_sec=settings.worker_db_retry_sec,
        what="claim the attempt",
        fields=fields,
    )
    if claimed is None:
        log.info("stale message dropped", extra={**fields, "event": "dropped"})
        return "dropped"
    log.info("ENQUEUED -> STARTED", extra={**fields, "event": "started", "task_name": claimed.name})

    handler = handlers.get_handler(claimed.name)
    timeout = claimed.timeout_sec or settings.stuck_after_sec
    error: str | None = None
    timed_out = False
    result: Any = None
    heartbeats = _process_heartbeats(settings.heartbeat_sec)
    # The outcome is written inside the block too: while a write waits for the database to come
    # back, the attempt keeps heartbeating, so it is not declared stuck meanwhile.
    with heartbeats.beating(task_id, attempt):
        token = handlers.current_attempt.set(attempt - claimed.retry_base_attempt)
        try:
            with _time_limit(timeout):
                if handler is None:
                    raise handlers.HandlerError(f"no handler registered for {claimed.name!r} (check TASK_MODULES)")
                result = storable_result(handler(claimed.payload), max_bytes=settings.max_result_bytes)
        except AttemptTimedOut:
            timed_out = True
            error = f"timed out after {timeout:g}s"
        except Exception as exc:  # any handler failure is a failed attempt
            error = _error_text(exc)
        finally:
            handlers.current_attempt.reset(token)
        return _record(task_id, attempt, claimed, result, error, timed_out, heartbeats, settings)


def _record(
    task_id: uuid.UUID,
    attempt: int,
    claimed: task_store.Claimed,
    result: Any,
    error: str | None,
    timed_out: bool,
    heartbeats: Heartbeats,
    settings: Settings,
) -> str:
    """Write the attempt's outcome (inside its `beating` block)."""
    fields: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
    with heartbeats.recording(task_id, attempt):
        if error is None:
            try:
                return _record_success(task_id, attempt, result, fields=fields, settings=settings)
            except SQLAlchemyError as exc:  # refused by the database all the same: a failed attempt
                error = f"the handler's result could not be stored: {_describe(exc)}"
                log.warning(
                    "result refused by the database (%s); recording a failed attempt",
                    _describe(exc),
                    extra={**fields, "event": "result_refused"},
                )
        return record_failure(
            task_id, attempt, error=error, timed_out=timed_out,
            max_retries=claimed.max_retries, retry_base_attempt=claimed.retry_base_attempt,
            settings=settings,
        )  # fmt: skip


def _record_success(
    task_id: uuid.UUID, attempt: int, result: Any, *, fields: dict[str, Any], settings: Settings
) -> str:
    """STARTED -> SUCCEEDED with `result`. Raises the database's error when it refuses the result."""
    try:
        done = _persistently(
            lambda conn: task_store.succeed(conn, task_id=task_id, attempt=attempt, result=result),
            within_sec=settings.worker_db_retry_sec,
            what="record the success",
            fields=fields,
        )
    except GaveUp as exc:
        return _gave_up(exc, "SUCCEEDED", fields)
    return _logged(done, "STARTED -> SUCCEEDED", "succeeded", fields)


def _gave_up(exc: GaveUp, outcome: str, fields: dict[str, Any]) -> str:
    log.error(
        "outcome %s not recorded, the database was unreachable: %s; the task stays STARTED until the stuck"
        " sweep retries it",
        outcome,
        exc,
        extra={**fields, "event": "unrecorded"},
    )
    return "unrecorded"


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
    """A failed attempt: FAILED with a backoff while retries remain, else DEAD and a DLQ message.

    The error text is stored escaped and clipped (`storable_error`). Should the database refuse it
    all the same, the failure is recorded with a generic text instead; should the database stay
    unreachable, it is logged and left to the stuck sweep ("unrecorded").
    """
    fields: dict[str, Any] = {"task_id": str(task_id), "attempt": attempt}
    error = task_store.storable_error(error) or ""
    policy = (timed_out, max_retries, retry_base_attempt, settings, fields)
    try:
        try:
            return _record_failure(task_id, attempt, error, *policy)
        except SQLAlchemyError as exc:  # the error text refused despite storable_error: keep the failure
            refused = _describe(exc)
        log.warning(
            "error text refused by the database (%s); recording the failure without it",
            refused,
            extra={**fields, "event": "error_refused"},
        )
        error = f"the attempt failed, but its error text could not be stored ({refused})"
        return _record_failure(task_id, attempt, error, *policy)
    except GaveUp as exc:
        return _gave_up(exc, "failure", fields)


def _record_failure(
    task_id: uuid.UUID,
    attempt: int,
    error: str,
    timed_out: bool,
    max_retries: int,
    retry_base_attempt: int,
    settings: Settings,
    fields: dict[str, Any],
) -> str:
    if has_retries_left(attempt, max_retries, retry_base_attempt):
        delay = backoff_sec(
            attempt - retry_base_attempt, base=settings.retry_backoff_base_sec, cap=settings.retry_backoff_max_sec
        )
        done = _persistently(
            lambda conn: task_store.fail(conn, task_id=task_id, attempt=attempt, error=error, retry_in_sec=delay),
            within_sec=settings.worker_db_retry_sec,
            what="record the failure",
            fields=fields,
        )
        return _logged(done, f"STARTED -> FAILED, retry in {delay:.2f}s", "failed", fields)
    reason = DlqReason.STUCK_TASK_TIMEOUT if timed_out else DlqReason.MAX_RETRIES_EXCEEDED
    name = _persistently(
        lambda conn: task_store.kill(conn, task_id=task_id, attempt=attempt, error=error, reason=reason),
        within_sec=settings.worker_db_retry_sec,
        what="record the failure",
        fields=fields,
    )
    if name is not None:
        try:
            publish_dead([(task_id, attempt, name, reason.value, error)])
        except Exception as exc:  # the broker may be away; the DLQ sweep publishes DEAD tasks it has no row for
            log.warning("could not publish the DLQ message: %s", exc, extra={**fields, "event": "dlq_unpublished"})
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


class Slicer(_ProcessThread):
    """Hands off the rest of each message whose slice has passed, from one background thread per
    process (started on first use, after the pool's fork), even while the message's current
    attempt runs in the main thread.

    A thread rather than a signal: SIGALRM is the handler's time limit (see _time_limit). It publishes
    through Celery's producer pool, which gives each thread a producer and connection of its own.
    """

    thread_name = "message-slicer"

    def __init__(self) -> None:
        super().__init__()
        self._watched: list[MessageSlice] = []
        self._changed = threading.Condition()

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
    shadow = getattr(self.request, "shadow", None)

    def send_back(rest: Sequence[tuple[uuid.UUID, int]]) -> None:
        assert queue is not None
        _publish_message(rest, queue=queue, time_limit_sec=hard_limit, shadow=rest_name(shadow, len(rest)))

    return run_attempts(
        [(uuid.UUID(task_id), int(attempt)) for task_id, attempt in items],
        # The pool process's pid: the one to kill to stop this attempt (README, walkthrough B).
        worker=f"{self.request.hostname} pid {os.getpid()}",
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
    items: Iterable[task_store.Dispatched],
    *,
    default_timeout_sec: float,
    max_per_message: int = 1,
    producer: Any = None,
    retry_policy: dict[str, Any] | None = None,
) -> int:
    """Publish `(task_id, attempt)` to each task's queue over one producer connection, grouped into
    messages by `messages_for`. `producer` and `retry_policy`: the scheduler's own (see CeleryPublisher)."""
    count = 0
    # A worker that has its outcome in hand keeps retrying the write for WORKER_DB_RETRY_SEC while
    # the database is away: the hard limit must not kill it meanwhile and lose that outcome.
    outcome_write_sec = get_settings().worker_db_retry_sec
    with configure_celery().producer_or_acquire(producer) as producer:
        for chunk in messages_for(items, max_per_message=max_per_message):
            # Celery's hard limit, for a handler that ignores its own (see _time_limit): the slice,
            # the longest task limit in the message, the outcome's write and a grace period.
            longest = max(item.timeout_sec or default_timeout_sec for item in chunk)
            _publish_message(
                [(item.id, item.attempt) for item in chunk],
                queue=chunk[0].queue,
                time_limit_sec=MESSAGE_SLICE_SEC + longest + outcome_write_sec + HARD_LIMIT_GRACE_SEC,
                producer=producer,
                retry_policy=retry_policy,
                shadow=message_name([item.name for item in chunk]),
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


# Handler names a message's shadow name lists at most; the count says how many tasks it carries.
_NAMES_SHOWN = 3


def message_name(names: Sequence[str]) -> str | None:
    """The name Flower, `celery events` and Celery's logs show for a message instead of
    EXECUTE (its shadow name): the handler names it carries, e.g. `send_email`,
    `send_email (20 tasks)`, `send_email, resize (5 tasks)`, `a, b, c +2 more (9 tasks)`.
    None (EXECUTE) when the names are unknown."""
    distinct = list(dict.fromkeys(name for name in names if name))
    if not distinct:
        return None
    shown = ", ".join(distinct[:_NAMES_SHOWN])
    if len(distinct) > _NAMES_SHOWN:
        shown += f" +{len(distinct) - _NAMES_SHOWN} more"
    return shown if len(names) == 1 else f"{shown} ({len(names)} tasks)"


def rest_name(shadow: str | None, count: int) -> str | None:
    """The name of a message's rest, sent back to the queue: the message's names (the names of the
    tasks not yet claimed are not known here; the message's are a superset) with the new count."""
    if not shadow:
        return None
    names = _COUNT_SUFFIX.sub("", shadow)
    return names if count == 1 else f"{names} ({count} tasks)"


_COUNT_SUFFIX = re.compile(r" \(\d+ tasks\)$")


def _publish_message(
    items: Sequence[tuple[uuid.UUID, int]],
    *,
    queue: str,
    time_limit_sec: float | None,
    producer: Any = None,
    retry_policy: dict[str, Any] | None = None,
    shadow: str | None = None,
) -> None:
    execute_many.apply_async(
        ([[str(task_id), attempt] for task_id, attempt in items],),
        queue=queue,
        routing_key=queue,
        time_limit=time_limit_sec,
        producer=producer,
        retry_policy=retry_policy,
        shadow=shadow,
    )


def publish_dead(
    items: Iterable[tuple[uuid.UUID, int, str, str, str | None]],
    *,
    producer: Any = None,
    retry_policy: dict[str, Any] | None = None,
) -> int:
    """Publish DLQ messages `(task_id, attempt, name, reason, error)`."""
    app = configure_celery()
    count = 0
    with app.producer_or_acquire(producer) as producer:
        for task_id, attempt, name, reason, error in items:
            record_dead.apply_async(
                (str(task_id), attempt, name, reason, error),
                queue=Queue.DLQ.value,
                routing_key=Queue.DLQ.value,
                producer=producer,
                retry_policy=retry_policy,
                shadow=f"dead: {name}",
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
