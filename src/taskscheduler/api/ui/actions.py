"""What the dashboard changes, each behind a confirmation page and a POST with a CSRF token: cancel and
retry a task, retry dead tasks by filter; and logging in and out.

Cancel and retry call the store functions the API's routes call, with the same lock timeout, and a
refusal is the API's 409 with the API's words.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from taskscheduler.api.deps import ConnDep, DatabaseDep, LockingConnDep
from taskscheduler.api.dlq import retry_dead_in_batches
from taskscheduler.api.tasks import refusal
from taskscheduler.api.ui.access import (
    CheckedFormDep,
    FormDep,
    SessionDep,
    field,
    login_refusals,
    page,
    redirect,
    require_login,
    safe_next,
    see_other,
    sessions_of,
    set_cookie,
)
from taskscheduler.api.ui.pages import BadInput, dead_filter
from taskscheduler.api.ui.session import COOKIE_NAME
from taskscheduler.lifecycle import CANCELLABLE, RETRYABLE
from taskscheduler.store import operations, views

router = APIRouter(dependencies=[Depends(require_login)], include_in_schema=False)
public_router = APIRouter(include_in_schema=False)


def _task_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise BadInput(f"{value[:80]!r} is not a task id") from None


# --- cancel and retry one task ------------------------------------------------------------------------------------

_ACTIONS = {
    # action: (verb, past participle, statuses it applies to, the store function, the event's detail)
    "cancel": ("cancel", "cancelled", CANCELLABLE, operations.cancel, "cancelled from the dashboard"),
    "retry": ("retry", "retried", RETRYABLE, operations.retry, "retried from the dashboard"),
}


@router.get("/tasks/{task_id}/{action}")
def confirm_task_action(request: Request, task_id: str, action: str, conn: ConnDep) -> Response:
    if action not in _ACTIONS:
        return page(request, "error.html", status_code=404, title="Not found", message="No such page.")
    parsed = _task_id(task_id)
    row = operations.get_task(conn, parsed)
    if row is None:
        return page(request, "error.html", status_code=404, title="No such task",
                    message=f"There is no task with id {parsed}.")  # fmt: skip
    verb, past, allowed, _, _ = _ACTIONS[action]
    what = (
        "It becomes CANCELLED and never runs; a retry can bring it back."
        if action == "cancel"
        else "It becomes PENDING, due now, with a fresh retry budget; its history is kept."
    )
    return page(
        request,
        "confirm.html",
        nav="tasks",
        title=f"{verb.capitalize()} task {row['name']}?",
        message=f"{verb.capitalize()} task {row['id']} ({row['name']}, now {row['status']})? {what}",
        action=f"/tasks/{row['id']}/{action}",
        fields={},
        button=f"Yes, {verb} it",
        back=f"/tasks/{row['id']}",
        allowed=row["status"] in allowed,
        not_allowed=f"Only {', '.join(sorted(allowed))} tasks can be {past}; this one is {row['status']}.",
    )


@router.post("/tasks/{task_id}/{action}")
def task_action(request: Request, task_id: str, action: str, form: CheckedFormDep, conn: LockingConnDep) -> Response:
    if action not in _ACTIONS:
        return page(request, "error.html", status_code=404, title="Not found", message="No such page.")
    parsed = _task_id(task_id)
    verb, past, allowed, move, detail = _ACTIONS[action]
    moved = move(conn, parsed, detail=detail)
    if moved.row is None:
        refused = refusal(parsed, moved.status, verb, past, allowed)
        return page(request, "error.html", status_code=refused.status_code, title=f"Could not {verb} the task",
                    message=str(refused.detail), task_id=parsed if moved.status else None)  # fmt: skip
    return redirect(request, f"/tasks/{parsed}", done=past)


# --- retry dead tasks by filter -----------------------------------------------------------------------------------


@router.get("/dlq/retry")
def confirm_dlq_retry(request: Request, conn: ConnDep) -> Response:
    """How many DEAD tasks the filter matches now; the confirmation retries those (up to this moment)."""
    where = dead_filter(request.query_params)
    until = views.database_now(conn)
    n = views.count_dead_matching(conn, where, until=until)
    described = ", ".join(
        part
        for part in (
            f"named {where.name}" if where.name else "",
            f"dead of {where.reason}" if where.reason else "",
            f"finished since {where.since.isoformat()}" if where.since else "",
        )
        if part
    )
    return page(
        request,
        "confirm.html",
        nav="dlq",
        title=f"Retry {n:,} dead tasks?",
        message=f"{n:,} DEAD tasks{' ' + described if described else ''} will be retried: each becomes PENDING, due"
        " now, with a fresh retry budget.",
        count=n,
        action="/dlq/retry",
        fields={
            "name": where.name or "",
            "reason": where.reason or "",
            "since": where.since.isoformat() if where.since else "",
            "until": until.isoformat(),
        },
        button=f"Yes, retry {n:,} tasks",
        back="/dlq",
        allowed=n > 0,
        not_allowed="No DEAD task matches: nothing to retry.",
    )


@router.post("/dlq/retry")
def dlq_retry(request: Request, form: CheckedFormDep, database: DatabaseDep) -> Response:
    """Retry the DEAD tasks the confirmation counted: those matching that died up to `until` (a task
    that died after the count is left for the next look), in batches as `POST /dlq/retry` does."""
    where = dead_filter({k: field(form, k) for k in ("name", "reason", "since")})
    try:
        until = datetime.fromisoformat(field(form, "until") or "")
    except ValueError:
        raise BadInput("the confirmation form lost its time: open it again") from None
    retried = retry_dead_in_batches(
        database,
        name=where.name,
        reason=where.reason,
        since=where.since,
        until=until,
        detail="retried from the dashboard",
    )
    return redirect(request, "/dlq", retried=retried)


# --- login and logout ---------------------------------------------------------------------------------------------


@public_router.get("/login")
def login_form(request: Request, session: SessionDep) -> Response:
    if not sessions_of(request).login_required or session.logged_in:
        return redirect(request, "/")
    return page(request, "login.html", next=safe_next(request, request.query_params.get("next")), error=None)


@public_router.post("/login")
def login(request: Request, session: SessionDep, form: FormDep) -> Response:
    sessions = sessions_of(request)
    target = safe_next(request, field(form, "next"))
    if not sessions.csrf_ok(session, field(form, "csrf")):
        return page(request, "login.html", status_code=403, next=target,
                    error="The form expired: the key was not checked. Try again.")  # fmt: skip
    if not sessions.login_required:
        return redirect(request, "/")
    key_id = sessions.key_id_for((field(form, "key") or "").strip())
    if key_id is None:
        client = request.client.host if request.client else "unknown"
        login_refusals.refused(client, "invalid API key", "POST /ui/login")
        return page(request, "login.html", status_code=401, next=target, error="That is not one of the API keys.")
    new_session, cookie = sessions.logged_in(key_id)
    request.state.ui_session = new_session
    set_cookie(request, COOKIE_NAME, cookie)
    return see_other(request, target)


@public_router.post("/logout")
def logout(request: Request, session: SessionDep, form: FormDep) -> Response:
    sessions = sessions_of(request)
    if not sessions.csrf_ok(session, field(form, "csrf")):
        message = "The form expired or did not come from this dashboard. Reload the page and try again."
        return page(request, "error.html", status_code=403, title="Not logged out", message=message)
    set_cookie(request, COOKIE_NAME, None)
    return redirect(request, "/login" if sessions.login_required else "/")
