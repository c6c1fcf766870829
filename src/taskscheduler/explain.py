"""Why a task is not running (yet): a pure function from the task's row and the facts about its queue.

The facts are read in one go by `store.views.queue_facts`; this module decides, in words and as
codes, for `GET /tasks/{id}/explain`, the dashboard's task page and scripts. Every reason that holds
is given (a task waiting for its run_at on a queue with no live worker waits for both): the task's
own wait first (run_at, backoff), then what holds its dispatch back, then its queue's workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from taskscheduler.lifecycle import TERMINAL, TaskStatus


class ReasonCode(StrEnum):
    WAITING_FOR_RUN_AT = "waiting_for_run_at"
    RETRY_BACKOFF = "retry_backoff"
    NO_LIVE_SCHEDULER = "no_live_scheduler"
    QUEUE_BACKPRESSURE = "queue_backpressure"
    BEHIND_DUE_TASKS = "behind_due_tasks"
    DUE_NOW = "due_now"
    NO_LIVE_WORKER = "no_live_worker"
    WAITING_FOR_WORKER = "waiting_for_worker"
    MESSAGE_MAYBE_LOST = "message_maybe_lost"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class QueueFacts:
    """What is true of the task's queue and of the processes now, as the database sees it."""

    now: datetime
    queue: str
    unclaimed: int  # ENQUEUED tasks of the queue: published, not yet claimed by a worker
    max_enqueued: int  # MAX_ENQUEUED_PER_QUEUE
    refill_at: int  # a held-back queue gets more once this much room opens (scheduler.dispatch)
    live_workers: int  # worker processes consuming the queue whose heartbeat is fresh
    live_schedulers: int
    stale_after_sec: float  # a process heartbeat older than this is not alive
    enqueue_timeout_sec: float  # ENQUEUE_TIMEOUT_SEC
    due_ahead: int = 0  # due tasks of the queue that a dispatch takes before this one (at most due_ahead_cap)
    due_ahead_cap: int = 0  # when due_ahead reached it, there are at least that many


@dataclass(frozen=True)
class Reason:
    code: ReasonCode
    message: str
    # When the reason clears by itself (a run_at, a backoff), if it does.
    until: datetime | None = None


