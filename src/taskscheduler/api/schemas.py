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


# An integer as JSON Schema means it: no strings, no booleans, no fractions.
JsonInt = Annotated[int, BeforeValidator(_json_integer), Strict()]

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
    priority: Annotated[
        JsonInt, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY, description="8-10 high, 4-7 default, 1-3 low.")
    ] = 5
    run_at: Annotated[
        IsoDatetime | None,
        Field(description="ISO 8601 with a UTC offset, e.g. 2030-01-01T12:00:00Z. Default: now."),
    ] = None
    max_retries: Annotated[JsonInt, Field(ge=0, le=100, description="Retries after the first attempt.")] = 3
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
    id: uuid.UUID
    name: str
    priority: int
    queue: str
    status: TaskStatus
    run_at: datetime
    attempt: int = Field(description="Dispatches so far; the fencing token of the current attempt.")
    max_retries: int
    timeout_sec: float | None
    last_error: str | None
    dead_reason: str | None = Field(
        None, description="Why the task is DEAD: max_retries_exceeded or stuck_task_timeout."
    )
    idempotency_key: str | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class TaskOut(_TaskBase):
    payload: dict[str, Any]
    result: Any


class TaskSummary(_TaskBase):
    """A task as listed: everything but `payload` and `result` (GET /tasks/{id} has them)."""


class TaskPage(BaseModel):
    tasks: list[TaskSummary]
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
    at: datetime
    from_status: TaskStatus | None
    to_status: TaskStatus
    attempt: int
    detail: str | None


class DlqEventOut(BaseModel):
    id: int
    task_id: uuid.UUID
    task_name: str
    attempt: int
    reason: str
    error: str | None
    created_at: datetime


class Health(BaseModel):
    status: str
    database: str | None = None
    broker: str | None = None
