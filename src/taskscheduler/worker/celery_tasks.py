"""The Celery tasks that consume the broker's messages, registered under the names messages carry
(`broker.EXECUTE`, `broker.RECORD_DEAD`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from taskscheduler.broker import (
    EXECUTE,
    RECORD_DEAD,
    Attempt,
    DeadMessage,
    celery_app,
    decode_attempts,
    publish_message,
    rest_name,
)
from taskscheduler.store import dlq as dlq_store
from taskscheduler.worker import process
from taskscheduler.worker.execute import run_attempts

log = logging.getLogger(__name__)


@celery_app.task(name=EXECUTE, bind=True, ignore_result=True, acks_late=False)
def execute_many(self: Any, items: list[list[Any]]) -> list[str]:
    queue = (self.request.delivery_info or {}).get("routing_key")
    hard_limit = (self.request.timelimit or (None, None))[0]
    shadow = getattr(self.request, "shadow", None)

    def send_back(rest: Sequence[Attempt]) -> None:
        assert queue is not None
        publish_message(rest, queue=queue, time_limit_sec=hard_limit, shadow=rest_name(shadow, len(rest)))

    return run_attempts(
        decode_attempts(items),
        # The pool process's pid: the one to kill to stop this attempt (README, walkthrough B).
        worker=f"{self.request.hostname} pid {os.getpid()}",
        send_back=send_back if queue else None,
        database=process.database(),
    )


@celery_app.task(name=RECORD_DEAD, ignore_result=True)
def record_dead(task_id: str, attempt: int, task_name: str, reason: str, error: str | None) -> bool:
    dead = DeadMessage.decode(task_id, attempt, task_name, reason, error)
    inserted = process.database().run_statement(
        lambda conn: dlq_store.record_dlq_event(
            conn, task_id=dead.task_id, attempt=dead.attempt, task_name=dead.name, reason=dead.reason, error=dead.error
        )
    )
    log.info(
        "DLQ event recorded" if inserted else "DLQ event already recorded",
        extra={"task_id": task_id, "attempt": attempt, "event": "dlq", "reason": reason},
    )
    return inserted
