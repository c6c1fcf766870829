"""The dashboard's pages (GET): overview, tasks, task, dead letters, processes (the schedules' are in
`schedules`). Every read goes through `store` (the API's own functions where the API has one,
`store.views` for the rest)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from sqlalchemy import Connection

from taskscheduler import explain
from taskscheduler.api.deps import ConnDep, SettingsDep
from taskscheduler.api.explain import reasons_for
from taskscheduler.api.tasks import decode_cursor, encode_cursor
from taskscheduler.api.ui.access import page, redirect, require_login
from taskscheduler.api.ui.render import Series, line_chart
from taskscheduler.config import Settings
from taskscheduler.lifecycle import CANCELLABLE, RETRYABLE, TASK_QUEUES, TERMINAL, DlqReason, TaskStatus
from taskscheduler.store import operations, views
from taskscheduler.store import schedules as schedule_store

router = APIRouter(dependencies=[Depends(require_login)], include_in_schema=False)

PAGE_SIZE = 50
NEWEST_DEAD = 5
# A page whose reads take longer than this gets an error instead (a filter no index serves).
READ_TIMEOUT_SEC = 5.0
STATUSES = [s.value for s in TaskStatus]
QUEUES = [q.value for q in TASK_QUEUES]


class BadInput(Exception):
    """A filter or id the dashboard cannot use; shown on the page, with a 400."""


def _time(value: str | None, what: str) -> datetime | None:
    """A time from a form: ISO 8601; without an offset (a datetime-local input) it is UTC."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadInput(f"{what}: not a time; use 2030-01-31T12:00 (UTC) or an ISO 8601 time with an offset") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        return None


def _limit_time(conn: Connection) -> None:
    views.limit_statement_time(conn, READ_TIMEOUT_SEC)


# --- overview -----------------------------------------------------------------------------------------------------


def overview_data(conn: Connection, settings: Settings) -> dict[str, Any]:
    """What the overview shows; also what its auto-refresh fetches."""
    _limit_time(conn)
    now = views.database_now(conn)
    since = now.replace(second=0, microsecond=0) - timedelta(minutes=59)
    counts = views.status_counts(conn)
    activity = views.recent_activity(conn, now=now, since=since)
    stale_after = explain.stale_after_sec(settings.process_heartbeat_sec)
    return {
        "now": now,
        "counts": counts,
        "statuses": STATUSES,
        "queues": QUEUES,
        "charts": _charts(activity),
        "activity": activity,
        "recent_cap": views.RECENT_CAP,
        "dead_total": counts.totals[TaskStatus.DEAD],
        "newest_dead": views.newest_dead(conn, limit=NEWEST_DEAD),
        "processes": views.processes(conn, stale_after_sec=stale_after),
        "stale_after": stale_after,
    }


def _charts(activity: views.RecentActivity) -> list[Any]:
    slots = [activity.since + timedelta(minutes=i) for i in range(60)]
    labels = [f"-{59 - i} min" if i < 59 else "now" for i in range(60)]
    by_key = {(m.minute, m.queue): m for m in activity.minutes}
    counted_from = activity.counted_from

    def counted(slot: datetime) -> bool:
        # With the read capped, minutes before the oldest task read are unknown, not zero.
        return counted_from is None or slot >= counted_from.replace(second=0, microsecond=0)

    finished = []
    lag = []
    for queue in QUEUES:
        stats = [by_key.get((slot, queue)) for slot in slots]
        per_minute = [(s.finished if s else 0) if counted(t) else None for s, t in zip(stats, slots, strict=True)]
        finished.append(Series(queue, f"q-{queue}", per_minute))
        lag.append(Series(f"{queue} p50", f"q-{queue}", [s.lag_p50 if s else None for s in stats]))
        lag.append(Series(f"{queue} p95", f"q-{queue}", [s.lag_p95 if s else None for s in stats], dashed=True))
    return [
        line_chart("Finished per minute", "tasks", finished, labels, format_value=_tasks),
        line_chart("Dispatch lag (started_at - run_at)", "seconds", lag, labels, format_value=explain.duration),
    ]


def _tasks(value: float) -> str:
    return f"{value:,.1f}".rstrip("0").rstrip(".")


@router.get("/")
def overview(request: Request, conn: ConnDep, settings: SettingsDep) -> Response:
    return page(request, "overview.html", nav="overview", **overview_data(conn, settings))


@router.get("/overview/live")
def overview_live(request: Request, conn: ConnDep, settings: SettingsDep) -> Response:
    """The overview's changing part, which the page's script fetches every few seconds."""
    return page(request, "_overview_live.html", **overview_data(conn, settings))


# --- tasks --------------------------------------------------------------------------------------------------------


@router.get("/tasks")
def tasks(request: Request, conn: ConnDep) -> Response:
    query = request.query_params
    search = (query.get("q") or "").strip()
    if search:
        found = _uuid(search)
        if found is None:
            raise BadInput(f"search takes a task id (a UUID such as {uuid.UUID(int=0)}); {search[:60]!r} is not one")
        return redirect(request, f"/tasks/{found}")
    statuses = [s for s in query.getlist("status") if s]
    unknown = [s for s in statuses if s not in STATUSES]
    if unknown:
        raise BadInput(f"unknown status {unknown[0][:40]!r}")
    queue = query.get("queue") or None
    if queue is not None and queue not in QUEUES:
        raise BadInput(f"unknown queue {queue[:40]!r}")
    schedule = (query.get("schedule") or "").strip()
    where = operations.TaskFilter(
        statuses=[TaskStatus(s) for s in statuses],
        name=(query.get("name") or "").strip() or None,
        queue=queue,
        created_after=_time(query.get("created_after"), "created after"),
        created_before=_time(query.get("created_before"), "created before"),
        schedule_id=_schedule_id(conn, schedule) if schedule else None,
    )
    cursor = query.get("cursor") or None
    try:
        after = decode_cursor(cursor) if cursor else None
    except HTTPException:
        raise BadInput("this page's cursor is not valid: go back to the first page") from None
    _limit_time(conn)
    rows = operations.list_tasks(conn, where, limit=PAGE_SIZE + 1, after=after)
    shown = rows[:PAGE_SIZE]
    next_cursor = encode_cursor(shown[-1]["created_at"], shown[-1]["id"]) if len(rows) > PAGE_SIZE else None
    filters = {
        "status": statuses,
        "name": where.name or "",
        "queue": queue or "",
        "created_after": query.get("created_after") or "",
        "created_before": query.get("created_before") or "",
        "schedule": schedule,
    }
    return page(
        request,
        "tasks.html",
        nav="tasks",
        tasks=shown,
        filters=filters,
        statuses=STATUSES,
        queues=QUEUES,
        next_cursor=next_cursor,
        paged=cursor is not None,
    )


