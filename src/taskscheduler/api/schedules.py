"""The /schedules routes: recurring schedules, addressed by id or by name."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Body, HTTPException, Path, Query, Response, status
from sqlalchemy import Connection

from taskscheduler import handlers
from taskscheduler.api.deps import ConnDep, LockingConnDep, protected_router
from taskscheduler.api.errors import field_error, unknown_task, validation_error
from taskscheduler.api.schedule_schemas import (
    MAX_BACKFILL_FIRES,
    NOT_NULL,
    BackfillBody,
    BackfillOut,
    PauseBody,
    ScheduleCreate,
    ScheduleOut,
    SchedulePage,
    SchedulePatch,
)
from taskscheduler.api.schemas import TaskOut
from taskscheduler.schedule_spec import Spec
from taskscheduler.store import fires, operations
from taskscheduler.store import schedules as schedule_store

router = protected_router("schedules")

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No schedule with this id or name."}}
NAME_TAKEN: dict[int | str, dict[str, Any]] = {409: {"description": "Another schedule has this name."}}
# Two triggers in the same microsecond: the second finds that fire time taken.
TRIGGER_CONFLICT = "a task for this very moment exists already, try again"
ScheduleRef = Annotated[str, Path(min_length=1, max_length=200, description="The schedule's id or its name.")]


def _invalid(loc: list[str | int], message: str) -> HTTPException:
    return validation_error([field_error(["body", *loc], message)])


def _check(fields: Mapping[Any, Any]) -> None:
    """What the schema cannot check alone: a registered task, one of cron and every_sec, end after start."""
    if handlers.get_handler(fields["task"]) is None:
        raise validation_error([unknown_task(["body", "task"], fields["task"])])
    if (fields.get("cron") is None) == (fields.get("every_sec") is None):
        raise _invalid(["cron"], "give exactly one of cron and every_sec")
    start, end = fields.get("start_at"), fields.get("end_at")
    if start is not None and end is not None and end <= start:
        raise _invalid(["end_at"], "end_at must be after start_at")


def _out(row: Mapping[Any, Any]) -> ScheduleOut:
    next_fire_times = schedule_store.next_fire_times(row, now=datetime.now(UTC))
    return ScheduleOut.model_validate({**row, "next_fire_times": next_fire_times})


def _found(conn: Connection, ref: str, *, lock: bool = False) -> Mapping[Any, Any]:
    row = schedule_store.get_schedule(conn, ref, lock=lock)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"schedule {ref} not found")
    return row


def _name_taken(exc: schedule_store.ScheduleNameTaken) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, detail=str(exc))


@router.post(
    "/schedules",
    summary="Create a schedule",
    status_code=status.HTTP_201_CREATED,
    response_model=ScheduleOut,
    responses=NAME_TAKEN,
)
def create_schedule(body: ScheduleCreate, conn: ConnDep) -> ScheduleOut:
    """A schedule that creates a task of `task` at each fire time of `cron` (in `timezone`) or every
    `every_sec` seconds: 201 with the schedule and its next 5 fire times."""
    fields = body.model_dump()
    _check(fields)
    try:
        return _out(schedule_store.create_schedule(conn, fields))
    except schedule_store.ScheduleNameTaken as exc:
        raise _name_taken(exc) from None


def _cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _after(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError):
        raise validation_error([field_error(["query", "cursor"], "invalid cursor")]) from None


@router.get("/schedules", summary="List schedules", response_model=SchedulePage)
def list_schedules(
    conn: ConnDep,
    source: Annotated[str | None, Query(pattern="^(api|code)$", description="Only `api` or `code` schedules.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Schedules per page.")] = 100,
    cursor: Annotated[str | None, Query(max_length=400, description="The `next_cursor` of the previous page.")] = None,
) -> SchedulePage:
    """Schedules by name, each with its next 5 fire times and its counters."""
    rows = schedule_store.list_schedules(conn, limit=limit + 1, after=_after(cursor) if cursor else None, source=source)
    page = rows[:limit]
    next_cursor = _cursor(page[-1]["name"]) if len(rows) > limit else None
    return SchedulePage(schedules=[_out(r) for r in page], next_cursor=next_cursor)


@router.get("/schedules/{schedule}", summary="Get a schedule", response_model=ScheduleOut, responses=NOT_FOUND)
def get_schedule(schedule: ScheduleRef, conn: ConnDep) -> ScheduleOut:
    """The schedule, with its next 5 fire times, where it came from and its fire, skip and miss counts."""
    return _out(_found(conn, schedule))


@router.patch(
    "/schedules/{schedule}",
    summary="Change a schedule",
    response_model=ScheduleOut,
    responses={**NOT_FOUND, **NAME_TAKEN},
)
def patch_schedule(schedule: ScheduleRef, body: SchedulePatch, conn: LockingConnDep) -> ScheduleOut:
    """Change the fields given. A change of when it fires (cron, every_sec, timezone, start_at, end_at)
    moves its next fire to the first new fire time from now on; giving `cron` drops `every_sec` and
    the other way round. A schedule declared in code gets its declaration back at the next scheduler
    start."""
    changes = body.model_dump(exclude_unset=True)
    for name in NOT_NULL:
        if name in changes and changes[name] is None:
            raise _invalid([name], f"{name} cannot be null")
    if changes.get("cron") is not None and "every_sec" not in changes:
        changes["every_sec"] = None
    if changes.get("every_sec") is not None and "cron" not in changes:
        changes["cron"] = None
    current = _found(conn, schedule, lock=True)
    _check({**current, **changes})
    try:
        return _out(schedule_store.update_schedule(conn, current, changes))
    except schedule_store.ScheduleNameTaken as exc:
        raise _name_taken(exc) from None


@router.delete(
    "/schedules/{schedule}", summary="Delete a schedule", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND
)
def delete_schedule(schedule: ScheduleRef, conn: LockingConnDep) -> Response:
    """Delete the schedule. Its tasks stay, and `GET /tasks?schedule_id=` still finds them."""
    schedule_store.delete_schedule(conn, _found(conn, schedule, lock=True)["id"])
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/schedules/{schedule}/pause", summary="Pause a schedule", response_model=ScheduleOut, responses=NOT_FOUND)
def pause_schedule(
    schedule: ScheduleRef, conn: LockingConnDep, body: Annotated[PauseBody | None, Body()] = None
) -> ScheduleOut:
    """No fire until it is resumed; `note` says why."""
    row = _found(conn, schedule, lock=True)
    return _out(schedule_store.pause(conn, row["id"], (body or PauseBody()).note))


@router.post(
    "/schedules/{schedule}/resume", summary="Resume a schedule", response_model=ScheduleOut, responses=NOT_FOUND
)
def resume_schedule(schedule: ScheduleRef, conn: LockingConnDep) -> ScheduleOut:
    """Fire again, from the first fire time after now: what fell due while paused is not made up."""
    row = _found(conn, schedule, lock=True)
    return _out(schedule_store.resume(conn, row) if row["paused"] else row)


@router.post(
    "/schedules/{schedule}/trigger",
    summary="Run a schedule's task now",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskOut,
    responses=NOT_FOUND,
)
def trigger_schedule(schedule: ScheduleRef, conn: LockingConnDep) -> TaskOut:
    """One task now, as a fire at this moment would make it (paused or not, whatever the overlap)."""
    created = fires.trigger(conn, _found(conn, schedule, lock=True))
    if created is None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=TRIGGER_CONFLICT)
    task = operations.get_task(conn, created.id)
    assert task is not None
    return TaskOut.model_validate(dict(task))


@router.post(
    "/schedules/{schedule}/backfill",
    summary="Create the tasks of past fire times",
    response_model=BackfillOut,
    responses=NOT_FOUND,
)
def backfill_schedule(schedule: ScheduleRef, body: BackfillBody, conn: LockingConnDep) -> BackfillOut:
    """A task for every fire time from `start` to `end` (both included) that has none yet: safe to send
    again, and safe beside the live fires (one task per fire time, whoever makes it first)."""
    if body.end < body.start:
        raise _invalid(["end"], "end must not be before start")
    row = _found(conn, schedule, lock=True)
    spec: Spec = schedule_store.spec_of(row)
    times = []
    for t in spec.fire_times(body.start - timedelta(microseconds=1)):
        if t > body.end:
            break
        times.append(t)
        if len(times) > MAX_BACKFILL_FIRES:
            raise _invalid(["end"], f"the range holds more than {MAX_BACKFILL_FIRES} fire times: backfill it in parts")
    missing = sorted(set(times) - fires.fired_among(conn, row["id"], times))
    to_fire = [fires.fire_of(row, t) for t in missing]
    created = len(fires.create_fired_tasks(conn, to_fire))
    fires.count_fires(conn, row["id"], created)
    return BackfillOut(created=created, existing=len(times) - created)
