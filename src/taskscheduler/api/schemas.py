"""Request and response bodies. Validation is strict: a wrong type is a 422, never coerced."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, field_validator

from taskscheduler.lifecycle import MAX_PRIORITY, MIN_PRIORITY, TaskStatus

_NUMERIC = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*$")


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
        StrictInt, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY, description="8-10 high, 4-7 default, 1-3 low.")
    ] = 5
    run_at: Annotated[
        AwareDatetime | None,
        Field(description="ISO 8601 with a UTC offset, e.g. 2030-01-01T12:00:00Z. Default: now."),
    ] = None
    max_retries: Annotated[StrictInt, Field(ge=0, le=100, description="Retries after the first attempt.")] = 3
    timeout_sec: Annotated[
        float | None,
        Field(gt=0, le=7 * 24 * 3600, allow_inf_nan=False, description="Run-time limit; default STUCK_AFTER_SEC."),
    ] = None

    @field_validator("run_at", mode="before")
    @classmethod
    def _iso_string_only(cls, value: Any) -> Any:
        # Pydantic would read numbers (and numeric strings) as Unix times; we ask for ISO 8601.
        if value is not None and (not isinstance(value, str) or _NUMERIC.match(value)):
            raise ValueError("run_at must be an ISO 8601 string with a UTC offset, e.g. 2030-01-01T12:00:00Z")
        return value

    @field_validator("timeout_sec", mode="before")
    @classmethod
    def _number_only(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError("timeout_sec must be a number of seconds")
        return value


class TaskOut(BaseModel):
    id: uuid.UUID
    name: str
    payload: dict[str, Any]
    priority: int
    queue: str
    status: TaskStatus
    run_at: datetime
    attempt: int
    max_retries: int
    timeout_sec: float | None
    last_error: str | None
    result: Any
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


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