def _schedule_id(conn: Connection, ref: str) -> uuid.UUID:
    """The schedule a filter names, by id or name. An id needs no schedule: a deleted schedule's
    tasks keep its id."""
    found = _uuid(ref)
    if found is not None:
        return found
    row = schedule_store.get_schedule(conn, ref)
    if row is None:
        raise BadInput(f"there is no schedule named {ref[:200]!r}")
    schedule_id: uuid.UUID = row["id"]
    return schedule_id


@router.get("/tasks/{task_id}")
def task(request: Request, task_id: str, conn: ConnDep, settings: SettingsDep) -> Response:
    parsed = _uuid(task_id)
    row = operations.get_task(conn, parsed) if parsed is not None else None
    if row is None:
        return page(request, "error.html", status_code=404, title="No such task",
                    message=f"There is no task with id {task_id[:80]!r}.")  # fmt: skip
    assert parsed is not None
    events = operations.list_events(conn, parsed)
    now = views.database_now(conn)
    return page(
        request,
        "task.html",
        nav="tasks",
        task=row,
        timeline=timeline(events, now=now, finished=row["status"] in TERMINAL),
        attempts=attempts(events),
        reasons=reasons_for(conn, row, settings),
        schedule=schedule_store.get_schedule(conn, row["schedule_id"]) if row["schedule_id"] else None,
        can_cancel=row["status"] in CANCELLABLE,
        can_retry=row["status"] in RETRYABLE,
        done=request.query_params.get("done"),
        now=now,
    )


def timeline(events: list[Any], *, now: datetime, finished: bool) -> list[dict[str, Any]]:
    """The events, each with how long the task stayed in the status it entered (the current one: so far)."""
    out = []
    for i, event in enumerate(events):
        if i + 1 < len(events):
            stayed: float | None = (events[i + 1]["at"] - event["at"]).total_seconds()
        else:
            stayed = None if finished else (now - event["at"]).total_seconds()
        out.append({**dict(event), "stayed_sec": stayed, "current": i + 1 == len(events)})
    return out


def attempts(events: list[Any]) -> list[dict[str, Any]]:
    """Per attempt that ran: who ran it (the claim's detail), when it started, how it ended."""
    runs: dict[int, dict[str, Any]] = {}
    for event in events:
        if event["to_status"] == TaskStatus.STARTED:
            runs[event["attempt"]] = {"attempt": event["attempt"], "worker": event["detail"], "started": event["at"],
                                      "outcome": None, "ended": None}  # fmt: skip
        elif event["from_status"] == TaskStatus.STARTED and event["attempt"] in runs:
            runs[event["attempt"]].update(outcome=event["to_status"], ended=event["at"], detail=event["detail"])
    return [runs[n] for n in sorted(runs)]


# --- dead letters -------------------------------------------------------------------------------------------------


def dead_filter(values: Any) -> views.DeadFilter:
    reason = (values.get("reason") or "").strip() or None
    if reason is not None and reason not in {r.value for r in DlqReason}:
        raise BadInput(f"unknown reason {reason[:40]!r}")
    return views.DeadFilter(
        name=(values.get("name") or "").strip() or None, reason=reason, since=_time(values.get("since"), "since")
    )


def _dlq_cursor(value: str | None) -> tuple[datetime, int] | None:
    if not value:
        return None
    at, _, event_id = value.partition("~")
    try:
        return datetime.fromisoformat(at), int(event_id)
    except ValueError:
        raise BadInput("this page's cursor is not valid: go back to the first page") from None


@router.get("/dlq")
def dlq(request: Request, conn: ConnDep) -> Response:
    query = request.query_params
    where = dead_filter(query)
    before = _dlq_cursor(query.get("before"))
    _limit_time(conn)
    rows = views.dlq_page(conn, where, limit=PAGE_SIZE + 1, before=before)
    shown = rows[:PAGE_SIZE]
    next_before = f"{shown[-1]['created_at'].isoformat()}~{shown[-1]['id']}" if len(rows) > PAGE_SIZE else None
    return page(
        request,
        "dlq.html",
        nav="dlq",
        events=shown,
        filters={"name": where.name or "", "reason": where.reason or "", "since": query.get("since") or ""},
        reasons=[r.value for r in DlqReason],
        next_before=next_before,
        paged=before is not None,
        retried=query.get("retried"),
    )


# --- processes ----------------------------------------------------------------------------------------------------


@router.get("/processes")
def processes(request: Request, conn: ConnDep, settings: SettingsDep) -> Response:
    stale_after = explain.stale_after_sec(settings.process_heartbeat_sec)
    return page(
        request,
        "processes.html",
        nav="processes",
        processes=views.processes(conn, stale_after_sec=stale_after),
        stale_after=stale_after,
    )
