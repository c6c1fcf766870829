"""The routes. Each reads or writes through `store`; errors are 4xx with a clear `detail`.

`router` holds every route that asks for an API key when API_KEYS is set (enforced by
`api.auth.ApiKeyAuth`, for every path but the public ones); `health_router` the public probes.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Body, Header, HTTPException, Path, Query, Request, Response, Security, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import TypeAdapter
from sqlalchemy import text

from taskscheduler import handlers, metrics
from taskscheduler.api.body_guard import PreparsedJsonRoute
from taskscheduler.api.deps import ConnDep, LockingConnDep, SettingsDep
from taskscheduler.api.schemas import (
    IDEMPOTENCY_KEY_MAX,
    DlqEventOut,
    DlqRetryFilter,
    DlqRetryOut,
    Health,
    IsoDatetime,
    NoNul,
    TaskBatchCreate,
    TaskBatchOut,
    TaskCreate,
    TaskEventOut,
    TaskOut,
    TaskPage,
    TaskSummary,
)
from taskscheduler.config import MAX_JSON_DEPTH, Settings, redis_client_url
from taskscheduler.lifecycle import (
    CANCELLABLE,
    MAX_PRIORITY,
    MIN_PRIORITY,
    RETRYABLE,
    TERMINAL,
    TaskStatus,
    nested_deeper_than,
    queue_for_priority,
)
from taskscheduler.store import db
from taskscheduler.store import dlq as dlq_store
from taskscheduler.store import schedules as schedule_store
from taskscheduler.store import tasks as task_store

# Declares the scheme in the OpenAPI document, so Swagger shows "Authorize"; ApiKeyAuth enforces it.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="One of the keys in API_KEYS, sent as `Authorization: Bearer <key>`. Needed only when the"
    " server sets API_KEYS.",
)
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    400: {"description": "API_KEYS is set and the request has several Authorization headers."},
    401: {"description": "API_KEYS is set and no valid key was sent."},
}

router = APIRouter(dependencies=[Security(bearer)], responses=UNAUTHORIZED, route_class=PreparsedJsonRoute)
health_router = APIRouter(tags=["health"])

TASK_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No task with this id."}}
CONFLICT = {"description": "The task is in a status that does not allow this; `detail` says which."}

# Tasks moved per transaction by POST /dlq/retry.
DLQ_RETRY_BATCH = 1000


def _validation_error(errors: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=errors)


def _error(loc: list[str | int], message: str) -> dict[str, Any]:
    return {"loc": loc, "msg": message, "type": "value_error"}


def _not_found(task_id: uuid.UUID) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"task {task_id} not found")


# --- create -------------------------------------------------------------------------------------------------------


def check_new_task(body: TaskCreate, settings: Settings, loc: list[str | int]) -> list[dict[str, Any]]:
    """What the schema cannot check about a task to create: a registered name, a run_at not in the past."""
    errors = []
    if handlers.get_handler(body.name) is None:
        known = ", ".join(handlers.registered_names())
        errors.append(_error([*loc, "name"], f"unknown task name {body.name!r}; registered: {known}"))
    if body.run_at is not None:
        earliest = datetime.now(UTC) - timedelta(seconds=settings.run_at_grace_sec)
        if body.run_at < earliest:
            message = f"run_at is in the past (more than {settings.run_at_grace_sec:g}s ago)"
            errors.append(_error([*loc, "run_at"], message))
    return errors


# The schema has checked the range; a lookup per task instead of an enum's `.value`.
_QUEUE_OF_PRIORITY = {p: queue_for_priority(p).value for p in range(MIN_PRIORITY, MAX_PRIORITY + 1)}


def new_task_spec(body: TaskCreate, idempotency_key: str | None) -> task_store.NewTask:
    return task_store.NewTask(
        name=body.name,
        payload=body.payload,
        priority=body.priority,
        queue=_QUEUE_OF_PRIORITY[body.priority],
        run_at=body.run_at,
        max_retries=body.max_retries,
        timeout_sec=body.timeout_sec,
        idempotency_key=idempotency_key,
        request_hash=None if idempotency_key is None else body.request_hash(),
    )


def _conflict(exc: task_store.IdempotencyConflict) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, detail=str(exc))


TaskId = Annotated[uuid.UUID, Path(description="The task's id, as `id` in the task (a UUID).")]

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX,
        description="The same as the body's `idempotency_key`; when both are given they must be equal.",
    ),
    NoNul,
]


def _task_response(row: Mapping[Any, Any], status_code: int) -> Response:
    # Validated once here; returning a Response keeps FastAPI from validating the model a second
    # time (in the thread pool, for a sync route). response_model still documents the body.
    body = TaskOut.model_validate(dict(row)).model_dump_json()
    return Response(body, status_code=status_code, media_type="application/json")


def _statement_pool(request: Request) -> db.AsyncStatementPool | None:
    pool: db.AsyncStatementPool | None = getattr(request.app.state, "statement_pool", None)
    return pool


@router.post(
    "/tasks",
    summary="Create a task",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskOut,
    tags=["tasks"],
    responses={
        200: {"description": "An earlier request with this idempotency key and the same body created the task.",
              "model": TaskOut},
        409: {"description": "The idempotency key was used before with a different request."},
    },
)  # fmt: skip
async def create_task(
    request: Request,
    body: TaskCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Create a task that runs `name` with `payload` at `run_at` (default now): 201 with the task.

    With an idempotency key (the `idempotency_key` field or the `Idempotency-Key` header), sending
    the same request again returns the task the first one created, with 200: safe to retry after a
    timeout. The same key with a different request is a 409.
    """
    # async, on psycopg's async connections: a sync route costs a thread hop for each sync
    # dependency, the endpoint and the response validation.
    settings: Settings = request.app.state.settings
    if idempotency_key is not None and body.idempotency_key not in (None, idempotency_key):
        raise _validation_error(
            [_error(["header", "Idempotency-Key"], "the Idempotency-Key header and the body's idempotency_key differ")]
        )
    key = idempotency_key or body.idempotency_key
    url = settings.database_url or None
    if key is None:
        errors = check_new_task(body, settings, ["body"])
        if errors:
            raise _validation_error(errors)
        # One statement with nothing to be atomic with: autocommit, one round trip.
        row = await task_store.create_task_async(_statement_pool(request), new_task_spec(body, None), url)
        return _task_response(row, status.HTTP_201_CREATED)

    async def create_keyed(conn: db.AsyncConn) -> tuple[Mapping[Any, Any], bool]:
        # A replay returns the first task even if its run_at has passed since.
        existing = await task_store.get_by_idempotency_key_async(conn, key)
        if existing is not None:
            if existing["request_hash"] != body.request_hash():
                raise _conflict(task_store.IdempotencyConflict(key, existing["id"]))
            return existing, False
        errors = check_new_task(body, settings, ["body"])
        if errors:
            raise _validation_error(errors)
        try:
            (result,) = await task_store.create_tasks_async(conn, [new_task_spec(body, key)])
        except task_store.IdempotencyConflict as exc:
            raise _conflict(exc) from None
        return result.row, result.created

    found, created = await db.run_transaction_async(_statement_pool(request), create_keyed, url)
    return _task_response(found, status.HTTP_201_CREATED if created else status.HTTP_200_OK)


