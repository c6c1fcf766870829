"""Request and response bodies. Validation is strict: a wrong type is a 422, never coerced."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    field_validator,
)

from taskscheduler.lifecycle import MAX_PRIORITY, MIN_PRIORITY, DlqReason, TaskStatus


def _json_integer(value: Any) -> Any:
    # JSON Schema counts 9.0 as an integer, so we do too; 9.5, "9" and true stay errors.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integers as JSON Schema means them: no strings, no booleans, no fractions. The bounds come before
# the BeforeValidator: placed after it, pydantic cannot attach them to the integer and writes them
# into the JSON schema as raw `ge`/`le` keys, which no OpenAPI tool reads (Swagger showed no range).
Priority = Annotated[int, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY), BeforeValidator(_json_integer), Strict()]
RetryCount = Annotated[int, Field(ge=0, le=100), BeforeValidator(_json_integer), Strict()]

_NUMERIC = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*$")


def _iso_string(value: Any) -> Any:
    # Pydantic would read numbers (and numeric strings) as Unix times; we ask for ISO 8601.
    if not isinstance(value, str) or _NUMERIC.match(value):
        raise ValueError("must be an ISO 8601 string with a UTC offset, e.g. 2030-01-01T12:00:00Z")
    return value


def _utc(value: datetime) -> datetime:
    # Python takes offsets up to ±23:59, PostgreSQL's timestamptz only up to ±15:59.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


# A moment in time as an ISO 8601 string with an offset: no naive times, no epoch numbers. In UTC
# once parsed, so that any offset the string may carry reaches the database.
IsoDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_string), AfterValidator(_utc)]


def _no_nul(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; the body guard catches it in JSON, this in query and header values.
    if value is not None and "\x00" in value:
        raise ValueError("the NUL character (%00) is not supported")
    return value


# A query or header string that may reach a text column.
NoNul = AfterValidator(_no_nul)
IDEMPOTENCY_KEY_MAX = 200
MAX_BATCH = 1000


class TaskCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "demo_ok", "payload": {"msg": "hello"}, "priority": 9, "max_retries": 2},
            ]
        },
    )

    name: Annotated[str, Field(min_length=1, max_length=200, description="A registered handler name.")]
    payload: Annotated[dict[str, Any], Field(strict=True, description="Any JSON object; given to the handler.")] = (
        Field(default_factory=dict)
    )
    priority: Annotated[Priority, Field(description="8-10 high, 4-7 default, 1-3 low.")] = 5
    run_at: Annotated[
        IsoDatetime | None,
        Field(description="ISO 8601 with a UTC offset, e.g. 2030-01-01T12:00:00Z. Default: now."),
    ] = None
    max_retries: Annotated[RetryCount, Field(description="Retries after the first attempt.")] = 3
    timeout_sec: Annotated[
        float | None,
        Field(gt=0, le=7 * 24 * 3600, allow_inf_nan=False, description="Run-time limit; default STUCK_AFTER_SEC."),
    ] = None
    idempotency_key: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=IDEMPOTENCY_KEY_MAX,
            description="Optional. Sending the same key again with the same request returns the first task"
            " (200) instead of creating another; with a different request it is a 409. The same as the"
            " `Idempotency-Key` header. Remembered as long as the task is kept (RETENTION_DAYS).",
        ),
    ] = None

    @field_validator("timeout_sec", mode="before")
    @classmethod
    def _number_only(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError("timeout_sec must be a number of seconds")
        return value

    def request_hash(self) -> str:
        """A hash of the request without its idempotency key, defaults applied and run_at in UTC: two
        requests that mean the same task hash the same."""
        canonical = self.model_dump(mode="json", exclude={"idempotency_key"})
        if self.run_at is not None:
            canonical["run_at"] = self.run_at.astimezone(UTC).isoformat()
        encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


class TaskBatchCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"tasks": [{"name": "demo_ok", "payload": {"n": 1}}, {"name": "demo_ok", "payload": {"n": 2}}]},
            ]
        },
    )

    tasks: Annotated[
        list[TaskCreate],
        Field(min_length=1, max_length=MAX_BATCH, description=f"1 to {MAX_BATCH} tasks, each as for POST /tasks."),
    ]


class _TaskBase(BaseModel):
    id: uuid.UUID = Field(description="The task's id.")
    name: str = Field(description="The handler that runs it.")
    priority: int = Field(description="1-10; decides the queue: 8-10 high, 4-7 default, 1-3 low.")
    queue: str = Field(description="The queue its messages go to: high, default or low.")
    status: TaskStatus = Field(description="Where it is in its lifecycle.")
    run_at: datetime = Field(description="When it runs next (or ran last); a retry moves it by the backoff.")
    attempt: int = Field(description="Dispatches so far; the fencing token of the current attempt.")
    max_retries: int = Field(description="Retries allowed after the first attempt (since the last API retry).")
    timeout_sec: float | None = Field(description="Its run-time limit in seconds; null means STUCK_AFTER_SEC.")
    last_error: str | None = Field(description="The error of its last failed attempt, if any.")
    dead_reason: str | None = Field(
        None, description="Why the task is DEAD: max_retries_exceeded or stuck_task_timeout."
    )
    idempotency_key: str | None = Field(None, description="The idempotency key it was created with, if any.")
    created_at: datetime = Field(description="When it was created.")
    updated_at: datetime = Field(description="When its status last changed.")
    started_at: datetime | None = Field(description="When its current or last attempt started.")
    finished_at: datetime | None = Field(description="When it reached SUCCEEDED, DEAD or CANCELLED.")
    schedule_id: uuid.UUID | None = Field(None, description="The schedule that created it, if one did.")
    scheduled_for: datetime | None = Field(None, description="The schedule's fire time it was created for.")


class TaskOut(_TaskBase):
    payload: dict[str, Any] = Field(description="The JSON object given to the handler.")
    result: Any = Field(description="What the handler returned (any JSON value); null until it succeeds.")


class TaskSummary(_TaskBase):
    """A task as listed: everything but `payload` and `result` (GET /tasks/{id} has them)."""


class TaskPage(BaseModel):
    tasks: list[TaskSummary] = Field(description="This page's tasks, newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null when this is the last page.")


class TaskBatchOut(BaseModel):
    tasks: list[TaskOut] = Field(description="The tasks, in the order of the request.")
    created: int = Field(description="How many were created (the rest were found by their idempotency key).")


class DlqRetryFilter(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "send_email", "reason": "max_retries_exceeded"}, {}]},
    )

    name: Annotated[str | None, Field(min_length=1, max_length=200, description="Only tasks of this name.")] = None
    reason: Annotated[DlqReason | None, Field(description="Only tasks that died for this reason.")] = None
    since: Annotated[
        IsoDatetime | None, Field(description="Only tasks that died at or after this time (ISO 8601 with offset).")
    ] = None


class DlqRetryOut(BaseModel):
    retried: int = Field(description="How many DEAD tasks are PENDING again.")


class TaskEventOut(BaseModel):
    at: datetime = Field(description="When the transition happened.")
    from_status: TaskStatus | None = Field(description="The status before; null for the task's creation.")
    to_status: TaskStatus = Field(description="The status after.")
    attempt: int = Field(description="The task's attempt at the time.")
    detail: str | None = Field(description="What happened, in words: an error, a rescue, who cancelled it.")


class DlqEventOut(BaseModel):
    id: int = Field(description="The event's id.")
    task_id: uuid.UUID = Field(description="The task that ended DEAD.")
    task_name: str = Field(description="The task's handler name.")
    attempt: int = Field(description="The attempt that ended DEAD (one event per task and attempt).")
    reason: str = Field(description="max_retries_exceeded or stuck_task_timeout.")
    error: str | None = Field(description="The last error of the task, if any.")
    created_at: datetime = Field(description="When the dead-letter worker recorded it.")


class Health(BaseModel):
    status: str = Field(description="ok, or unavailable when a dependency is not reachable.")
    database: str | None = Field(None, description="readyz only: ok, or why the database is unreachable.")
    broker: str | None = Field(None, description="readyz only: ok, or why the broker is unreachable.")
