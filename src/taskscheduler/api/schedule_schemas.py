"""Request and response bodies of the schedule routes; as strict as the tasks' (a wrong type is a 422)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator

from taskscheduler.api.schemas import IsoDatetime, Priority, RetryCount
from taskscheduler.schedule_spec import NEXT_FIRE_TIMES, Overlap, cron_fields, zone

MAX_CATCHUP_WINDOW_SEC = 30 * 86400
MAX_EVERY_SEC = 366 * 86400
MAX_BACKFILL_FIRES = 10_000


def _name(value: str) -> str:
    try:
        uuid.UUID(value)
    except ValueError:
        return value
    raise ValueError("a schedule name must not look like a UUID (names and ids share the routes' paths)")


def _cron(value: str | None) -> str | None:
    return None if value is None else cron_fields(value)


def _timezone(value: str | None) -> str | None:
    if value is not None:
        zone(value)
    return value


ScheduleName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$",
        description="Unique; usable in place of the id in every /schedules/{schedule} path. Letters, digits"
        " and `_ . : @ -`.",
    ),
    AfterValidator(_name),
]
TaskName = Annotated[str, Field(min_length=1, max_length=200, description="A registered handler name.")]
Cron = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        description="5-field cron (minute hour day-of-month month day-of-week) in `timezone`, or an alias:"
        " @hourly, @daily, @midnight, @weekly, @monthly, @yearly, @annually.",
    ),
    AfterValidator(_cron),
]
EverySec = Annotated[
    int, Field(ge=1, le=MAX_EVERY_SEC, description="Fire every this many seconds (exact, in UTC)."), Strict()
]
TimeZone = Annotated[
    str, Field(max_length=64, description="IANA time zone of `cron`, e.g. Europe/Berlin."), AfterValidator(_timezone)
]
JitterSec = Annotated[
    float,
    Field(
        ge=0, le=86400, allow_inf_nan=False, description="Each task runs up to this many seconds after its fire time."
    ),
]
CatchupWindowSec = Annotated[
    float,
    Field(
        ge=1,
        le=MAX_CATCHUP_WINDOW_SEC,
        allow_inf_nan=False,
        description="After downtime, fire times at most this old are still fired (oldest first); older ones are"
        " counted as missed.",
    ),
]
TimeoutSec = Annotated[
    float, Field(gt=0, le=7 * 24 * 3600, allow_inf_nan=False, description="Run-time limit of each task.")
]
Note = Annotated[str, Field(max_length=1000, description="Why it is paused, or anything else.")]


# Every property's description, shared by the request and response bodies.
DESCRIPTIONS = {
    "id": "The schedule's id.",
    "name": "Unique; usable in place of the id in every /schedules/{schedule} path.",
    "task": "The handler each task runs (a registered name).",
    "payload": "The JSON object each task gets.",
    "priority": "Of each task: 8-10 high, 4-7 default, 1-3 low.",
    "max_retries": "Of each task: retries after the first attempt.",
    "timeout_sec": "Of each task: its run-time limit in seconds; null means STUCK_AFTER_SEC.",
    "cron": "5-field cron in `timezone`, or an alias (@hourly, @daily, @weekly, @monthly, @yearly); or null"
    " with `every_sec`.",
    "every_sec": "Fire every this many seconds, exact in UTC; or null with `cron`.",
    "timezone": "IANA time zone in which `cron` is read, e.g. Europe/Berlin.",
    "start_at": "No fire before this time (ISO 8601 with offset); `every_sec` counts from it.",
    "end_at": "No fire after this time (ISO 8601 with offset).",
    "jitter_sec": "Each task runs at its fire time plus a delay in [0, jitter_sec], the same for a fire each time.",
    "overlap": "While its previous task has not finished: `skip` the fire, `allow` it, or `buffer_one` (one fire"
    " waits and is created when the previous task finishes).",
    "catchup_window_sec": "After downtime, fire times at most this old are still fired, oldest first; older ones"
    " are counted as missed.",
    "paused": "No fire while true.",
    "note": "Why it is paused, or anything else.",
    "created_at": "When it was created.",
    "updated_at": "When it was last changed (not when it last fired).",
    "schedules": "This page's schedules, by name.",
}


def _describe(schema: dict[str, Any]) -> None:
    for name, prop in schema.get("properties", {}).items():
        if name in DESCRIPTIONS:
            prop.setdefault("description", DESCRIPTIONS[name])


def _documented(*examples: dict[str, Any]) -> Any:
    """`json_schema_extra`: every property described, and these examples."""

    def extra(schema: dict[str, Any]) -> None:
        _describe(schema)
        if examples:
            schema["examples"] = list(examples)

    return extra


class _Seconds(BaseModel):
    @field_validator("timeout_sec", "jitter_sec", "catchup_window_sec", mode="before", check_fields=False)
    @classmethod
    def _number_only(cls, value: Any) -> Any:
        # Strict, as for tasks: "5" and true are not seconds.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError("must be a number of seconds")
        return value


class ScheduleCreate(_Seconds):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_documented(
            {"name": "nightly-report", "task": "demo_ok", "cron": "0 3 * * *", "timezone": "Europe/Berlin"},
            {"name": "heartbeat", "task": "demo_ok", "every_sec": 60, "overlap": "allow"},
        ),
    )

    name: ScheduleName
    task: TaskName
    payload: Annotated[dict[str, Any], Field(strict=True, description="The JSON object each task gets.")] = Field(
        default_factory=dict
    )
    priority: Annotated[Priority, Field(description="Of each task: 8-10 high, 4-7 default, 1-3 low.")] = 5
    max_retries: Annotated[RetryCount, Field(description="Of each task.")] = 3
    timeout_sec: TimeoutSec | None = None
    cron: Cron | None = None
    every_sec: EverySec | None = None
    timezone: TimeZone = "UTC"
    start_at: Annotated[IsoDatetime | None, Field(description="No fire before this.")] = None
    end_at: Annotated[IsoDatetime | None, Field(description="No fire after this.")] = None
    jitter_sec: JitterSec = 0.0
    overlap: Annotated[
        Overlap,
        Field(
            description="While its previous task has not finished: `skip` the fire, `allow` it, or"
            " `buffer_one` (one fire waits, and is created when the previous task finishes)."
        ),
    ] = Overlap.SKIP
    catchup_window_sec: CatchupWindowSec = 300.0
    paused: Annotated[bool, Strict()] = False
    note: Note | None = None


class SchedulePatch(_Seconds):
    """Only the fields given change. Giving `cron` drops `every_sec` and the other way round."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_documented({"cron": "0 4 * * *"}))

    name: ScheduleName | None = None
    task: TaskName | None = None
    payload: Annotated[dict[str, Any] | None, Field(strict=True)] = None
    priority: Priority | None = None
    max_retries: RetryCount | None = None
    timeout_sec: TimeoutSec | None = None
    cron: Cron | None = None
    every_sec: EverySec | None = None
    timezone: TimeZone | None = None
    start_at: IsoDatetime | None = None
    end_at: IsoDatetime | None = None
    jitter_sec: JitterSec | None = None
    overlap: Overlap | None = None
    catchup_window_sec: CatchupWindowSec | None = None
    note: Note | None = None


