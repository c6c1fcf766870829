"""The old home of the task statements, kept only for the modules another branch is moving right now
(worker.py, scheduler/dispatch.py, rescue.py, publisher.py): they follow the new modules when that
branch is merged, and this module goes."""

from taskscheduler.store.creation import IdempotencyKeyInFlux, NewTask, create_task
from taskscheduler.store.operations import get_task, list_events
from taskscheduler.store.sweeps import (
    DeadUnrecorded,
    Dispatched,
    dispatch_due,
    enqueued_per_queue,
    lock_stuck,
    take_lost_enqueued,
    take_unrecorded_dead,
)
from taskscheduler.store.transitions import (
    MAX_ERROR_CHARS,
    Claimed,
    claim,
    fail,
    heartbeat,
    kill,
    storable_error,
    succeed,
)

__all__ = [
    "MAX_ERROR_CHARS",
    "Claimed",
    "DeadUnrecorded",
    "Dispatched",
    "IdempotencyKeyInFlux",
    "NewTask",
    "claim",
    "create_task",
    "dispatch_due",
    "enqueued_per_queue",
    "fail",
    "get_task",
    "heartbeat",
    "kill",
    "list_events",
    "lock_stuck",
    "storable_error",
    "succeed",
    "take_lost_enqueued",
    "take_unrecorded_dead",
]