def duration(seconds: float) -> str:
    """`2 h 5 min`, `3 min 20 s`, `5 min`, `4.2 s`, `250 ms`: a span in words for people, to the precision
    that matters."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    for big, big_unit, small, small_unit in (
        (days, "d", hours, "h"),
        (hours, "h", minutes, "min"),
        (minutes, "min", secs, "s"),
    ):
        if big:
            # A whole number of the larger unit says it alone (`5 min`, not `5 min 0 s`).
            return f"{big} {big_unit} {small} {small_unit}" if small else f"{big} {big_unit}"
    return f"{secs} s"


def _tasks(n: int) -> str:
    return f"{n:,} task" if n == 1 else f"{n:,} tasks"


def _at(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _since(facts: QueueFacts, then: datetime | None) -> float:
    return 0.0 if then is None else (facts.now - then).total_seconds()


def explain(task: Mapping[Any, Any], facts: QueueFacts) -> list[Reason]:
    """The reasons `task` (a tasks row) is not running now; a STARTED or finished task gets the one
    reason that says so."""
    status = TaskStatus(task["status"])
    if status == TaskStatus.STARTED:
        ran = duration(_since(facts, task.get("started_at")))
        return [Reason(ReasonCode.RUNNING, f"it is running: attempt {task['attempt']} started {ran} ago")]
    if status in TERMINAL:
        return [Reason(ReasonCode.FINISHED, _finished(task, status))]
    if status == TaskStatus.ENQUEUED:
        return _enqueued(task, facts)
    return _waiting(task, status, facts)


def _finished(task: Mapping[str, Any], status: TaskStatus) -> str:
    if status == TaskStatus.SUCCEEDED:
        return "it has finished: it SUCCEEDED"
    if status == TaskStatus.DEAD:
        reason = task.get("dead_reason") or "no retries left"
        return f"it is DEAD ({reason}) and runs again only if retried"
    return "it was CANCELLED and runs again only if retried"


def _waiting(task: Mapping[str, Any], status: TaskStatus, facts: QueueFacts) -> list[Reason]:
    """PENDING or FAILED: waiting for its run_at, or due and waiting for the scheduler to dispatch it."""
    reasons: list[Reason] = []
    run_at: datetime = task["run_at"]
    wait = (run_at - facts.now).total_seconds()
    due = wait <= 0
    if not due:
        if status == TaskStatus.FAILED:
            used = task["attempt"] - task.get("retry_base_attempt", 0)
            error = (task.get("last_error") or "").strip().splitlines()
            why = f": {error[0][:200]}" if error else ""
            message = (
                f"waiting out its retry backoff: attempt {task['attempt']} failed{why}; retry {used} of"
                f" {task['max_retries']} is due at {_at(run_at)}, in {duration(wait)}"
            )
            reasons.append(Reason(ReasonCode.RETRY_BACKOFF, message, until=run_at))
        else:
            message = f"waiting for its run_at, {_at(run_at)}: due in {duration(wait)}"
            reasons.append(Reason(ReasonCode.WAITING_FOR_RUN_AT, message, until=run_at))
    if facts.live_schedulers == 0:
        message = (
            f"no scheduler is running (none has recorded a heartbeat in the last {duration(facts.stale_after_sec)}):"
            " nothing dispatches due tasks; start `taskscheduler scheduler`"
        )
        reasons.append(Reason(ReasonCode.NO_LIVE_SCHEDULER, message))
    if due and facts.max_enqueued - facts.unclaimed < facts.refill_at:
        message = (
            f"queue {facts.queue} is held back: it has {_tasks(facts.unclaimed)} unclaimed"
            f" (MAX_ENQUEUED_PER_QUEUE is {facts.max_enqueued:,}); the scheduler dispatches more of it once its"
            f" workers have taken {facts.refill_at - (facts.max_enqueued - facts.unclaimed):,}"
        )
        reasons.append(Reason(ReasonCode.QUEUE_BACKPRESSURE, message))
    if due and facts.due_ahead > 0:
        capped = facts.due_ahead >= facts.due_ahead_cap > 0
        count = f"at least {facts.due_ahead:,}" if capped else f"{facts.due_ahead:,}"
        verb = "goes" if facts.due_ahead == 1 and not capped else "go"
        noun = "task" if facts.due_ahead == 1 and not capped else "tasks"
        message = f"{count} due {noun} of queue {facts.queue} {verb} first (a higher priority, or due earlier)"
        reasons.append(Reason(ReasonCode.BEHIND_DUE_TASKS, message))
    if due and not reasons:
        late = duration(-wait)
        message = f"due since {late} ago: the scheduler dispatches it at its next pass"
        reasons.append(Reason(ReasonCode.DUE_NOW, message))
    if facts.live_workers == 0:
        reasons.append(_no_worker(facts))
    return reasons


def _enqueued(task: Mapping[str, Any], facts: QueueFacts) -> list[Reason]:
    """ENQUEUED: its message is in the broker, waiting for a worker of its queue to claim it."""
    reasons: list[Reason] = []
    waited = _since(facts, task.get("published_at"))
    if facts.live_workers == 0:
        reasons.append(_no_worker(facts))
    else:
        others = facts.unclaimed - 1
        are = "is" if others == 1 else "are"
        ahead = (
            f"; {others:,} other {'task' if others == 1 else 'tasks'} of the queue {are} unclaimed too"
            if others
            else ""
        )
        workers = "1 worker consumes" if facts.live_workers == 1 else f"{facts.live_workers} workers consume"
        message = (
            f"in the broker for {duration(waited)}, waiting for a worker: {workers} queue {facts.queue}"
            f" and each takes one task at a time{ahead}"
        )
        reasons.append(Reason(ReasonCode.WAITING_FOR_WORKER, message))
    if waited > facts.enqueue_timeout_sec:
        message = (
            f"unclaimed for longer than ENQUEUE_TIMEOUT_SEC ({duration(facts.enqueue_timeout_sec)}): its message may"
            " have been lost, and the scheduler publishes it again (same attempt)"
        )
        reasons.append(Reason(ReasonCode.MESSAGE_MAYBE_LOST, message))
    return reasons


def _no_worker(facts: QueueFacts) -> Reason:
    message = (
        f"no live worker consumes queue {facts.queue} (none has recorded a heartbeat in the last"
        f" {duration(facts.stale_after_sec)}); start `taskscheduler worker --queues {facts.queue}`"
    )
    return Reason(ReasonCode.NO_LIVE_WORKER, message)


def stale_after_sec(process_heartbeat_sec: float) -> float:
    """A process whose heartbeat is older than this is taken for dead (as `taskscheduler check` does)."""
    return 3 * process_heartbeat_sec


def refill_at(dispatch_batch_size: int, max_enqueued_per_queue: int) -> int:
    """The room a held-back queue needs before the scheduler dispatches to it again (scheduler.dispatch)."""
    return max(1, min(dispatch_batch_size, max_enqueued_per_queue // 4))
