"""The routes. Each reads or writes through `store`; errors are 4xx with a clear `detail`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import redis
from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import JSONResponse
from sqlalchemy import text

from taskscheduler import handlers
from taskscheduler.api.deps import ConnDep, SettingsDep
from taskscheduler.api.schemas import DlqEventOut, Health, TaskCreate, TaskEventOut, TaskOut
from taskscheduler.config import redis_client_url
from taskscheduler.lifecycle import queue_for_priority
from taskscheduler.store import db
from taskscheduler.store import dlq as dlq_store
from taskscheduler.store import tasks as task_store

router = APIRouter()

TASK_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No task with this id."}}


def _validation_error(field: str, message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}],
    )


@router.post("/tasks", status_code=status.HTTP_201_CREATED, response_model=TaskOut, tags=["tasks"])
def create_task(body: TaskCreate, conn: ConnDep, settings: SettingsDep) -> TaskOut:
    """Create a task that runs `name` with `payload` at `run_at` (default now)."""
    if handlers.get_handler(body.name) is None:
        known = ", ".join(handlers.registered_names())
        raise _validation_error("name", f"unknown task name {body.name!r}; registered: {known}")
    if body.run_at is not None:
        earliest = datetime.now(UTC) - timedelta(seconds=settings.run_at_grace_sec)
        if body.run_at < earliest:
            raise _validation_error("run_at", f"run_at is in the past (more than {settings.run_at_grace_sec:g}s ago)")
    row = task_store.create_task(
        conn,
        name=body.name,
        payload=body.payload,
        priority=body.priority,
        queue=queue_for_priority(body.priority).value,
        run_at=body.run_at,
        max_retries=body.max_retries,
        timeout_sec=body.timeout_sec,
    )
    return TaskOut.model_validate(dict(row))


@router.get("/tasks/{task_id}", response_model=TaskOut, responses=TASK_NOT_FOUND, tags=["tasks"])
def get_task(task_id: uuid.UUID, conn: ConnDep) -> TaskOut:
    row = task_store.get_task(conn, task_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"task {task_id} not found")
    return TaskOut.model_validate(dict(row))


@router.get("/tasks/{task_id}/events", response_model=list[TaskEventOut], responses=TASK_NOT_FOUND, tags=["tasks"])
def get_task_events(task_id: uuid.UUID, conn: ConnDep) -> list[TaskEventOut]:
    """Every transition of the task, oldest first."""
    events = task_store.list_events(conn, task_id)
    if not events and task_store.get_task(conn, task_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"task {task_id} not found")
    return [TaskEventOut.model_validate(dict(e)) for e in events]


@router.get("/dlq", response_model=list[DlqEventOut], tags=["dlq"])
def list_dlq(conn: ConnDep, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[DlqEventOut]:
    """Dead-letter events, newest first: one per task attempt that ended DEAD."""
    return [DlqEventOut.model_validate(dict(e)) for e in dlq_store.list_dlq_events(conn, limit=limit)]


@router.get("/healthz", response_model=Health, tags=["health"])
def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}}, tags=["health"])
def readyz(settings: SettingsDep) -> Health | JSONResponse:
    """Readiness: the database and the broker are reachable."""
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
    health = Health(status="ok" if database == broker == "ok" else "unavailable", database=database, broker=broker)
    if health.status != "ok":
        return JSONResponse(health.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return health