# Fields that cannot be null (PATCH may null the others: timeout_sec, start_at, end_at, note).
NOT_NULL = ("name", "task", "payload", "priority", "max_retries", "timezone", "jitter_sec", "overlap",
            "catchup_window_sec")  # fmt: skip


class PauseBody(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_documented({"note": "until the migration is done"}))

    note: Note | None = None


class BackfillBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"start": "2030-01-01T00:00:00Z", "end": "2030-01-02T00:00:00Z"}]},
    )

    start: Annotated[IsoDatetime, Field(description="From this time (inclusive).")]
    end: Annotated[IsoDatetime, Field(description="To this time (inclusive).")]


class BackfillOut(BaseModel):
    created: int = Field(description="Tasks created: fire times in the range that had none.")
    existing: int = Field(description="Fire times in the range that had their task already.")


class ScheduleOut(BaseModel):
    model_config = ConfigDict(json_schema_extra=_documented())

    id: uuid.UUID
    name: str
    task: str
    payload: dict[str, Any]
    priority: int
    max_retries: int
    timeout_sec: float | None
    cron: str | None
    every_sec: int | None
    timezone: str
    start_at: datetime | None
    end_at: datetime | None
    jitter_sec: float
    overlap: Overlap
    catchup_window_sec: float
    paused: bool
    note: str | None
    source: str = Field(description="`api`, or `code` (declared with `schedule(...)` in TASK_MODULES).")
    next_fire_at: datetime | None = Field(description="Its next fire time; null once it has ended (end_at).")
    next_fire_times: list[datetime] = Field(description=f"The next {NEXT_FIRE_TIMES} fire times (UTC).")
    last_fire_at: datetime | None = Field(description="The latest fire time it created a task for.")
    buffered_for: datetime | None = Field(description="overlap=buffer_one: the fire waiting for the running task.")
    fires: int = Field(description="Tasks it created (triggers and backfills included).")
    skips: int = Field(description="Fire times skipped because its previous task had not finished.")
    misses: int = Field(description="Fire times older than the catch-up window when the scheduler got to them.")
    last_skipped_at: datetime | None = Field(description="The latest fire time skipped or missed.")
    last_skip_reason: str | None = Field(description="`overlap` or `missed`.")
    created_at: datetime
    updated_at: datetime


class SchedulePage(BaseModel):
    model_config = ConfigDict(json_schema_extra=_documented())

    schedules: list[ScheduleOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")
