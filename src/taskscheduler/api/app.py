"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from taskscheduler import __version__, handlers
from taskscheduler.api import dlq, docs, explain, health, schedules, task_creation, tasks, ui
from taskscheduler.api.auth import ApiKeyAuth
from taskscheduler.api.body_guard import BodyGuard
from taskscheduler.api.errors import add_error_handlers
from taskscheduler.config import Settings, get_settings
from taskscheduler.liveness import ProcessHeartbeat
from taskscheduler.store.db import Database

DESCRIPTION = """
Run named tasks at a given time on a pool of workers, with retries, a dead-letter queue and
rescue of tasks from crashed or hung workers. Every task's state lives in PostgreSQL;
`GET /tasks/{id}/events` shows everything that happened to it.

**Operating it:** `GET /tasks` finds tasks (by status, name, queue, creation time; paginated),
`POST /tasks/{id}/cancel` stops one that has not started, `POST /tasks/{id}/retry` and
`POST /dlq/retry` bring dead ones back, `GET /metrics` is for Prometheus.

**Authentication:** when the server sets `API_KEYS`, every route but `/healthz`, `/readyz` and these
docs needs `Authorization: Bearer <key>`: press **Authorize** and enter a key.
"""

TAGS = [
    {"name": "tasks", "description": "Create, find, cancel and retry tasks."},
    {"name": "dlq", "description": "The dead-letter queue: tasks that ran out of retries or got stuck."},
    {"name": "schedules", "description": "Recurring schedules: tasks created at cron or interval fire times."},
    {"name": "operations", "description": "Metrics for Prometheus."},
    {"name": "health", "description": "Probes for orchestrators; no API key needed."},
]


def create_app(
    settings: Settings | None = None, *, database: Database | None = None, process_heartbeat: bool = True
) -> FastAPI:
    """The API, on `database` (default: one of its own for DATABASE_URL of `settings`, closed when
    the app shuts down). With `process_heartbeat`, it records its liveness for `taskscheduler check
    api` while it runs (between its startup and shutdown)."""
    settings = settings or get_settings()
    handlers.load_task_modules(settings.task_module_list)
    owned = database is None
    database = database or Database.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        heartbeat = None
        if process_heartbeat:
            heartbeat = ProcessHeartbeat("api", interval_sec=settings.process_heartbeat_sec, database=database).start()
        # The creating routes run their statements on the event loop, on these connections; without
        # a lifespan (some test clients), they open one per request.
        await database.open_statement_pool()
        try:
            yield
        finally:
            await database.close_statement_pool()
            if heartbeat is not None:
                heartbeat.stop()
            if owned:
                database.dispose()

    # No redirect from `/tasks/` to `/tasks`: Starlette builds its Location from the Host header,
    # which the client chooses. A path with a trailing slash is a 404.
    app = FastAPI(
        title="taskscheduler",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        redirect_slashes=False,
        openapi_url=docs.OPENAPI_URL,
        # Served by docs.add_docs from local files instead.
        docs_url=None,
        redoc_url=None,
    )
    docs.add_docs(app)

    # The routes ask for settings through `get_settings`; give them the ones this app was built with.
    # async: FastAPI would run a sync dependency in the thread pool, a hop per request.
    async def app_settings() -> Settings:
        return settings

    app.dependency_overrides[get_settings] = app_settings
    # The hot routes read them here: with an override, FastAPI inspects the override's signature on
    # every request.
    app.state.settings = settings
    app.state.database = database
    for router in (
        task_creation.router,
        tasks.router,
        explain.router,
        dlq.router,
        schedules.router,
        health.router,
        health.public_router,
        ui.router,
    ):
        app.include_router(router)
    ui.install(app, settings)
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes, form_prefixes=(ui.PREFIX + "/",))
    # Outermost: a request without a valid key is refused before its body is read. The dashboard
    # (/ui) asks for its own login instead, on every route of it (ui.install).
    public = {"/healthz", "/readyz", *docs.PATHS, ui.PREFIX}
    app.add_middleware(
        ApiKeyAuth,
        keys=settings.api_key_list,
        public_paths=public,
        public_prefixes=[docs.STATIC_URL + "/", ui.PREFIX + "/"],
    )
    add_error_handlers(app)
    return app