@router.post(
    "/tasks/batch",
    summary="Create up to 1,000 tasks at once",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskBatchOut,
    tags=["tasks"],
    responses={
        200: {"description": "Every task already existed (found by its idempotency key).", "model": TaskBatchOut},
        409: {"description": "A task's idempotency key was used before with a different request."},
    },
)
async def create_tasks(
    request: Request,
    body: TaskBatchCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Create up to 1,000 tasks in one transaction: all or none.

    Every task is checked as `POST /tasks` checks it before any is created; any error is a 422 that
    names each bad task by its index (`loc: ["body", "tasks", 3, "name"]`). Tasks may carry their
    own `idempotency_key`: those found (with the same request) are returned as they are, unchecked,
    as `POST /tasks` returns them, even if their run_at has passed since; `created` counts the new
    ones. A key found with a different request is a 409. 201, or 200 when every task already existed.
    """
    settings: Settings = request.app.state.settings
    if idempotency_key is not None:
        message = "a batch has no Idempotency-Key header: give each task its own idempotency_key"
        raise _validation_error([_error(["header", "Idempotency-Key"], message)])
    errors = {i: check_new_task(task, settings, ["body", "tasks", i]) for i, task in enumerate(body.tasks)}
    errors = {i: e for i, e in errors.items() if e}
    # Keys are looked up only when a task with one fails its checks: a replay of a batch sent
    # earlier must not be refused because its run_at has passed (or its handler has gone) since.
    keyed = {i: key for i in errors if (key := body.tasks[i].idempotency_key) is not None}
    if errors and not keyed:
        raise _validation_error([e for i in sorted(errors) for e in errors[i]])
    specs = [new_task_spec(t, t.idempotency_key) for t in body.tasks]

    async def create(conn: db.AsyncConn) -> list[task_store.CreateResult]:
        if keyed:
            existing = await task_store.get_by_idempotency_keys_async(conn, sorted(set(keyed.values())))
            for i, key in keyed.items():
                found = existing.get(key)
                if found is not None and found["request_hash"] != specs[i].request_hash:
                    raise task_store.IdempotencyConflict(key, found["id"])
            still_bad = [e for i in sorted(errors) if keyed.get(i) not in existing for e in errors[i]]
            if still_bad:
                raise _validation_error(still_bad)
        results = await task_store.create_tasks_async(conn, specs)
        if any(results[i].created for i in keyed):
            # The task holding a replayed key was deleted (retention) between the lookup and the
            # insert: the unchecked task would have been created anew.
            raise task_store.IdempotencyKeyInFlux(next(keyed[i] for i in keyed if results[i].created))
        return results

    try:
        results = await db.run_transaction_async(_statement_pool(request), create, settings.database_url or None)
    except task_store.IdempotencyConflict as exc:
        raise _conflict(exc) from None
    created = sum(r.created for r in results)
    # One validation of all the rows at once, and the JSON written by pydantic: per task, this is
    # most of the route's work.
    out = TaskBatchOut.model_validate({"tasks": [r.row for r in results], "created": created})
    return Response(
        out.model_dump_json(),
        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        media_type="application/json",
    )


# --- read ---------------------------------------------------------------------------------------------------------


def encode_cursor(created_at: datetime, task_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(task_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# A cursor is ours only if it decodes to exactly [aware ISO 8601 time, UUID]: anything else a client
# sends (other JSON, other types, naive or out-of-range times, deep nesting) is a 422, never a 500.
_CURSOR = TypeAdapter(tuple[IsoDatetime, uuid.UUID])
_BAD_CURSOR = "invalid cursor: pass the next_cursor of a previous page unchanged"


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, task_id = _CURSOR.validate_json(raw)
    except (ValueError, TypeError):  # binascii.Error and pydantic's ValidationError are ValueErrors
        raise _validation_error([_error(["query", "cursor"], _BAD_CURSOR)]) from None
    return created_at, task_id


@router.get("/tasks", summary="List tasks (filters, pagination)", response_model=TaskPage, tags=["tasks"])
def list_tasks(
    conn: ConnDep,
    status_: Annotated[
        list[TaskStatus] | None,
        Query(alias="status", description="Only tasks in these statuses; repeat it: ?status=DEAD&status=FAILED"),
    ] = None,
    name: Annotated[
        str | None, Query(min_length=1, max_length=200, description="Only tasks of this name."), NoNul
    ] = None,
    queue: Annotated[Literal["high", "default", "low"] | None, Query(description="Only tasks of this queue.")] = None,
    created_after: Annotated[
        IsoDatetime | None, Query(description="Only tasks created at or after this time (ISO 8601 with offset).")
    ] = None,
    created_before: Annotated[
        IsoDatetime | None, Query(description="Only tasks created before this time (ISO 8601 with offset).")
    ] = None,
    schedule_id: Annotated[uuid.UUID | None, Query(description="Only tasks created by this schedule.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Tasks per page.")] = 100,
    cursor: Annotated[
        str | None, Query(max_length=200, description="The `next_cursor` of the previous page; omit for the first.")
    ] = None,
) -> TaskPage:
    """Tasks, newest first (by `created_at`, then `id`), without `payload` and `result`.

    Pages are keyset-paginated: follow `next_cursor` until it is null and you see every task that
    existed when you started exactly once, however many are created meanwhile (those may or may not
    appear). Filters combine with AND; the cursor must be used with the same filters.
    """
    after = decode_cursor(cursor) if cursor is not None else None
    where = task_store.TaskFilter(
        statuses=status_ or (),
        name=name,
        queue=queue,
        created_after=created_after,
        created_before=created_before,
        schedule_id=schedule_id,
    )
    rows = task_store.list_tasks(conn, where, limit=limit + 1, after=after)
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
    return TaskPage(tasks=[TaskSummary.model_validate(dict(r)) for r in page], next_cursor=next_cursor)


@router.get("/tasks/{task_id}", summary="Get a task", response_model=TaskOut, responses=TASK_NOT_FOUND, tags=["tasks"])
def get_task(task_id: TaskId, conn: ConnDep) -> TaskOut:
    """The task, with its payload, result, status, attempt, last error and timestamps."""
    row = task_store.get_task(conn, task_id)
    if row is None:
        raise _not_found(task_id)
    task = dict(row)
    if nested_deeper_than(task["result"], MAX_JSON_DEPTH):
        # Stored before workers checked results: it cannot be serialised, and must not make the
        # whole task unreadable (a 500 on every read).
        task["result"] = f"(not shown: the result is nested deeper than {MAX_JSON_DEPTH} levels)"
    return TaskOut.model_validate(task)


@router.get(
    "/tasks/{task_id}/events",
    summary="A task's transitions",
    response_model=list[TaskEventOut],
    responses=TASK_NOT_FOUND,
    tags=["tasks"],
)
def get_task_events(task_id: TaskId, conn: ConnDep) -> list[TaskEventOut]:
    """Every transition of the task, oldest first."""
    events = task_store.list_events(conn, task_id)
    if not events and task_store.get_task(conn, task_id) is None:
        raise _not_found(task_id)
    return [TaskEventOut.model_validate(dict(e)) for e in events]


# --- cancel and retry ---------------------------------------------------------------------------------------------


def _names(statuses: frozenset[TaskStatus]) -> str:
    return ", ".join(sorted(statuses))


def _refusal(
    task_id: uuid.UUID, current: TaskStatus | None, verb: str, past: str, allowed: frozenset[TaskStatus]
) -> HTTPException:
    if current is None:
        return _not_found(task_id)
    if current == TaskStatus.STARTED:
        why = "it is running (STARTED); it will succeed, fail or be rescued"
    elif current in TERMINAL:
        why = f"it has already finished ({current})"
    else:
        why = f"it is {current}"
    detail = f"cannot {verb} task {task_id}: {why}. Only {_names(allowed)} tasks can be {past}"
    return HTTPException(status.HTTP_409_CONFLICT, detail=detail)


@router.post(
    "/tasks/{task_id}/cancel",
    summary="Cancel a task",
    response_model=TaskOut,
    responses={**TASK_NOT_FOUND, 409: CONFLICT},
    tags=["tasks"],
)
def cancel_task(task_id: TaskId, conn: LockingConnDep) -> TaskOut:
    """Cancel a PENDING, FAILED or ENQUEUED task: it becomes CANCELLED and never runs.

    A message already on its way to a worker is dropped when it arrives. A STARTED task cannot be
    cancelled (409), nor a finished one. A cancelled task can be brought back with `retry`.
    """
    moved = task_store.cancel(conn, task_id, detail="cancelled via the API")
    if moved.row is None:
        raise _refusal(task_id, moved.status, "cancel", "cancelled", CANCELLABLE)
    return TaskOut.model_validate(dict(moved.row))


@router.post(
    "/tasks/{task_id}/retry",
    summary="Retry a DEAD or CANCELLED task",
    response_model=TaskOut,
    responses={**TASK_NOT_FOUND, 409: CONFLICT},
    tags=["tasks"],
)
def retry_task(task_id: TaskId, conn: LockingConnDep) -> TaskOut:
    """Run a DEAD or CANCELLED task again: PENDING now, with a fresh retry budget (`max_retries` more
    retries), the same id, and its events so far kept. Other statuses are a 409."""
    moved = task_store.retry(conn, task_id, detail="retried via the API")
    if moved.row is None:
        raise _refusal(task_id, moved.status, "retry", "retried", RETRYABLE)
    return TaskOut.model_validate(dict(moved.row))


# --- DLQ ----------------------------------------------------------------------------------------------------------


@router.get("/dlq", summary="Dead-letter events", response_model=list[DlqEventOut], tags=["dlq"])
def list_dlq(
    conn: ConnDep, limit: Annotated[int, Query(ge=1, le=500, description="Events to return, the newest.")] = 100
) -> list[DlqEventOut]:
    """Dead-letter events, newest first: one per task attempt that ended DEAD."""
    return [DlqEventOut.model_validate(dict(e)) for e in dlq_store.list_dlq_events(conn, limit=limit)]


@router.post("/dlq/retry", summary="Retry DEAD tasks in bulk", response_model=DlqRetryOut, tags=["dlq"])
def retry_dlq(settings: SettingsDep, body: Annotated[DlqRetryFilter | None, Body()] = None) -> DlqRetryOut:
    """Retry every DEAD task that matches the filter (all of them with an empty body), as
    `POST /tasks/{id}/retry` does each. Returns how many. Tasks that die again while this runs are
    not retried twice."""
    where = body or DlqRetryFilter()
    total = 0
    with db.transaction(settings.database_url or None) as conn:
        until = conn.execute(text("SELECT now()")).scalar_one()
    while True:
        with db.transaction(settings.database_url or None) as conn:
            n = task_store.retry_dead(
                conn,
                name=where.name,
                reason=where.reason,
                since=where.since,
                until=until,
                limit=DLQ_RETRY_BATCH,
            )
        total += n
        if n < DLQ_RETRY_BATCH:
            return DlqRetryOut(retried=total)


# --- metrics ------------------------------------------------------------------------------------------------------


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    tags=["operations"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
def get_metrics(settings: SettingsDep) -> Response:
    """Prometheus metrics of this API process, and `taskscheduler_tasks_current{status,queue}`: the number of
    tasks in each status now, from the database. The scheduler and workers serve theirs on
    METRICS_PORT."""

    def count() -> list[tuple[str, str, int]]:
        with db.transaction(settings.database_url or None) as conn:
            return task_store.task_counts(conn)

    def schedule_counts() -> list[tuple[str, int, int, int]]:
        with db.transaction(settings.database_url or None) as conn:
            return schedule_store.schedule_counters(conn)

    body = metrics.render(metrics.TaskCountCollector(count), metrics.ScheduleCountCollector(schedule_counts))
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


# --- health -------------------------------------------------------------------------------------------------------


@health_router.get("/healthz", summary="Liveness", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers. No API key needed."""
    # async and without the database: it answers while every worker thread and pooled connection is
    # taken (a sync route would wait for a thread).
    return Health(status="ok")


@health_router.head("/healthz", include_in_schema=False)
async def healthz_head() -> Response:
    return Response(media_type="application/json")


def _readiness(settings: Settings) -> Health:
    database = broker = "ok"
    database_url, redis_url = settings.require_urls()
    try:
        with db.get_engine(database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        database = f"unreachable: {type(exc).__name__}"
    try:
        client = redis.Redis.from_url(redis_client_url(redis_url), socket_timeout=2, socket_connect_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:
        broker = f"unreachable: {type(exc).__name__}"
    return Health(status="ok" if database == broker == "ok" else "unavailable", database=database, broker=broker)


@health_router.get("/readyz", summary="Readiness", response_model=Health, responses={503: {"model": Health}})
def readyz(settings: SettingsDep) -> Health | JSONResponse:
    """Readiness: the database and the broker are reachable. No API key needed."""
    health = _readiness(settings)
    if health.status != "ok":
        return JSONResponse(health.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return health


@health_router.head("/readyz", include_in_schema=False)
def readyz_head(settings: SettingsDep) -> Response:
    ok = _readiness(settings).status == "ok"
    return Response(status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE,
                    media_type="application/json")  # fmt: skip
