"""The dashboard's schedules: the list, one schedule, and pause, resume and trigger, each behind a
confirmation page and a POST with a CSRF token. Every read and change goes through `store.schedules`,
as the API's /schedules routes do, with the same row lock."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import Connection

from taskscheduler.api.deps import ConnDep, LockingConnDep
from taskscheduler.api.schedules import TRIGGER_CONFLICT
from taskscheduler.api.ui.access import CheckedFormDep, field, page, redirect, require_login
from taskscheduler.store import fires, operations, views
from taskscheduler.store import schedules as schedule_store

router = APIRouter(dependencies=[Depends(require_login)], include_in_schema=False)

PAGE_SIZE = 50
# The newest tasks a schedule's page lists (the tasks page, filtered by the schedule, has them all).
NEWEST_TASKS = 10
NOTE_MAX_LENGTH = 1000


def _missing(request: Request, ref: str) -> Response:
    return page(request, "error.html", status_code=404, title="No such schedule",
                message=f"There is no schedule with id or name {ref[:200]!r}.")  # fmt: skip


@router.get("/schedules")
def schedules(request: Request, conn: ConnDep) -> Response:
    """Schedules by name, a keyset page after the name `after`."""
    after = request.query_params.get("after") or None
    rows = schedule_store.list_schedules(conn, limit=PAGE_SIZE + 1, after=after)
    shown = rows[:PAGE_SIZE]
    now = views.database_now(conn)
    return page(
        request,
        "schedules.html",
        nav="schedules",
        schedules=[_with_next_fires(row, now) for row in shown],
        next_after=shown[-1]["name"] if len(rows) > PAGE_SIZE else None,
        paged=after is not None,
    )


def _with_next_fires(row: Mapping[Any, Any], now: Any) -> dict[str, Any]:
    return {**row, "next_fire_times": schedule_store.next_fire_times(row, now=now)}


@router.get("/schedules/{ref}")
def schedule(request: Request, ref: str, conn: ConnDep) -> Response:
    row = schedule_store.get_schedule(conn, ref)
    if row is None:
        return _missing(request, ref)
    now = views.database_now(conn)
    newest = operations.list_tasks(conn, operations.TaskFilter(schedule_id=row["id"]), limit=NEWEST_TASKS)
    query = request.query_params
    return page(
        request,
        "schedule.html",
        nav="schedules",
        schedule=_with_next_fires(row, now),
        tasks=newest,
        done=query.get("done"),
        triggered=_uuid(query.get("task")),
    )


def _uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


# --- pause, resume, trigger ---------------------------------------------------------------------------------------

_ACTIONS = {
    # action: (verb, past participle, the button)
    "pause": ("pause", "paused", "Yes, pause it"),
    "resume": ("resume", "resumed", "Yes, resume it"),
    "trigger": ("trigger", "triggered", "Yes, create the task"),
}


def _refused(action: str, row: Mapping[Any, Any]) -> str | None:
    """Why `action` does not apply to the schedule now, or None."""
    if action == "pause" and row["paused"]:
        return f"Schedule {row['name']} is paused already."
    if action == "resume" and not row["paused"]:
        return f"Schedule {row['name']} is not paused."
    return None


def _what(action: str, row: Mapping[Any, Any], conn: Connection) -> str:
    name = row["name"]
    if action == "pause":
        return (
            f"Pause schedule {name}? It creates no task until it is resumed; the fire times that pass meanwhile are"
            " neither run nor counted as missed. Tasks it created already are left alone."
        )
    if action == "resume":
        upcoming = schedule_store.next_fire_times(row, now=views.database_now(conn))
        first = f" (next: {upcoming[0].isoformat()})" if upcoming else ""
        return (
            f"Resume schedule {name}? It fires again from the first fire time after now{first}; what fell due while"
            " it was paused is not made up."
        )
    return (
        f"Create one task of schedule {name} ({row['task']}) now? It is due at once, as a fire at this moment would"
        " make it, whether the schedule is paused or not and whatever its overlap policy."
    )


@router.get("/schedules/{ref}/{action}")
def confirm_schedule_action(request: Request, ref: str, action: str, conn: ConnDep) -> Response:
    if action not in _ACTIONS:
        return page(request, "error.html", status_code=404, title="Not found", message="No such page.")
    row = schedule_store.get_schedule(conn, ref)
    if row is None:
        return _missing(request, ref)
    verb, _, button = _ACTIONS[action]
    refused = _refused(action, row)
    inputs = []
    if action == "pause":
        inputs = [{"name": "note", "label": "Note (why it is paused; optional)", "maxlength": NOTE_MAX_LENGTH}]
    return page(
        request,
        "confirm.html",
        nav="schedules",
        title=f"{verb.capitalize()} schedule {row['name']}?",
        message=_what(action, row, conn),
        action=f"/schedules/{row['id']}/{action}",
        fields={},
        inputs=inputs,
        button=button,
        back=f"/schedules/{row['id']}",
        allowed=refused is None,
        not_allowed=refused,
    )


@router.post("/schedules/{ref}/{action}")
def schedule_action(request: Request, ref: str, action: str, form: CheckedFormDep, conn: LockingConnDep) -> Response:
    if action not in _ACTIONS:
        return page(request, "error.html", status_code=404, title="Not found", message="No such page.")
    row = schedule_store.get_schedule(conn, ref, lock=True)
    if row is None:
        return _missing(request, ref)
    verb, past, _ = _ACTIONS[action]
    refused = _refused(action, row)
    if refused is not None:
        return _conflict(request, verb, refused, row)
    task_id = None
    if action == "pause":
        note = (field(form, "note") or "").strip()[:NOTE_MAX_LENGTH] or None
        schedule_store.pause(conn, row["id"], note)
    elif action == "resume":
        schedule_store.resume(conn, row)
    else:
        created = fires.trigger(conn, row)
        if created is None:
            return _conflict(request, verb, TRIGGER_CONFLICT, row)
        task_id = created.id
    return redirect(request, f"/schedules/{row['id']}", done=past, task=task_id)


def _conflict(request: Request, verb: str, message: str, row: Mapping[Any, Any]) -> Response:
    return page(request, "error.html", status_code=409, title=f"Could not {verb} the schedule", message=message,
                schedule_id=row["id"])  # fmt: skip
