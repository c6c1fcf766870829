"""Probes and metrics: `/healthz` and `/readyz` (public), `/metrics` (behind the API key)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse

from taskscheduler import metrics
from taskscheduler.api.deps import DatabaseDep, SettingsDep, protected_router
from taskscheduler.api.schemas import Health
from taskscheduler.config import Settings, redis_client_url
from taskscheduler.store import operations, schedules
from taskscheduler.store.db import Database

router = protected_router("operations")
public_router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
def get_metrics(database: DatabaseDep) -> Response:
    """Prometheus metrics of this API process, `taskscheduler_tasks_current{status,queue}`: the number of
    tasks in each status now, and `taskscheduler_schedule_{fires,skips,misses}_total{schedule}`: each
    schedule's counters, from the database. The scheduler and workers serve theirs on METRICS_PORT."""

    def count() -> list[tuple[str, str, int]]:
        with database.transaction() as conn:
            return operations.task_counts(conn)

    def schedule_counts() -> list[tuple[str, int, int, int]]:
        with database.transaction() as conn:
            return schedules.schedule_counters(conn)

    body = metrics.render(metrics.TaskCountCollector(count), metrics.ScheduleCountCollector(schedule_counts))
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@public_router.get("/healthz", summary="Liveness", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers. No API key needed."""
    # async and without the database: it answers while every worker thread and pooled connection is
    # taken (a sync route would wait for a thread).
    return Health(status="ok")


@public_router.head("/healthz", include_in_schema=False)
async def healthz_head() -> Response:
    return Response(media_type="application/json")


def _readiness(settings: Settings, database: Database) -> Health:
    database_state = broker = "ok"
    redis_url = settings.require_urls()[1]
    try:
        database.ping()
    except Exception as exc:
        database_state = f"unreachable: {type(exc).__name__}"
    try:
        client = redis.Redis.from_url(redis_client_url(redis_url), socket_timeout=2, socket_connect_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:
        broker = f"unreachable: {type(exc).__name__}"
    status_ = "ok" if database_state == broker == "ok" else "unavailable"
    return Health(status=status_, database=database_state, broker=broker)


@public_router.get("/readyz", summary="Readiness", response_model=Health, responses={503: {"model": Health}})
def readyz(settings: SettingsDep, database: DatabaseDep) -> Health | JSONResponse:
    """Readiness: the database and the broker are reachable. No API key needed."""
    health = _readiness(settings, database)
    if health.status != "ok":
        return JSONResponse(health.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return health


@public_router.head("/readyz", include_in_schema=False)
def readyz_head(settings: SettingsDep, database: DatabaseDep) -> Response:
    ok = _readiness(settings, database).status == "ok"
    return Response(status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE,
                    media_type="application/json")  # fmt: skip
